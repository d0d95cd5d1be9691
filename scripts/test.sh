#!/usr/bin/env bash
# README test command: installs everything from scratch, then runs the test suite
# (Triton kernels run under TRITON_INTERPRET=1 when there is no GPU; see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
# Run from tests/ so the installed package (with its compiled _C) is imported, not ./fwdkern.
cd tests && "$PY" -m pytest -q -p no:cacheprovider "$@" .
