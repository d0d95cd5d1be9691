"""The 64-bit seed as two 32-bit halves: the Philox key words, Triton's kernel arguments and the
wire format (Flower ConfigRecord ints are signed 64-bit) all split it the same way."""

MASK32 = 0xFFFFFFFF


def split_seed(seed: int) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of a seed in [0, 2^64)."""
    return seed & MASK32, (seed >> 32) & MASK32


def join_seed(lo: int, hi: int) -> int:
    return (int(lo) & MASK32) | ((int(hi) & MASK32) << 32)
