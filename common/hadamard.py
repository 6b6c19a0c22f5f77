"""The randomized Hadamard rotation of DRIVE (Vargaftik et al. 2021, Section 5).

R x = H D pad(x) / sqrt(d'), with d' = 2^ceil(log2 d) (x padded with zeros), D a diagonal of
random signs drawn from `seed`, and H the d' x d' Sylvester-Hadamard matrix (H H = d' I, H
symmetric). R is orthonormal, so R^{-1} y = D H y / sqrt(d'), truncated back to d coordinates.
Both ends regenerate D from the seed; only the seed travels.

The fast Walsh-Hadamard transform takes log2(d') passes of numpy reshapes, O(d log d) in all.
"""

from __future__ import annotations

import numpy as np


def padded_size(d: int) -> int:
    """d' = the least power of two >= d (1 for d <= 1)."""
    return 1 << max(0, int(d) - 1).bit_length()


def fwht(x: np.ndarray) -> np.ndarray:
    """H x, unnormalized, for len(x) a power of two (a new float64 array)."""
    n = x.size
    if n & (n - 1):
        raise ValueError(f"fwht: length {n} is not a power of two")
    y = np.array(x, dtype=np.float64).reshape(-1)
    h = 1
    while h < n:
        # Pairs at distance h sit at [block, 0, k] and [block, 1, k]: one butterfly per pass.
        pairs = y.reshape(-1, 2, h)
        y = np.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), axis=1).reshape(n)
        h *= 2
    return y


def random_signs(seed: int, size: int) -> np.ndarray:
    """The diagonal of D: `size` values in {-1.0, +1.0} from `seed`."""
    bits = np.random.default_rng(seed).integers(0, 2, size=size, dtype=np.int8)
    return 1.0 - 2.0 * bits


def rotation(x: np.ndarray, seed: int, d: int) -> np.ndarray:
    """R x = H D pad(x) / sqrt(d'): d' = padded_size(d) values."""
    if x.size != d:
        raise ValueError(f"rotation: x has {x.size} values, expected d = {d}")
    n = padded_size(d)
    padded = np.zeros(n)
    padded[:d] = x
    return fwht(random_signs(seed, n) * padded) / np.sqrt(n)


def inverse_rotation(y: np.ndarray, seed: int, d: int) -> np.ndarray:
    """R^{-1} y = D H y / sqrt(d'), the first d coordinates."""
    n = padded_size(d)
    if y.size != n:
        raise ValueError(f"inverse_rotation: y has {y.size} values, expected d' = {n} for d = {d}")
    return (random_signs(seed, n) * fwht(y) / np.sqrt(n))[:d]
