"""Seeds hashed from text: the same on every platform, Python version and process, so randomness drawn from them
is a pure function of what names it (a run seed, a purpose, a sample's (epoch, index))."""
from __future__ import annotations

import hashlib

__all__ = ["seed63", "sample_seed"]


def seed63(text: str) -> int:
    """A non-negative 63-bit seed hashed from ``text``."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(seed: int, purpose: str, key: tuple[int, int]) -> int:
    """A seed for one sample's randomness: a pure function of (run seed, purpose, (epoch, index))."""
    return seed63(f"{seed}/{purpose}/{key[0]}/{key[1]}")
