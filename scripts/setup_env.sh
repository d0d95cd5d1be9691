#!/usr/bin/env bash
# Installs fwdkern and its test/runtime dependencies into the current Python.
# torch 2.13.0 first: on these machines it resolves to a local CPU build; installing
# anything that depends on torch before it would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') or torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q numpy pytest hypothesis pytest-benchmark "triton>=3.0"
"$PY" -m pip install -q -r requirements-extra.txt
# Normal build isolation: fwdkern._C needs only setuptools + pybind11 to build.
"$PY" -m pip install -q .
