#!/usr/bin/env bash
# Set up normfold in ./.venv: Python packages (PyTorch CPU build included, for the
# demo and the tests) and the onnxruntime custom-op library. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NORMFOLD_TORCH_SPEC:-torch==2.13.0}
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

if [ -f custom_ops/build.sh ]; then
    bash custom_ops/build.sh || echo "setup.sh: warning: the custom-op library was not built; 'normfold doctor' says why" >&2
fi
echo "setup.sh: normfold is set up in .venv (try .venv/bin/normfold --help)"
