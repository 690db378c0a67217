#!/usr/bin/env bash
# Set up normfold in ./.venv: Python packages (PyTorch CPU build included, for the
# demo and the tests) and the onnxruntime custom-op library. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NORMFOLD_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" install "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"${PIP[@]}" install -e ".[test,bench]" 2>&1 | grep -v -e "^WARNING: Location" -e "BuildBackendWarning" || true
.venv/bin/python -c "import normfold, torch, onnxruntime" || { echo "setup.sh: installing Python packages failed" >&2; exit 1; }

if [ -f custom_ops/build.sh ]; then
    bash custom_ops/build.sh || echo "setup.sh: warning: the custom-op library was not built; 'normfold doctor' says why" >&2
fi
echo "normfold is set up in .venv (run .venv/bin/normfold --help)"
