"""onnxruntime sessions as normfold creates them.

Every session registers normfold's custom-op library when it is built, so
models rewritten by normfold run wherever normfold runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from normfold.errors import NormfoldError, ProviderUnavailable
from normfold.io.inputs import Feeds
from normfold.io.model_io import PROTOBUF_LIMIT, model_bytes, skeleton
from normfold.ops.library import ops_library_path, register_ops

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class Configuration:
    """One way a model is deployed in onnxruntime: normfold's library registered
    or not, graph optimizations all on (ORT_ENABLE_ALL) or all off (ORT_DISABLE_ALL)."""

    library: bool
    optimize: bool

    @property
    def name(self) -> str:
        """E.g. `lib-all` (library, ORT_ENABLE_ALL) or `nolib-none` (no library, ORT_DISABLE_ALL)."""
        return f"{'lib' if self.library else 'nolib'}-{'all' if self.optimize else 'none'}"

    def describe(self) -> str:
        """E.g. `library, ORT_ENABLE_ALL`."""
        return f"{'library' if self.library else 'no library'}, ORT_{'ENABLE' if self.optimize else 'DISABLE'}_ALL"


# the deployment configurations every written model is checked in (`normfold.pipeline.deploy_check`)
CONFIGURATIONS = {c.name: c for c in (Configuration(True, False), Configuration(True, True),
                                       Configuration(False, False), Configuration(False, True))}


def parse_configurations(text: str | None) -> tuple[Configuration, ...]:
    """The configurations of a comma-separated list of names (None: all four)."""
    if text is None:
        return tuple(CONFIGURATIONS.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown or not names:
        raise NormfoldError(f"unknown configuration(s) {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(CONFIGURATIONS)}")
    return tuple(CONFIGURATIONS[n] for n in dict.fromkeys(names))


def library_available() -> bool:
    """Whether normfold's CPU custom-op library is built (sessions can register it)."""
    return ops_library_path() is not None


def make_session(
    model: onnx.ModelProto | str,
    *,
    provider: str = "cpu",
    optimize: bool = False,
    threads: int | None = None,
    library: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for `model` (a ModelProto or a path).

    `optimize=False` disables every onnxruntime graph optimization, so the
    session computes exactly the graph it is given (onnxruntime would otherwise
    fold BatchNorm itself and hide differences). `provider` is "cpu" or "cuda";
    asking for CUDA where it is not available is an error, never a silent CPU run.
    `library=False` runs without normfold's custom-op library (as a user's own
    onnxruntime would).
    """
    if provider not in PROVIDERS:
        raise NormfoldError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailable(
            f"execution provider '{provider}' is not available in this onnxruntime "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4  # failures reach the user as one NormfoldError line, not as ORT's log
    if threads:
        options.intra_op_num_threads = threads
    if library:
        register_ops(options, provider)
    source = model if isinstance(model, str) else _serialized(model, options)
    providers = [name] if provider == "cpu" else [name, PROVIDERS["cpu"]]
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, ... (some derive from Exception alone)
        first = str(exc).strip().splitlines()[0]
        raise NormfoldError(f"onnxruntime cannot load the model: {first}") from exc
    if name not in session.get_providers():
        # onnxruntime-gpu lists CUDA even without a GPU and silently falls back to CPU.
        raise ProviderUnavailable(
            f"execution provider '{provider}' could not be initialised (no usable GPU or CUDA "
            "libraries)"
        )
    return session


def _serialized(model: onnx.ModelProto, options: ort.SessionOptions) -> bytes:
    """`model` as bytes for onnxruntime. Over protobuf's 2 GB limit, the large
    initializers are handed to onnxruntime as external initializers (no copy)
    and stay in the bytes as data-less placeholders."""
    if model_bytes(model) <= PROTOBUF_LIMIT:
        return model.SerializeToString()
    light = skeleton(model)  # large weights left out (declared as inputs, dropped again here)
    del light.graph.input[len(model.graph.input):]
    kept = {t.name for t in light.graph.initializer}
    names, values = [], []
    for tensor in model.graph.initializer:
        if tensor.name in kept:
            continue
        placeholder = light.graph.initializer.add()
        placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
        placeholder.dims.extend(tensor.dims)
        placeholder.data_location = onnx.TensorProto.EXTERNAL
        placeholder.external_data.add(key="location", value="normfold-in-memory")
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(onnx.numpy_helper.to_array(tensor)))
    options.add_external_initializers(names, values)
    return light.SerializeToString()


def run_session(session, feeds: Feeds, output_names: list[str] | None = None, what: str = "model"
                ) -> list[np.ndarray]:
    """`session.run`, with onnxruntime's failures turned into a one-line NormfoldError
    naming `what` ran (e.g. "the reference ONNX model")."""
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure is reported below, in one line
    try:
        return session.run(output_names, feeds, quiet)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise NormfoldError(f"onnxruntime failed to run {what}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
