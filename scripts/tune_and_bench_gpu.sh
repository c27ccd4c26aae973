#!/usr/bin/env bash
# Tune and benchmark a suite (default: headline) on a GPU in one call: the table, JSON and plot for
# BENCHMARKS.md, and the tuning database to ship as tuning/databases/<gpu>.json.
# Resumable: layers already in a database (this user's or a shipped one) are not tuned again, so a run cut
# short by a time limit continues where it stopped when started again.
#
#   scripts/tune_and_bench_gpu.sh [OUT_DIR] [SUITE]      (OUT_DIR defaults to $OUT, else ./gconvgen-bench)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"   # a checkout that is not installed, as on the lent GPU
out="${1:-${OUT:-gconvgen-bench}}"
suite="${2:-headline}"
mkdir -p "$out"
plot=()
if python -c "import matplotlib" 2>/dev/null; then
    plot=(--plot "$out/bench-$suite.png")
else
    echo "matplotlib is missing: no plot (pip install 'gconvgen[plot]')" >&2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>&1 || true
python -m gconvgen.cli bench --suite "$suite" --tune --backward --device cuda \
    --json "$out/bench-$suite.json" --markdown "$out/bench-$suite.md" "${plot[@]}"
status=$?
python -m gconvgen.cli cache export "$out/tuning-db.json"   # whatever was tuned, even when bench failed
exit $status
