"""Seeds drawn from the run's seed and where training is, never from a generator's history."""

from __future__ import annotations


def mix_seed(seed: int, *parts: int) -> int:
    """One seed from the run's seed and `parts` (epoch, batch, sample index...) alone: the
    same in every process and after every resume."""
    for part in parts:
        seed = (seed * 1_000_003 + part) % (1 << 63)
    return seed
