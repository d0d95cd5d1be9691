"""Philox4x32-10 and the perturbation stream in Triton (docs/perturbations.md).

Written out here (not tl.philox) so the bit layout cannot drift with Triton releases; only
integer ops produce Rademacher values, so they are bit-identical to the C++/CUDA kernels,
compiled or under TRITON_INTERPRET=1. Every Triton kernel gets its values from the two
generators at the bottom: :func:`tile_values` (a [rows, lanes] tile of 128-column units) and
:func:`element_values` (elementwise), which share one bit -> sign mapping and one Box-Muller.
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
def rademacher_value(r0, r1, r2, r3, lane):
    """±1 from bit (lane % 128) of the 128-bit Philox output (words broadcast against lane):
    bit (lane % 32) of word (lane / 32) % 4; bit 1 -> -1."""
    q = (lane >> 5) & 3
    w = tl.where(q == 0, r0, tl.where(q == 1, r1, tl.where(q == 2, r2, r3)))
    bit = (w >> (lane & 31).to(tl.uint32)) & 1
    return 1.0 - 2.0 * bit.to(tl.float32)


@triton.jit
def box_muller_pair(wu, wa):
    """(z_cos, z_sin): the Box-Muller pair of two Philox words, u = ((wu >> 8) + 1) 2^-24,
    a = (wa >> 8) 2^-24, z = sqrt(-2 ln u) (cos, sin)(2 pi a)."""
    inv: tl.constexpr = 5.9604644775390625e-08  # 2^-24
    u = ((wu >> 8) + 1).to(tl.float32) * inv
    a = (wa >> 8).to(tl.float32) * inv
    rad = tl.sqrt(-2.0 * tl.log(u))
    # cos(2 pi a) = -cos(2 pi (a - 1/2)) (sin likewise): evaluating at |angle| <= pi keeps GPU
    # approximate sin/cos inside the range where their error bound holds.
    ang = 6.283185307179586 * (a - 0.5)
    return -(rad * tl.cos(ang)), -(rad * tl.sin(ang))


@triton.jit
def element_values(seed_lo, seed_hi, param_id, k, row, col, DIST: tl.constexpr):
    """fp32 v[row[i], col[i]] elementwise: one Philox call per element (for short 1-D chunks
    such as a bias tile, where a tile has too few elements per row to share the calls)."""
    if DIST == 0:
        r0, r1, r2, r3 = stream_words(seed_lo, seed_hi, param_id, k, row, col >> 7)
        v = rademacher_value(r0, r1, r2, r3, col)
    else:
        r0, r1, r2, r3 = stream_words(seed_lo, seed_hi, param_id, k, row, col >> 2)
        e = col & 3
        zc, zs = box_muller_pair(tl.where(e < 2, r0, r2), tl.where(e < 2, r1, r3))
        v = tl.where((e & 1) == 0, zc, zs)
    return v


@triton.jit
def tile_values(seed_lo, seed_hi, param_id, k, row, unit, lane0, C: tl.constexpr, DIST: tl.constexpr):
    """fp32 [R, C]: v[row[i], unit_i * 128 + lane0 + j] for rows `row` [R], units `unit` ([R] or
    one for all rows) and lanes lane0 .. lane0 + C - 1 of the unit (lane0 % 4 == 0, lane0 + C <= 128).

    Rademacher: one Philox call per row (its 128 bits cover the whole unit).
    Gaussian: one Philox call per 4 consecutive values (two Box-Muller pairs),
    interleaved back into column order with join + reshape.
    """
    units = row * 0 + unit
    if DIST == 0:
        r0, r1, r2, r3 = stream_words(seed_lo, seed_hi, param_id, k, row, units)
        lane = lane0 + tl.arange(0, C)
        v = rademacher_value(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane[None, :])
    else:
        chunk = units.to(tl.uint32)[:, None] * 32 + ((lane0 >> 2) + tl.arange(0, C // 4)).to(tl.uint32)[None, :]
        rowb = row.to(tl.uint32)[:, None] + chunk * 0
        r0, r1, r2, r3 = stream_words(seed_lo, seed_hi, param_id, k, rowb, chunk)
        z0, z1 = box_muller_pair(r0, r1)
        z2, z3 = box_muller_pair(r2, r3)
        # join puts the new axis last: [.., c4, j, i] = (i ? (z1, z3) : (z0, z2))[j] -> z[2j + i]
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
        v = tl.reshape(z, (row.shape[0], C))
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
