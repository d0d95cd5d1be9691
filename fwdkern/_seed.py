"""Seeds: the 64-bit seed as two 32-bit halves (the Philox key words, Triton's kernel arguments and
the wire format -- Flower ConfigRecord ints are signed 64-bit -- all split it the same way), and the
run's derived seeds."""
import hashlib

MASK32 = 0xFFFFFFFF


def split_seed(seed: int) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of a seed in [0, 2^64)."""
    return seed & MASK32, (seed >> 32) & MASK32


def join_seed(lo: int, hi: int) -> int:
    return (int(lo) & MASK32) | ((int(hi) & MASK32) << 32)


def derive_seed(base: int, *parts: int) -> int:
    """A uint64 seed from a run seed and (round, attempt, ...): stable across machines and Python versions."""
    h = hashlib.blake2b(digest_size=8)
    for x in (base, *parts):
        h.update(int(x).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little")
