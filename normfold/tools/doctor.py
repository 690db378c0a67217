"""`normfold doctor`: what normfold can use on this machine, and why not.

Versions, how normfold was installed, the onnxruntime API version the
custom-op libraries were built against and whether the running onnxruntime
serves it, the libraries (built? do their kernels run?), why the CUDA one was
not built, the onnxruntime execution providers (listed, and actually usable),
and what to do when something is missing, fitted to the installation.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from normfold import __version__
from normfold.ops.library import (built_api_version, cpu_loops, cuda_not_built_reason, cuda_ops_library_path,
                                  ops_dirs, ops_library_path, runtime_api_version)
from normfold.ops.table import DOMAIN


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installation() -> dict:
    """How this normfold was installed: {"kind": ..., "source": path or URL or None}.

    kind is "editable" or "directory" (pip install [-e] SOURCE; source is that folder),
    "archive" (a wheel or sdist file), "index" (from a package index), or "source tree"
    (imported from a checkout that was never installed)."""
    try:
        direct_url = importlib.metadata.distribution("normfold").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return {"kind": "source tree", "source": str(ops_dirs()[0].parents[1])}
    if direct_url is None:
        return {"kind": "index", "source": None}
    origin = json.loads(direct_url)
    if "dir_info" in origin:
        kind = "editable" if origin["dir_info"].get("editable") else "directory"
        return {"kind": kind, "source": unquote(urlparse(origin["url"]).path)}
    return {"kind": "archive", "source": origin.get("url")}


def _api(library: str | None) -> dict:
    """The onnxruntime API version `library` was built against, the one onnxruntime serves, and
    whether they fit (onnxruntime 1.N serves API versions up to N)."""
    built = None if library is None else built_api_version(library)
    runtime = runtime_api_version()
    return {"built": built, "runtime": runtime, "compatible": None if built is None else built <= runtime}


def _advice(install: dict, report: dict) -> str | None:
    """What to run to get working CPU kernels, for this kind of installation; None when they work."""
    cpu, api = report["cpu_ops"], report["onnxruntime_api"]
    if cpu["works"]:
        return None
    first, env = "", "with a C++ compiler and CMake, NORMFOLD_NO_KERNELS unset"
    if api["compatible"] is False:
        first = f"upgrade onnxruntime to 1.{api['built']} or newer, or "
        env = f"against headers of onnxruntime 1.{api['runtime']} or older (ONNXRUNTIME_INCLUDE_DIR=...)"
    pip = f"{sys.executable} -m pip install --no-deps"
    if install["kind"] in ("editable", "source tree"):
        return f"{first}rebuild {env}: {pip} -e {install['source']}"
    if install["kind"] == "directory":
        return f"{first}reinstall {env}: {pip} --force-reinstall {install['source']}"
    return (f"{first}reinstall normfold from its source {env} (this one came from a wheel or archive without"
            f" working kernels): {pip} --force-reinstall SOURCE, or build a wheel: pip wheel SOURCE")


def _probe_model() -> onnx.ModelProto:
    """One com.normfold GroupNorm node (2 groups) on a 1x4x3 input."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("X", [1, 4, 3]), ("scale", [4]), ("bias", [4]))]
    node = helper.make_node("GroupNorm", ["X", "scale", "bias"], ["Y"], domain=DOMAIN, num_groups=2)
    graph = helper.make_graph([node], "doctor", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model


def _session(model: onnx.ModelProto, provider: str, library: str | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if library:
        options.register_custom_ops_library(library)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _check_kernels(library: str | None, provider: str) -> dict:
    """Run the probe GroupNorm with `library` on `provider`; {"works": bool, "error": str | None}."""
    if library is None:
        return {"works": False, "error": "not built"}
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    groups = x.reshape(1, 2, 6)
    expected = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    try:
        session = _session(_probe_model(), provider, library)
        if provider not in session.get_providers():
            return {"works": False, "error": f"{provider} could not be initialised"}
        y = session.run(None, {"X": x, "scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - report any onnxruntime failure as text
        return {"works": False, "error": str(exc).strip().splitlines()[0]}
    if not np.allclose(y, expected, atol=1e-5):
        return {"works": False, "error": "the probe GroupNorm gave wrong results"}
    return {"works": True, "error": None}


def _cuda_provider() -> dict:
    """Whether onnxruntime lists CUDAExecutionProvider and can actually create a session on it."""
    listed = "CUDAExecutionProvider" in ort.get_available_providers()
    if not listed:
        return {"listed": False, "usable": False, "error": "this onnxruntime has no CUDA provider"}
    node = helper.make_node("Identity", ["X"], ["Y"])
    graph = helper.make_graph([node], "doctor", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    ort.set_default_logger_severity(4)  # onnxruntime logs the failed provider start; we report it below
    try:
        usable = "CUDAExecutionProvider" in _session(model, "CUDAExecutionProvider", None).get_providers()
    except Exception as exc:  # noqa: BLE001
        return {"listed": True, "usable": False, "error": str(exc).strip().splitlines()[0]}
    finally:
        ort.set_default_logger_severity(2)
    return {"listed": True, "usable": usable, "error": None if usable else _cuda_provider_load_error()}


def _cuda_provider_load_error() -> str:
    """Why onnxruntime's CUDA provider library does not start (a missing CUDA/cuDNN library, or no GPU)."""
    provider_library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(provider_library))
    except OSError as exc:
        return f"cannot load {provider_library.name}: {exc}"
    return "no usable GPU (the CUDA provider library loads, but no device could be initialised)"


def doctor() -> dict:
    """Everything `normfold doctor` reports, as a JSON-ready dict."""
    cpu_path, cuda_path = ops_library_path(), cuda_ops_library_path()
    cuda_provider = _cuda_provider()
    cuda_kernels = _check_kernels(cuda_path, "CUDAExecutionProvider") if cuda_provider["usable"] and cuda_path else None
    install = _installation()
    report = {
        "versions": {
            "normfold": __version__, "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "torch": _version("torch"), "numpy": np.__version__,
        },
        "install": install,
        "domain": DOMAIN,
        "onnxruntime_api": _api(cpu_path or cuda_path),
        "cpu_ops": {"library": cpu_path, "loops": None if cpu_path is None else cpu_loops(cpu_path),
                    **_check_kernels(cpu_path, "CPUExecutionProvider")},
        "cuda_ops": {"library": cuda_path, "not_built": cuda_not_built_reason(),
                     "loads": _check_kernels(cuda_path, "CPUExecutionProvider")["works"],
                     "runs_on_gpu": None if cuda_kernels is None else cuda_kernels["works"],
                     "gpu_error": None if cuda_kernels is None else cuda_kernels["error"]},
        "providers": ort.get_available_providers(),
        "cuda_provider": cuda_provider,
    }
    report["advice"] = _advice(install, report)
    return report
