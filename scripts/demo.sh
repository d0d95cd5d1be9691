#!/usr/bin/env bash
# README main command: installs, then runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
cd /tmp && "$PY" -m fwdkern demo "$@"
