#!/usr/bin/env bash
# On a GPU machine: the differential, op, backward and training tests with Triton's real compiler
# (not the interpreter), every dtype including bf16, plus the sm_90 ahead-of-time compile check.
# Works from a checkout that is not installed (PYTHONPATH), as on the lent GPU machine.
#
#   scripts/gpu_tests.sh [OUT_DIR]      (OUT_DIR defaults to $OUT, else ./gconvgen-gpu-tests)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-gconvgen-gpu-tests}}"
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', \
torch.backends.cudnn.version(), torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$out/versions.txt"
cd "$root" && python -m pytest -q --device cuda -p no:cacheprovider --junitxml="$out/gpu-tests.xml" \
    tests/test_forward.py tests/test_op.py tests/test_backward.py tests/test_training.py 2>&1 | tee "$out/gpu-tests.log"
exit "${PIPESTATUS[0]}"
