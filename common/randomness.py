"""Randomness as a value: every random choice of round t at worker i comes from (seed, t, i).

`Randomness` carries a worker's private generator and the round's shared seed, which every
worker (and the coordinator) derives alike, so shared choices (PermK's permutation, CQ's
stratified offsets, DRIVE's rotation, MARINA's coin) are redrawn on each end instead of sent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PRIVATE_STREAM = 0x3C  # the worker's own draws (RandK indices, dithering, Bernoulli coins)
SHARED_STREAM = 0x5A  # draws every worker makes alike in a round


class Randomness(NamedTuple):
    """What a worker may draw from in one round."""

    rng: np.random.Generator  # private to (seed, t, worker_id)
    shared_seed: int  # the same for every worker in round t
    worker_id: int
    n_workers: int

    def shared(self, *tags: int) -> np.random.Generator:
        """A generator every worker gets alike this round (tags separate independent uses)."""
        return np.random.default_rng([self.shared_seed, *tags])


def round_randomness(seed: int, t: int, worker_id: int, n_workers: int) -> Randomness:
    """Worker i's randomness in round t."""
    private = np.random.default_rng([seed, t, worker_id, PRIVATE_STREAM])
    shared_seed = int(np.random.default_rng([seed, t, SHARED_STREAM]).integers(0, 2**63 - 1))
    return Randomness(private, shared_seed, worker_id, n_workers)


def fixed(seed: int = 0, worker_id: int = 0, n_workers: int = 1) -> Randomness:
    """Randomness outside a run (tests, benchmarks): round 0 of `seed`."""
    return round_randomness(seed, 0, worker_id, n_workers)
