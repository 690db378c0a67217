"""normfold: fold BatchNorm and fuse normalization subgraphs in ONNX models."""

__version__ = "0.1.0"

from normfold.errors import CheckFailed, NormfoldError  # noqa: E402
from normfold.ops.library import ops_library_path  # noqa: E402
from normfold.pipeline.api import fold_affine, fold_bn, fold_wn, fuse, optimize, recalibrate, run_pass  # noqa: E402

__all__ = ["CheckFailed", "NormfoldError", "fold_affine", "fold_bn", "fold_wn", "fuse", "ops_library_path", "optimize", "recalibrate",
           "run_pass", "__version__"]
