"""One way to derive a seed from several numbers, for every stream of randomness in training."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: str | int) -> int:
    """A 63-bit seed from `parts`, the same in every process, run and Python version.

    sha256 rather than hash(): hash() of a str changes with PYTHONHASHSEED in every process, and
    additive mixes (seed * 31 + part) map many different tuples to one seed.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
