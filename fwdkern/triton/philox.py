"""Philox4x32-10 and the perturbation stream in Triton (docs/perturbations.md).

Written out here (not tl.philox) so the bit layout cannot drift with Triton
releases; only integer ops are used, so Rademacher values are bit-identical to
the C++/CUDA kernels compiled or under TRITON_INTERPRET=1.
"""
import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """All arguments uint32 tensors (broadcastable); returns the 4 output words."""
    M0: tl.constexpr = 0xD2511F53
    M1: tl.constexpr = 0xCD9E8D57
    W0: tl.constexpr = 0x9E3779B9
    W1: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, M1) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, M0) ^ c3 ^ k1
        c1 = _c2 * M1
        c3 = _c0 * M0
        k0 = k0 + W0
        k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def stream_words(seed_lo, seed_hi, param_id, k, row, chunk):
    """Philox(counter=(chunk, row, param_id, k), key=(seed_lo, seed_hi))."""
    c0 = chunk.to(tl.uint32)
    c1 = row.to(tl.uint32)
    c2 = (c0 * 0 + param_id.to(tl.uint32)).to(tl.uint32)
    c3 = (c0 * 0 + k.to(tl.uint32)).to(tl.uint32)
    k0 = (c0 * 0 + seed_lo.to(tl.uint32)).to(tl.uint32)
    k1 = (c0 * 0 + seed_hi.to(tl.uint32)).to(tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def box_muller(r0, r1, r2, r3, e):
    """Element e (0..3) of the four N(0,1) values of one Philox output (docs/perturbations.md)."""
    wu = tl.where(e < 2, r0, r2)
    wa = tl.where(e < 2, r1, r3)
    inv: tl.constexpr = 5.9604644775390625e-08  # 2^-24
    u = ((wu >> 8) + 1).to(tl.float32) * inv
    a = (wa >> 8).to(tl.float32) * inv
    rad = tl.sqrt(-2.0 * tl.log(u))
    # cos(2 pi a) = -cos(2 pi (a - 1/2)): evaluating at |angle| <= pi keeps GPU
    # approximate sin/cos inside the range where their error bound holds.
    ang = 6.283185307179586 * (a - 0.5)
    return -tl.where((e & 1) == 0, rad * tl.cos(ang), rad * tl.sin(ang))


@triton.jit
def unit_values(seed_lo, seed_hi, param_id, k, row, unit, DIST: tl.constexpr):
    """fp32 values [BU, 128] of 128-element units `unit` [BU] of rows `row` [BU].

    DIST 0 = Rademacher (one Philox call per unit; bit (col % 128) -> sign),
    DIST 1 = Gaussian (Box-Muller; one Philox call per 4 consecutive elements).
    """
    lane = tl.arange(0, 128)
    if DIST == 0:
        r0, r1, r2, r3 = stream_words(seed_lo, seed_hi, param_id, k, row, unit)
        q = (lane >> 5)[None, :]
        w = tl.where(q == 0, r0[:, None], tl.where(q == 1, r1[:, None], tl.where(q == 2, r2[:, None], r3[:, None])))
        bit = (w >> (lane & 31).to(tl.uint32)[None, :]) & 1
        v = 1.0 - 2.0 * bit.to(tl.float32)
    else:
        chunk = unit.to(tl.uint32)[:, None] * 32 + (lane >> 2).to(tl.uint32)[None, :]
        rowb = row.to(tl.uint32)[:, None] + chunk * 0
        r0, r1, r2, r3 = stream_words(seed_lo, seed_hi, param_id, k, rowb, chunk)
        v = box_muller(r0, r1, r2, r3, (lane & 3)[None, :])
    return v


@triton.jit
def philox_words_kernel(IN, OUT, N):
    """OUT[4i..4i+3] = Philox(IN[6i..6i+3], key IN[6i+4..6i+5]) as int64: raw words for known-answer tests."""
    i = tl.arange(0, 16)
    m = i < N
    r0, r1, r2, r3 = philox4x32_10(tl.load(IN + 6 * i + 0, mask=m).to(tl.uint32), tl.load(IN + 6 * i + 1, mask=m).to(tl.uint32),
                                   tl.load(IN + 6 * i + 2, mask=m).to(tl.uint32), tl.load(IN + 6 * i + 3, mask=m).to(tl.uint32),
                                   tl.load(IN + 6 * i + 4, mask=m).to(tl.uint32), tl.load(IN + 6 * i + 5, mask=m).to(tl.uint32))
    tl.store(OUT + 4 * i + 0, r0.to(tl.int64), mask=m)
    tl.store(OUT + 4 * i + 1, r1.to(tl.int64), mask=m)
    tl.store(OUT + 4 * i + 2, r2.to(tl.int64), mask=m)
    tl.store(OUT + 4 * i + 3, r3.to(tl.int64), mask=m)
