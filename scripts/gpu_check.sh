#!/usr/bin/env bash
# The one GPU check, for one call of at most 9 minutes on one H200, from a checkout that is not installed:
#   1. versions (GPU, driver, torch, Triton, cuDNN);
#   2. the GPU test subset on real Triton (bf16 included): forward, epilogues, backward, warm-call replays;
#      then the host time per warm call (scripts/host_overhead.py) with real and stubbed launches;
#   3. a short tune of the headline suite in channels_last (each layer's record is written as it finishes,
#      so a tune cut short by its time limit keeps what it tuned);
#   4. the headline suite forward in NCHW and channels_last against F.conv2d, and forward + backward in
#      channels_last against PyTorch eager;
#   5. `gconvgen inspect` of the same kernels (static sm_90 figures, run on the CPU cores meanwhile),
#      so static figures and measured times sit side by side.
# Writes at most 9 files to OUT_DIR. Every step has its own time limit; a failed step does not stop the rest.
#
#   scripts/gpu_check.sh [OUT_DIR]            (OUT_DIR defaults to $OUT, else ./gconvgen-gpu-check)
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh /tmp/dry   a dry run of every step on the CPU (smoke suite,
#                                                        Triton's interpreter): checks the script, times nothing
#   scripts/gpu_check.sh --which-python       say which Python it would run, and exit
# Python: $PYTHON when set; else the repository's .venv (the README's set-up) when it exists and imports
# torch; else the system python3 (a GPU machine has torch there, and a .venv is not carried to it).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"; python_origin="\$PYTHON"
elif [ -x "$root/.venv/bin/python" ] && "$root/.venv/bin/python" -c "import torch" > /dev/null 2>&1; then
    python="$root/.venv/bin/python"; python_origin="the repository's .venv, which imports torch"
else
    python="python3"; python_origin="the system python3: no .venv here that imports torch"
fi
if [ "${1:-}" = --which-python ]; then
    echo "python: $python ($python_origin)"
    exit 0
fi
out="$(mkdir -p "${1:-${OUT:-gconvgen-gpu-check}}" && cd "${1:-${OUT:-gconvgen-gpu-check}}" && pwd)"
device="${GPU_CHECK_DEVICE:-cuda}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export GCONVGEN_CACHE_DIR="${GCONVGEN_CACHE_DIR:-$(mktemp -d)/gconvgen}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # Triton 3.9's default, said aloud
if [ "$device" = cuda ]; then
    suite=headline; tests_limit=170; tune_limit=110; bench_limit=170; backward_limit=60
    test_args=(--device cuda)
else
    suite=smoke; tests_limit=600; tune_limit=300; bench_limit=300; backward_limit=300
    test_args=(-k "grouped or depthwise and not fuzz")
fi
cd "$root" || exit 1
started=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" | tee -a "$out/versions.txt" >&2; }
status=0

# 1. versions
"$python" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cudnn', \
torch.backends.cudnn.version(), '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    > "$out/versions.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$out/versions.txt" 2>&1 || true
date -u '+%Y-%m-%dT%H:%M:%SZ' >> "$out/versions.txt"
say "python: $python ($python_origin)"

# 5. (in the background) static sm_90 figures: a compiler's work on the CPU cores, with the interpreter off
(env -u TRITON_INTERPRET timeout 420 "$python" -m gconvgen inspect --suite "$suite" --kind forward \
    --kind grad_input --kind grad_weight > "$out/inspect.txt" 2>&1) &
inspecting=$!

# 2. tests on the device
say "tests"
timeout "$tests_limit" "$python" -m pytest -q -p no:cacheprovider -x "${test_args[@]}" \
    tests/test_forward.py tests/test_epilogue.py tests/test_backward.py tests/test_warm_calls.py \
    > "$out/gpu-tests.log" 2>&1 || status=1
tail -n 3 "$out/gpu-tests.log" | tee -a "$out/versions.txt"

# 2b. host time per warm call, real launches and stubbed, beside F.conv2d's
say "host overhead"
timeout 60 "$python" scripts/host_overhead.py --device "$device" --calls 1000 > "$out/host-overhead.txt" 2>&1 || status=1
cat "$out/host-overhead.txt" >&2

# 3. a short tune, channels_last
say "tune (at most ${tune_limit}s)"
timeout "$tune_limit" "$python" -m gconvgen tune --suite "$suite" --layout nhwc --device "$device" \
    > "$out/tune.log" 2>&1
say "tune exit $? (124: its time limit; records made before it are kept)"

# 4. forward in both layouts, then forward + backward in channels_last
say "bench forward"
timeout "$bench_limit" "$python" -m gconvgen bench --suite "$suite" --layout both --device "$device" \
    --json "$out/bench-forward.json" --markdown "$out/bench-forward.md" > "$out/bench.log" 2>&1 || status=1
say "bench forward + backward, channels_last"
timeout "$backward_limit" "$python" -m gconvgen bench --suite "$suite" --layout nhwc --device "$device" \
    --backward >> "$out/bench.log" 2>&1 || status=1
"$python" -m gconvgen cache export "$out/tuning-db.json" >> "$out/bench.log" 2>&1 || true

say "waiting for inspect"
wait "$inspecting" || say "inspect did not finish (exit $?)"
say "done, status $status"
exit "$status"
