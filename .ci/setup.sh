#!/usr/bin/env bash
# Set up .venv for gconvgen on any machine, idempotently.
# - A machine that already has torch (e.g. a CUDA build) keeps it: the venv sees system site-packages.
# - A machine with no torch gets the CPU build torch==2.13.0: from /opt/wheels where it lies on disk,
#   else from PyTorch's CPU index, never the CUDA packages. GPU users are never pinned: pyproject.toml only
#   asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
    if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --find-links /opt/wheels "torch==2.13.0"   # the CPU build on disk
    else
        "$PY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
    fi
fi
# hatchling, the build backend, lets tests/test_wheel.py build the wheel offline (no isolated build env)
"$PY" -m pip install -q -e ".[test]" "hatchling>=1.21"
"$PY" -c "import torch, triton, gconvgen; print(f'gconvgen {gconvgen.__version__}: torch {torch.__version__}, triton {triton.__version__}')"
