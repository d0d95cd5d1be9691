"""Weight-only quantization formats of the frozen base: int8 per channel, int4 group-wise.

A weight W [out, in] (row n = output channel n; an embedding [V, d] is stored the same way,
so a tied embedding / LM head shares one quantized tensor) is kept as

* ``bits=8``: ``qdata`` int8 [out, in], ``scales`` fp32 [out, 1]; ``w[n, d] = q[n, d] * s[n]``
  (symmetric, round to nearest, ``s = max|W[n]| / 127``);
* ``bits=4``: ``qdata`` uint8 [out, ceil(in / 2)] (column d in byte d // 2, low nibble for even d),
  ``scales`` and ``offsets`` fp32 [out, G] with G = ceil(in / group_size);
  ``w[n, d] = q * s[n, g] + m[n, g]`` with g = d // group_size, q in [0, 15] (asymmetric min-max,
  round to nearest: ``m`` = the group's minimum, ``s = (max - min) / 15``).

A group size that does not divide ``in`` is accepted: the last group of each row is shorter and
has its own scale and offset over the columns it has (nothing is padded, in the weight or in x).
The group size must be even (a byte never holds two groups). The quantizer's error is at most
half a step per element: ``|w - W| <= s / 2`` (plus fp32 rounding), the bound the tests use.

The format imports no backend and no op: :meth:`QuantizedWeight.dequantize` runs the ``dequantize``
implementation the registry (fwdkern/backends.py) picks, and every backend and op module can import
this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends

F32 = torch.float32
BITS = (8, 4)
QUANT_NAMES = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 64
# Rows quantized at a time: bounds the fp32 temporaries of a large matrix (a 262k-token embedding).
_ROW_CHUNK = 8192
# Dequantized rows at a time when a whole matrix would be a large float temporary (a 262k-token
# LM head is 671 MB in fp32); LoRA-sized layers (a few M elements) are dequantized whole.
CHUNK_ELEMENTS = 1 << 22


def parse_quant(name, what: str = "base_quant") -> Optional[int]:
    """'int8' -> 8, 'int4' -> 4, None -> None."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in QUANT_NAMES:
        raise ValueError(f"{what}: expected 'int8', 'int4' or None, got {name!r}")
    return QUANT_NAMES[name]


def check_group_size(group_size, what: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{what}: expected an int, got {type(group_size).__name__}")
    if group_size < 2 or group_size % 2 or group_size > (1 << 20):
        raise ValueError(f"{what}: expected an even int in [2, 2^20] (int4 packs two columns per byte and a byte "
                         f"never holds two groups), got {group_size}")
    return group_size


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A frozen weight [out_features, in_features] in one of the formats of this module.

    Pass it as ``weight`` to :func:`fwdkern.lora_linear_dual` / :func:`fwdkern.lora_linear_perturbed`
    or to :func:`fwdkern.ops.quant.quant_linear_dual`; :meth:`dequantize` gives the float weight the
    quantized model computes with (the reference every backend is tested against).
    """

    qdata: torch.Tensor
    scales: torch.Tensor
    offsets: Optional[torch.Tensor]
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.offsets) if t is not None)

    def tensors(self) -> tuple:
        return self.qdata, self.scales, self.offsets

    def op_args(self) -> tuple:
        """The custom-op arguments that carry this weight: (qdata, scales, offsets, bits, group_size);
        the op rebuilds it with ``QuantizedWeight(*args, in_features=x.shape[-1])``."""
        return self.qdata, self.scales, self.offsets, self.bits, self.group_size

    def rows(self, index) -> "QuantizedWeight":
        """The rows `index` (a slice or an index tensor) as a QuantizedWeight (views for a slice)."""
        return QuantizedWeight(self.qdata[index], self.scales[index],
                               None if self.offsets is None else self.offsets[index], self.bits, self.group_size,
                               self.in_features)

    def dequantize(self, dtype=F32) -> torch.Tensor:
        """The float weight [out, in] in `dtype`, computed by the registry's automatic choice for this
        device (C++ kernel on CPU when built, torch ops elsewhere: ``IMPLEMENTED["dequantize"]``).
        FWDKERN_BACKEND does not apply: it picks the kernels of the ops, which dequantize inside their
        own backend; this copy serves code around them (a QuantLinear's backward, the LM head's rows)."""
        return backends.implementation("dequantize", backends.automatic("dequantize", self.device))(self, dtype)

    def __repr__(self):
        g = "per channel" if self.bits == 8 else f"group_size={self.group_size}"
        return f"QuantizedWeight(int{self.bits}, [{self.out_features}, {self.in_features}], {g})"


def check_quantized(w: QuantizedWeight, name: str = "weight") -> None:
    """The invariants of the format (dtypes, shapes, layout) every op relies on."""
    q, s, m = w.qdata, w.scales, w.offsets
    if w.bits not in BITS:
        raise ValueError(f"{name}: bits must be 8 or 4, got {w.bits!r}")
    if not (isinstance(w.in_features, int) and w.in_features >= 0):
        raise ValueError(f"{name}: in_features must be a non-negative int, got {w.in_features!r}")
    if q.dim() != 2 or s.dim() != 2 or s.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: qdata [out, *] and scales [out, G] expected, got {tuple(q.shape)}, {tuple(s.shape)}")
    if s.dtype != F32 or (m is not None and m.dtype != F32):
        raise TypeError(f"{name}: scales/offsets must be float32, got {s.dtype}"
                        f"{'' if m is None else ', ' + str(m.dtype)}")
    for t, tn in ((q, "qdata"), (s, "scales")) + (((m, "offsets"),) if m is not None else ()):
        if t.device != q.device:
            raise ValueError(f"{name}: {tn} on {t.device}, qdata on {q.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: {tn} must be contiguous")
    if w.bits == 8:
        if q.dtype != torch.int8 or q.shape[1] != w.in_features or s.shape[1] != 1 or m is not None:
            raise ValueError(f"{name}: int8 expects qdata int8 [out, {w.in_features}], scales [out, 1], no offsets")
    else:
        check_group_size(w.group_size, f"{name}.group_size")
        G = -(-w.in_features // w.group_size)
        if q.dtype != torch.uint8 or q.shape[1] != (w.in_features + 1) // 2:
            raise ValueError(f"{name}: int4 expects qdata uint8 [out, {(w.in_features + 1) // 2}], got {q.dtype} "
                             f"{tuple(q.shape)}")
        if s.shape[1] != G or m is None or tuple(m.shape) != tuple(s.shape):
            raise ValueError(f"{name}: int4 expects scales and offsets [out, {G}]")


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
    """Round-to-nearest weight-only quantization of a float [out, in] tensor (int8: per channel,
    int4: groups of `group_size` columns). Rows are processed in chunks, so the fp32 temporaries of a
    large matrix stay small. Non-finite weights are refused."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError("weight: expected a 2-D float tensor [out, in]")
    if bits not in BITS:
        raise ValueError(f"bits: expected 8 or 4, got {bits!r}")
    if bits == 4:
        group_size = check_group_size(group_size)
    out_f, in_f = weight.shape
    dev = weight.device
    if bits == 8:
        q = torch.empty((out_f, in_f), dtype=torch.int8, device=dev)
        s = torch.empty((out_f, 1), dtype=F32, device=dev)
        m = None
    else:
        G = -(-in_f // group_size)
        q = torch.empty((out_f, (in_f + 1) // 2), dtype=torch.uint8, device=dev)
        s = torch.empty((out_f, G), dtype=F32, device=dev)
        m = torch.empty((out_f, G), dtype=F32, device=dev)
    if in_f == 0:  # nothing to quantize (an empty int8 row keeps scale 1; int4 has no groups)
        s.fill_(1.0)
        return QuantizedWeight(q, s, m, bits, in_f if bits == 8 else group_size, in_f)
    for r0 in range(0, out_f, _ROW_CHUNK):
        w = weight[r0:r0 + _ROW_CHUNK].to(F32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weight: contains inf or nan; cannot quantize")
        if bits == 8:
            sc = w.abs().amax(1, keepdim=True) / 127
            sc = torch.where(sc > 0, sc, torch.ones_like(sc))
            q[r0:r0 + _ROW_CHUNK] = torch.round(w / sc).clamp_(-127, 127).to(torch.int8)
            s[r0:r0 + _ROW_CHUNK] = sc
            continue
        rows = w.shape[0]
        pad = G * group_size - in_f
        # Padding repeats the row's last column: it lies in the last group, so min/max are unchanged.
        wp = torch.cat([w, w[:, -1:].expand(rows, pad)], 1) if pad else w
        wg = wp.reshape(rows, G, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        sc = (hi - lo) / 15
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        qq = torch.round((wg - lo[..., None]) / sc[..., None]).clamp_(0, 15).to(torch.uint8).reshape(rows, -1)
        qq = qq[:, :in_f]
        if in_f % 2:
            qq = torch.cat([qq, qq.new_zeros((rows, 1))], 1)
        q[r0:r0 + _ROW_CHUNK] = qq[:, 0::2] | (qq[:, 1::2] << 4)
        s[r0:r0 + _ROW_CHUNK] = sc
        m[r0:r0 + _ROW_CHUNK] = lo
    return QuantizedWeight(q, s, m, bits, in_f if bits == 8 else group_size, in_f)


def dequantize_reference(w: QuantizedWeight, dtype=F32) -> torch.Tensor:
    """The float weight in plain torch ops (the reference backend; any device)."""
    out_f, in_f = w.out_features, w.in_features
    if w.bits == 8:
        return (w.qdata.to(F32) * w.scales).to(dtype)
    q = torch.stack((w.qdata & 15, w.qdata >> 4), -1).reshape(out_f, -1)[:, :in_f].to(F32)
    gs = w.group_size
    s = w.scales.repeat_interleave(gs, 1)[:, :in_f]
    m = w.offsets.repeat_interleave(gs, 1)[:, :in_f]
    return (q * s + m).to(dtype)


def step_size(w: QuantizedWeight) -> torch.Tensor:
    """fp32 [out, in]: the quantization step of every element (s of its row / group)."""
    return w.scales.repeat_interleave(w.group_size if w.bits == 4 else max(w.in_features, 1), 1)[:, :w.in_features]


def dense_chunks(weight: QuantizedWeight, dtype, dequantize=None):
    """(n0, n1, W[n0:n1] dequantized in `dtype`) over row blocks of at most CHUNK_ELEMENTS elements.

    dequantize(weight, dtype): a backend's own dequantization (default :meth:`QuantizedWeight.dequantize`)."""
    out_f, in_f = weight.shape
    rows = max(1, CHUNK_ELEMENTS // max(in_f, 1))
    deq = dequantize or (lambda w, dt: w.dequantize(dt))
    if rows >= out_f:
        yield 0, out_f, deq(weight, dtype)
        return
    for n0 in range(0, out_f, rows):
        n1 = min(out_f, n0 + rows)
        yield n0, n1, deq(weight.rows(slice(n0, n1)), dtype)
