"""Where normfold's onnxruntime custom-op libraries live, and registering them.

Installing normfold (`pip install .`, `pip install -e .`, a wheel from
`pip wheel .`) builds them with CMake (custom_ops/) into the installed
package's `_ops/` folder:

- `libnormfold_ops.so`: CPU kernels of the `com.normfold` ops;
- `libnormfold_ops_cuda.so`: the same CPU kernels plus CUDA kernels (built
  only where nvcc exists; CUDA runtime linked statically, so it loads without
  CUDA libraries and needs only the driver when a CUDA kernel runs).

Both register the whole domain, so a session registers exactly one of them.
The `_ops/` folder is looked for in every location of the `normfold` package
(an editable install has two: the site-packages copy that holds the built
libraries, and the source tree). Until a library is built its path is None
and sessions run without it; why the CUDA one was not built is in
`cuda_not_built_reason()`. Each library exports `NormfoldOrtApiVersion()`,
the onnxruntime API version of the headers it was compiled against.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import onnxruntime as ort

LIBRARY_NAME = "libnormfold_ops.so"
CUDA_LIBRARY_NAME = "libnormfold_ops_cuda.so"
CUDA_NOT_BUILT_NOTE = "CUDA_NOT_BUILT.txt"  # written by custom_ops/cmake/cuda.cmake


def ops_dirs() -> list[Path]:
    """The `_ops/` folders of every location of the normfold package, in import order."""
    spec = importlib.util.find_spec("normfold")
    locations = (spec.submodule_search_locations or []) if spec else []
    return [Path(location) / "_ops" for location in locations]


def _in_ops_dirs(name: str) -> Path | None:
    return next((folder / name for folder in ops_dirs() if (folder / name).is_file()), None)


def _find(override_variable: str, name: str) -> str | None:
    override = os.environ.get(override_variable)
    if override:
        return override if Path(override).is_file() else None
    found = _in_ops_dirs(name)
    return None if found is None else str(found)


def ops_library_path() -> str | None:
    """Path of the built CPU custom-op library, or None when it is not built.
    `NORMFOLD_OPS_LIBRARY` overrides the search."""
    return _find("NORMFOLD_OPS_LIBRARY", LIBRARY_NAME)


def cuda_ops_library_path() -> str | None:
    """Path of the built CPU+CUDA custom-op library, or None when it is not built.
    `NORMFOLD_CUDA_OPS_LIBRARY` overrides the search."""
    return _find("NORMFOLD_CUDA_OPS_LIBRARY", CUDA_LIBRARY_NAME)


def cuda_not_built_reason() -> str | None:
    """Why the build left the CUDA library out (nvcc not found, turned off), as CMake recorded it, or None."""
    note = _in_ops_dirs(CUDA_NOT_BUILT_NOTE)
    return None if note is None else note.read_text().strip()


def built_api_version(library: str) -> int | None:
    """The onnxruntime API version (ORT_API_VERSION) `library` was compiled against, or None
    when it cannot be loaded or does not say (a library built before normfold recorded it)."""
    function = _exported(library, "NormfoldOrtApiVersion")
    return None if function is None else int(function())


def cpu_loops(library: str) -> str | None:
    """Which copy of the hot loops `library`'s kernels run in this process: "avx512", "avx2" or
    "baseline" (NORMFOLD_LOOPS=avx2|baseline caps it), or None when it cannot be loaded or does not say."""
    function = _exported(library, "NormfoldCpuLoops")
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    return function().decode()


def _exported(library: str, name: str):
    """The C function `name` that `library` exports (ctypes), or None when the library cannot be
    loaded or does not export it."""
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


def runtime_api_version() -> int:
    """The newest onnxruntime API version the running onnxruntime serves (its minor version:
    onnxruntime 1.N serves API versions 1..N)."""
    return int(ort.__version__.split(".")[1])


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
