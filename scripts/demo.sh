#!/usr/bin/env bash
# README main command: installs, then runs the federated demo (all-MiniLM-L6-v2 on
# BBC News, 100 simulated clients) on this machine. Output: runs/demo/ (metrics.jsonl,
# summary.json, curves.png); rerunning resumes/finishes from its checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
# Run outside the source tree so the installed package (with its compiled _C) is used.
cd /tmp && HF_HUB_OFFLINE=1 "$PY" -m fwdkern demo --out "$ROOT/runs/demo" "$@"
