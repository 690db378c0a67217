#!/usr/bin/env bash
# Set up normfold in ./.venv: PyTorch's CPU build (for the demo and the tests), then normfold in
# editable mode with its test and benchmark extras; that install builds the onnxruntime custom-op
# library (pip install, see README "Installation"). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NORMFOLD_TORCH_SPEC:-torch==2.13.0}
export CMAKE_BUILD_PARALLEL_LEVEL=${NORMFOLD_BUILD_JOBS:-${CMAKE_BUILD_PARALLEL_LEVEL:-2}}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

pip_install() {
    echo "setup.sh: pip install $*"
    if ! .venv/bin/python -m pip --disable-pip-version-check install -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2
        echo "setup.sh: pip install $* failed" >&2
        exit 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
pip_install "$TORCH_SPEC"
pip_install -e ".[test,bench]"
echo "setup.sh: normfold is set up in .venv (try .venv/bin/normfold doctor)"
