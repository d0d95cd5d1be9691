"""Test setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any triton kernel module is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fwdkern  # noqa: E402


def pytest_configure(config):
    # A test run without the compiled extension would silently test only the
    # reference path: refuse unless explicitly allowed.
    if not fwdkern.backends.has_extension() and os.environ.get("FWDKERN_ALLOW_NO_EXT") != "1":
        raise pytest.UsageError(
            "fwdkern._C is not importable (build it with `pip install .` or "
            "`python setup.py build_ext --inplace`); set FWDKERN_ALLOW_NO_EXT=1 to test without it"
        )


def available_backends(device="cpu", dtype=torch.float32):
    """Backends that can run on `device` here (triton only under the interpreter on CPU, no bf16 there)."""
    out = []
    for b in ("cpu", "cuda", "triton", "reference"):
        if not fwdkern.backends.available(b, device):
            continue
        if b == "triton" and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
            continue
        out.append(b)
    return out
