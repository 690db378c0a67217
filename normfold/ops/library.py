"""Where normfold's onnxruntime custom-op libraries live, and registering them.

`custom_ops/build.sh` (run by the set-up command) builds two libraries into
`normfold/_ops/`:

- `libnormfold_ops.so`: CPU kernels of the `com.normfold` ops;
- `libnormfold_ops_cuda.so`: the same CPU kernels plus CUDA kernels (built
  only where nvcc exists; CUDA runtime linked statically, so it loads without
  CUDA libraries and needs only the driver when a CUDA kernel runs).

Both register the whole domain, so a session registers exactly one of them.
Until a library is built its path is None and sessions run without it; the
reason it was not built is in `build_failure()`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

LIBRARY_NAME = "libnormfold_ops.so"
CUDA_LIBRARY_NAME = "libnormfold_ops_cuda.so"
OPS_DIR = Path(__file__).resolve().parents[1] / "_ops"  # normfold/_ops, where the build puts the libraries
_FAILURE_NOTES = {"cpu": "BUILD_FAILED.txt", "cuda": "CUDA_BUILD_FAILED.txt"}


def _find(override_variable: str, name: str) -> str | None:
    override = os.environ.get(override_variable)
    if override:
        return override if Path(override).is_file() else None
    candidate = OPS_DIR / name
    return str(candidate) if candidate.is_file() else None


def ops_library_path() -> str | None:
    """Path of the built CPU custom-op library, or None when it is not built.
    `NORMFOLD_OPS_LIBRARY` overrides the search."""
    return _find("NORMFOLD_OPS_LIBRARY", LIBRARY_NAME)


def cuda_ops_library_path() -> str | None:
    """Path of the built CPU+CUDA custom-op library, or None when it is not built.
    `NORMFOLD_CUDA_OPS_LIBRARY` overrides the search."""
    return _find("NORMFOLD_CUDA_OPS_LIBRARY", CUDA_LIBRARY_NAME)


def build_failure(kind: str = "cpu") -> str | None:
    """Why the `kind` ("cpu" or "cuda") library was not built, as build.sh recorded it, or None."""
    note = OPS_DIR / _FAILURE_NOTES[kind]
    if not note.is_file():
        return None
    return note.read_text().strip() or "build failed (no reason recorded)"


def register_ops(options: ort.SessionOptions, provider: str = "cpu") -> bool:
    """Register normfold's custom ops with `options`; return whether a library was registered.

    For `provider="cuda"` the CPU+CUDA library is registered when it is built
    (and loads), otherwise the CPU library."""
    if provider == "cuda" and cuda_ops_library_path() is not None:
        try:
            options.register_custom_ops_library(cuda_ops_library_path())
            return True
        except Exception:  # noqa: BLE001 - onnxruntime raises several types; fall back to the CPU kernels
            pass
    path = ops_library_path()
    if path is None:
        return False
    options.register_custom_ops_library(path)
    return True
