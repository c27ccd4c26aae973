#!/usr/bin/env bash
# Branch coverage of the compiler's decisions (planner, families, lowering) and the launch (row alignment,
# staging, weight copies, wide index, grad-input-as-forward) reached by the differential fuzz alone: every
# branch a kernel path takes should be one the fuzz has drawn. Prints the table with the missed branches.
#   scripts/decision_coverage.sh                 # the fuzz's CI profile
#   scripts/decision_coverage.sh --hypothesis-profile=long
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -m pytest -q -p no:randomly tests/test_fuzz.py "$@" \
    --cov=gconvgen.compiler.plan --cov=gconvgen.compiler.lowering --cov=gconvgen.compiler.families --cov=gconvgen.runtime.launch \
    --cov=gconvgen.runtime.weights --cov-branch --cov-report=term-missing:skip-covered
