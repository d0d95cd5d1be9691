#!/usr/bin/env bash
# README main command: installs, then runs a bundled federated demo on this machine.
#   bash scripts/demo.sh        classification: all-MiniLM-L6-v2 on BBC News, 100 simulated clients (runs/demo/)
#   bash scripts/demo.sh lm     causal LM: SmolLM2-135M on Guardian headlines, held-out perplexity (runs/demo_lm/)
# Further options go to `python -m fwdkern demo`; rerunning resumes/finishes from the run's checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WHICH=classification
if [ "${1:-}" = "lm" ] || [ "${1:-}" = "classification" ]; then
  WHICH=$1
  shift
fi
OUT="$ROOT/runs/demo"
[ "$WHICH" = "lm" ] && OUT="$ROOT/runs/demo_lm"
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
# Run outside the source tree so the installed package (with its compiled _C) is used.
cd /tmp && HF_HUB_OFFLINE=1 "$PY" -m fwdkern demo "$WHICH" --out "$OUT" "$@"
