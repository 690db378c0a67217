"""Where normfold's onnxruntime custom-op library lives, and registering it.

The library is built from `custom_ops/` by the set-up command. Until it is
built, `ops_library_path()` returns None and sessions run without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

LIBRARY_NAME = "libnormfold_ops.so"
_PACKAGE_DIR = Path(__file__).resolve().parent


def ops_library_path() -> str | None:
    """Path of the built custom-op library, or None when it is not built.
    `NORMFOLD_OPS_LIBRARY` overrides the search."""
    override = os.environ.get("NORMFOLD_OPS_LIBRARY")
    if override:
        return override if Path(override).is_file() else None
    candidate = _PACKAGE_DIR / "_ops" / LIBRARY_NAME
    return str(candidate) if candidate.is_file() else None


def register_ops(options: ort.SessionOptions) -> bool:
    """Register the custom-op library with `options` if it is built; return whether it was."""
    path = ops_library_path()
    if path is None:
        return False
    options.register_custom_ops_library(path)
    return True
