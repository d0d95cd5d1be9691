"""Backend registry: which implementation runs an op.

Order of precedence: the per-call ``backend=`` argument, then the
``FWDKERN_BACKEND`` environment variable, then automatic choice. Automatic choice
silently falls back (e.g. to the reference when the extension is missing); a
backend that is *requested* but unavailable raises :class:`BackendUnavailable`.

Backends: ``cpu`` (C++ kernels in fwdkern._C), ``cuda`` (CUDA kernels in
fwdkern._C), ``triton`` (GPU, or CPU under TRITON_INTERPRET=1), ``reference``
(pure PyTorch, materializes perturbations).
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")

# Automatic choice for CUDA tensors, per op, first available wins.
# NOTE: not measured yet -- no GPU was lent to the session that wrote the kernels.
# The CUDA kernels are the default because they share Philox words across a warp
# with shuffles (one Philox call per 128 elements per k); revisit with
# bench/bench_seeded.py results on H100/H200.
_AUTO_CUDA = {
    "perturbation": ("cuda", "triton", "reference"),
    "seeded_axpy_": ("cuda", "triton", "reference"),
    "seeded_dot": ("cuda", "triton", "reference"),
    # LoRA ops: the fused Triton kernels (fwdkern/triton/lora.py); there are no CUDA
    # LoRA kernels yet.
    "lora_linear_dual": ("triton", "reference"),
    "lora_linear_perturbed": ("triton", "reference"),
    "seeded_matmul": ("triton", "reference"),
}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here (not built, no device, no triton...)."""


@functools.lru_cache(maxsize=None)
def _ext():
    try:
        from . import _C  # noqa: F401

        return _C
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        return e


def extension():
    """The compiled module fwdkern._C, or raise BackendUnavailable saying why."""
    ext = _ext()
    if isinstance(ext, Exception):
        raise BackendUnavailable(f"fwdkern._C (compiled kernels) failed to import: {ext}. Reinstall with `pip install .`")
    return ext


def has_extension() -> bool:
    return not isinstance(_ext(), Exception)


def has_cuda_kernels() -> bool:
    return has_extension() and bool(_ext().with_cuda) and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on tensors of `device`, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        return None if has_extension() else f"fwdkern._C did not import: {_ext()}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        if not has_extension():
            return f"fwdkern._C did not import: {_ext()}"
        if not _ext().with_cuda:
            return "fwdkern._C was built without CUDA kernels (no nvcc at build time, or FWDKERN_CUDA=0)"
        return None
    if backend == "triton":
        if not has_triton():
            return "triton is not installed (pip install 'fwdkern[triton]')"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    return f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})"


def available(backend: str, device) -> bool:
    return _why_unavailable(backend, torch.device(device)) is None


def resolve(op: str, device, backend: str | None = None) -> str:
    """The backend that runs `op` on tensors of `device`."""
    device = torch.device(device)
    requested = backend if backend not in (None, "", "auto") else os.environ.get("FWDKERN_BACKEND", "").strip() or None
    if requested == "auto":
        requested = None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend: unknown backend {requested!r} (expected one of auto, {', '.join(BACKENDS)})")
        why = _why_unavailable(requested, device)
        if why is not None:
            raise BackendUnavailable(f"{op}: requested backend {requested!r} is unavailable: {why}")
        return requested
    if device.type == "cuda":
        order = _AUTO_CUDA.get(op, ("cuda", "triton", "reference"))
    elif device.type == "cpu":
        order = ("cpu", "reference")
    else:
        order = ("reference",)
    for b in order:
        if _why_unavailable(b, device) is None:
            return b
    return "reference"
