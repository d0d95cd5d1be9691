"""Backend registry: which implementation runs an op, and why another one cannot.

Everything about which backend can run what lives here and nowhere else:

* ``IMPLEMENTED``: op -> backend -> what runs (every op has all four backends; the ``quant_*``
  ops are the frozen linear and LoRA ops on an int8 / int4 base, ``dequantize`` the float copy of
  such a base);
* the conditions under which an implemented backend still cannot run a call: the device and
  build rule of each backend (:func:`_device_rule`) and ``RULES`` (the Triton interpreter's
  missing bfloat16, the Triton attention kernel's shape limits);
* ``AUTO``: the automatic order per device type;
* the implementations themselves, registered by their modules with
  ``@backends.register(op, backend)`` (``fwdkern/ops/_cpu.py``, ``_cuda.py``,
  ``_triton.py``, ``reference*.py``) and imported only when a call resolves to them.

Order of precedence: the per-call ``backend=`` argument, then the ``FWDKERN_BACKEND``
environment variable, then the automatic order of ``AUTO`` (:func:`resolve`). Automatic choice
(:func:`automatic`) silently skips backends that cannot run the call (e.g. to the reference when
the extension is missing); a backend that is *requested* but cannot run raises
:class:`BackendUnavailable` saying why. ``dequantize``, the float copy of a quantized weight for
code around the ops, takes the automatic order alone (fwdkern/ops/_qformat.py says why).

Backends: ``cpu`` (C++ kernels in fwdkern._C), ``cuda`` (CUDA kernels in fwdkern._C),
``triton`` (GPU, or CPU under TRITON_INTERPRET=1), ``reference`` (pure PyTorch).

GPU performance choices are not yet measured on a GPU: the ``AUTO`` order for CUDA tensors, the
cuda backend's compositions and its CUDA-core seeded matmul (csrc/cuda/lora_ops.cu), the Triton
tile sizes, autotune lists and loop structures (fwdkern/triton/). The comments beside them give
the reasoning; ``scripts/gpu_check.sh`` times the candidates, and bench/results/README.md ("GPU
choices not yet measured") lists each choice with its measurement plan.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")
OPS = ("perturbation", "seeded_axpy_", "seeded_dot", "seeded_matmul", "lora_linear_dual", "lora_linear_perturbed",
       "dual_attention", "quant_linear_dual", "quant_lora_linear_dual", "quant_lora_linear_perturbed", "dequantize")

# Backend names an op accepts besides BACKENDS (kept for existing callers).
ALIASES = {"dual_attention": {"torch": "reference"}}

_SEEDED_IMPL = {"cpu": "C++ kernel (csrc/cpu/seeded_ops.cpp)", "cuda": "CUDA kernel (csrc/cuda/seeded_ops.cu)",
                "triton": "Triton kernel (fwdkern/triton/seeded.py)",
                "reference": "materialized stream (fwdkern/ops/reference.py)"}
_LORA_IMPL = {"cpu": "torch GEMMs + C++ shrink/expand kernels (csrc/cpu/lora_ops.cpp)",
              "cuda": "torch GEMMs + CUDA seeded matmul (csrc/cuda/lora_ops.cu), fwdkern/ops/_compose.py",
              "triton": "fused Triton kernels (fwdkern/triton/lora.py)",
              "reference": "materialized perturbations (fwdkern/ops/reference_lora.py)"}
_CHUNKED = "chunked pure-torch dual attention (fwdkern/ops/reference_attention.py)"
_BLOCK = "one-block pure-torch dual attention, chunked past `chunk` keys (fwdkern/ops/reference_attention.py)"
# Quantized frozen base (int8 per channel / int4 group-wise, fwdkern/ops/_qformat.py): what runs the
# dense GEMM over the (1+K)·M stacked rows; the low-rank parts are those of the float ops.
# The cpu backend dequantizes one layer at a time (row blocks for a large LM head) and runs torch's
# fp32 GEMM; fp16/bf16 activations are computed in fp32 and rounded once. NOTE (cpu): the alternatives
# were timed by hand on the 2-core CPU of bench/results/ and lost, in no committed result: torch's
# weight-only kernels (aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu) fall back to scalar
# code for fp32 activations and round the tangents to bf16 with bf16 activations; torch's bf16 GEMM
# is slower than its fp32 one there; torchao's int8 weight-only tensor is a cast plus the same GEMM,
# and its int4 CPU path needs a package that does not install here. What the choice costs a whole
# model (int8 / int4 step against fp32): bench/results/quant_cpu_2026-12-01.md.
_QUANT_DENSE = {"cpu": "C++ dequantization (csrc/cpu/quant_ops.cpp), one layer at a time, + torch fp32 GEMM",
                "cuda": "dequantization (torch ops) + torch GEMM in x's dtype, fwdkern/ops/_compose.py",
                "triton": "dequant-in-registers Triton kernel (fwdkern/triton/lora.py: int8 per-channel scale "
                          "after the K loop, int4 nibbles x group scale + offset per tile)",
                "reference": "dequantize (fwdkern/ops/_qformat.py), then the float reference"}
_QUANT_LORA = {"cpu": _QUANT_DENSE["cpu"] + "; low-rank parts: the cpu float op",
               "cuda": _QUANT_DENSE["cuda"] + "; low-rank parts: CUDA seeded matmul",
               "triton": _QUANT_DENSE["triton"] + "; low-rank parts fused as in the float kernels",
               "reference": "dequantize (fwdkern/ops/_qformat.py), then materialized perturbations "
                            "(fwdkern/ops/reference_lora.py)"}
# The float copy of a quantized weight (QuantizedWeight.dequantize: a QuantLinear's backward, the LM
# head's row blocks, dequantize_base). The GPU backends' quantized ops dequantize inside their own
# code; their copy for everything else is torch ops on the device.
_TORCH_DEQUANT = "torch ops on the tensors' device (fwdkern/ops/_qformat.py: dequantize_reference)"
_DEQUANT = {"cpu": "C++ dequantization (csrc/cpu/quant_ops.cpp)", "cuda": _TORCH_DEQUANT, "triton": _TORCH_DEQUANT,
            "reference": _TORCH_DEQUANT}

# op -> backend -> what runs.
IMPLEMENTED = {
    "perturbation": _SEEDED_IMPL,
    "seeded_axpy_": _SEEDED_IMPL,
    "seeded_dot": _SEEDED_IMPL,
    "seeded_matmul": {**_LORA_IMPL, "cpu": "C++ seeded matmul (csrc/cpu/lora_ops.cpp)",
                      "cuda": "CUDA seeded matmul (csrc/cuda/lora_ops.cu)"},
    "lora_linear_dual": _LORA_IMPL,
    "lora_linear_perturbed": {**_LORA_IMPL, "cpu": "torch GEMMs + C++ seeded matmul, fwdkern/ops/_compose.py"},
    # No hand-written cpu/cuda attention kernel: those backends run the torch path on their device
    # (it is matmul-bound, torch's kernels do the work), so FWDKERN_BACKEND=cpu|cuda still runs
    # whole models.
    "dual_attention": {"cpu": _BLOCK, "cuda": _BLOCK, "reference": _CHUNKED,
                       "triton": "Triton flash-style kernel (fwdkern/triton/attention.py)"},
    "quant_linear_dual": _QUANT_DENSE,
    "quant_lora_linear_dual": _QUANT_LORA,
    "quant_lora_linear_perturbed": _QUANT_LORA,
    "dequantize": _DEQUANT,
}

# Automatic choice per device type, first backend that can run the call wins.
# CUDA tensors try the CUDA kernels first for the seeded ops (one Philox call per 128 elements per k,
# shared across a warp with shuffles) and the fused Triton kernels first for the LoRA ops (the cuda
# backend composes torch GEMMs with a CUDA-core seeded matmul); scripts/gpu_check.sh times cuda
# against triton for both, and the order follows its numbers (see the module docstring).
AUTO = {
    "cpu": {op: ("cpu", "reference") for op in OPS},
    "cuda": {
        "perturbation": ("cuda", "triton", "reference"),
        "seeded_axpy_": ("cuda", "triton", "reference"),
        "seeded_dot": ("cuda", "triton", "reference"),
        "seeded_matmul": ("triton", "cuda", "reference"),
        "lora_linear_dual": ("triton", "cuda", "reference"),
        "lora_linear_perturbed": ("triton", "cuda", "reference"),
        "dual_attention": ("triton", "cuda", "reference"),
        # The dequant-in-registers kernel reads int8/int4 tiles (1/4-1/8 of the fp32 bytes) once for
        # all 1+K row sets; the cuda composition writes a float copy of each layer first.
        "quant_linear_dual": ("triton", "cuda", "reference"),
        "quant_lora_linear_dual": ("triton", "cuda", "reference"),
        "quant_lora_linear_perturbed": ("triton", "cuda", "reference"),
        "dequantize": ("cuda", "reference"),
    },
}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here (not built, no device, no triton, unsupported dtype...)."""


# ----------------------------------------------------------------------------- probes


# Probe results, computed once. Plain module state rather than functools.lru_cache: torch.compile
# traces through these calls (resolve runs inside compiled regions) and ignores lru_cache wrappers.
_PROBES: dict = {}


def _ext():
    if "ext" not in _PROBES:
        try:
            from . import _C

            _PROBES["ext"] = _C
        except ImportError as e:  # pragma: no cover - exercised only on broken installs
            _PROBES["ext"] = e
    return _PROBES["ext"]


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


def has_triton() -> bool:
    if "triton" not in _PROBES:
        try:
            import triton  # noqa: F401

            _PROBES["triton"] = True
        except Exception:
            _PROBES["triton"] = False
    return _PROBES["triton"]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- rules


def _device_rule(backend: str, device: torch.device) -> Optional[str]:
    """None if `backend` can run on tensors of `device` at all, else the reason."""
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
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    return f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})"


@dataclass(frozen=True)
class Rule:
    """A condition under which `backends` cannot run `ops` although they are implemented.

    The rule holds for tensors on devices where ``where(device)`` is True, and refuses the
    calls for which ``refuses(facts)`` is True; ``facts`` are what the op's validation passes
    to :func:`resolve` (``dtype=``, ``fits=``). A requested backend that a rule refuses raises
    ``error`` with ``reason``; automatic choice moves on to the next backend.
    """

    reason: str
    backends: tuple
    ops: tuple
    refuses: Callable[[dict], bool]
    where: Callable[[torch.device], bool] = lambda device: True
    error: type = BackendUnavailable


RULES = (
    Rule("bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use float32/float16 or "
         "another backend", ("triton",), OPS, refuses=lambda facts: facts.get("dtype") == torch.bfloat16,
         where=lambda device: device.type == "cpu"),
    Rule("needs 4-D [B, H, T, D] inputs with the value head dim equal to D", ("triton",), ("dual_attention",),
         refuses=lambda facts: not facts.get("fits", True), error=ValueError),
)


def _rules(op: str, backend: str, device: torch.device):
    return [r for r in RULES if backend in r.backends and op in r.ops and r.where(device)]


def _refusal(op: str, backend: str, device: torch.device, facts: dict):
    """(exception type, reason) when `backend` cannot run this call of `op`, else None."""
    if backend not in IMPLEMENTED[op]:
        return BackendUnavailable, f"backend {backend!r} has no {op} implementation"
    why = _device_rule(backend, device)
    if why is not None:
        return BackendUnavailable, why
    for rule in _rules(op, backend, device):
        if rule.refuses(facts):
            return rule.error, rule.reason
    return None


def available(backend: str, device) -> bool:
    """Whether `backend` can run on tensors of `device` (build and device rules only)."""
    return _device_rule(backend, torch.device(device)) is None


def support_table(device="cpu") -> list:
    """Rows (op, backend, available, note) for tensors on `device`: the note says why a backend
    cannot run, or what runs followed by the rules that still limit it there."""
    device = torch.device(device)
    rows = []
    for op in OPS:
        for b in BACKENDS:
            why = _device_rule(b, device) if b in IMPLEMENTED[op] else f"no {op} implementation"
            if why is not None:
                rows.append((op, b, False, why))
            else:
                rows.append((op, b, True, "; ".join([IMPLEMENTED[op][b]] + [r.reason for r in _rules(op, b, device)])))
    return rows


def _requested(op: str, backend: Optional[str]) -> Optional[str]:
    requested = backend if backend not in (None, "", "auto") else os.environ.get("FWDKERN_BACKEND", "").strip() or None
    if requested in (None, "auto"):
        return None
    requested = ALIASES.get(op, {}).get(requested, requested)
    if requested not in BACKENDS:
        names = ", ".join(("auto",) + BACKENDS + tuple(ALIASES.get(op, ())))
        raise ValueError(f"backend: unknown backend {requested!r} (expected one of {names})")
    return requested


def resolve(op: str, device, backend: Optional[str] = None, **facts) -> str:
    """The backend that runs `op` on tensors of `device`.

    facts: properties of the call the rules look at (``dtype=``, ``fits=``).
    """
    device = torch.device(device)
    requested = _requested(op, backend)
    if requested is not None:
        refusal = _refusal(op, requested, device, facts)
        if refusal is not None:
            error, why = refusal
            if error is BackendUnavailable:
                raise BackendUnavailable(f"{op}: requested backend {requested!r} is unavailable: {why}")
            raise error(f"{op}: backend {requested!r} {why}")
        return requested
    return automatic(op, device, **facts)


def automatic(op: str, device, **facts) -> str:
    """The first backend of ``AUTO`` that can run `op` on tensors of `device` (no request consulted)."""
    device = torch.device(device)
    for b in AUTO.get(device.type, {}).get(op, ("reference",)):
        if _refusal(op, b, device, facts) is None:
            return b
    return "reference"


# ----------------------------------------------------------------------------- implementations

_IMPLS: dict = {}
_IMPL_MODULES = {
    "cpu": ("fwdkern.ops._cpu",),
    "cuda": ("fwdkern.ops._cuda",),
    "triton": ("fwdkern.ops._triton",),
    "reference": ("fwdkern.ops.reference", "fwdkern.ops.reference_lora", "fwdkern.ops.reference_attention",
                  "fwdkern.ops.reference_quant"),
}


def register(op: str, backend: str):
    """Decorator: `fn` implements `op` on `backend` (signature: the op's custom-op arguments
    without ``backend``, already validated; the seed as an unsigned int)."""
    if op not in OPS or backend not in BACKENDS:
        raise ValueError(f"register: unknown op {op!r} or backend {backend!r}")

    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def implementation(op: str, backend: str) -> Callable:
    """The function registered for (op, backend), importing its module on first use."""
    fn = _IMPLS.get((op, backend))
    if fn is None:
        for module in _IMPL_MODULES[backend]:
            importlib.import_module(module)
        fn = _IMPLS.get((op, backend))
    if fn is None:  # pragma: no cover - IMPLEMENTED and the modules disagree (tests/test_backends.py)
        raise BackendUnavailable(f"{op}: backend {backend!r} registered no implementation")
    return fn
