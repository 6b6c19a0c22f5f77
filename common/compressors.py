"""Compressors: `compress(x, r) -> payload` with their defining constants.

ALGORITHMS.md section 1. A contractive compressor C meets E||C(x) - x||^2 <= (1 - alpha)||x||^2;
an unbiased Q meets E Q(x) = x and E||Q(x) - x||^2 <= omega ||x||^2; an absolute one meets
||C(x) - x||^2 <= Delta^2. Every payload's values are already in the wire dtype, so the value a
worker keeps equals the value the coordinator decodes.

A compressor is a NamedTuple of a pure function and its constants (as functions of d), built by
a factory registered in `COMPRESSORS` under its config name. `compress(x, r)` draws private
randomness from `r.rng` and randomness shared by all workers of the round from `r.shared(...)`
(threepc.common.randomness).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from threepc.common.errors import ConfigError
from threepc.common.randomness import Randomness
from threepc.common.payloads import (
    DenseVector,
    IndexRule,
    SeededSparseVector,
    SparseVector,
    VectorPayload,
    seeded_indices,
    to_wire_dtype,
)

CompressFn = Callable[[np.ndarray, Randomness], VectorPayload]
ConstantFn = Callable[[int], float]


class Compressor(NamedTuple):
    """A compressor and its constants.

    `alpha(d)`: contraction constant (None if not contractive); `omega(d)`: variance constant
    (None if biased); `absolute(d)`: Delta^2 of an absolute compressor (None otherwise);
    `density(d)`: expected fraction of d values sent (zeta_Q / d, MARINA's default p).
    """

    name: str
    compress: CompressFn
    alpha: ConstantFn | None = None
    omega: ConstantFn | None = None
    absolute: ConstantFn | None = None
    density: ConstantFn = lambda d: 1.0
    deterministic: bool = True


def _seed_from(rng: np.random.Generator) -> int:
    """A fresh 63-bit seed for randomness the other end must redraw."""
    return int(rng.integers(0, 2**63 - 1))


def identity(dtype: str = "float32") -> Compressor:
    """C(x) = x: alpha = 1, omega = 0."""

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        return DenseVector(to_wire_dtype(x, dtype), dtype)

    return Compressor("identity", compress, alpha=lambda d: 1.0, omega=lambda d: 0.0)


def _check_k(k: int, name: str) -> None:
    if k < 1:
        raise ConfigError(f"{name}: k must be >= 1, got {k}")


def top_k(k: int = 1, dtype: str = "float32") -> Compressor:
    """Keep the k entries of largest |x_j| (ties: lowest index): alpha = k/d."""
    _check_k(k, "top_k")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        d = x.size
        kk = min(k, d)
        if kk == d:
            idx = np.arange(d, dtype=np.int64)
        else:
            # A stable sort on -|x| breaks ties by lowest index, as the definition asks;
            # argpartition first keeps it O(d) for the common large-d case.
            mag = np.abs(x)
            cut = np.partition(mag, d - kk)[d - kk]
            above = np.flatnonzero(mag > cut)
            at = np.flatnonzero(mag == cut)[: kk - above.size]
            idx = np.sort(np.concatenate([above, at])).astype(np.int64)
        return SparseVector(d, idx, to_wire_dtype(x[idx], dtype), dtype)

    return Compressor(
        f"top_k(k={k})",
        compress,
        alpha=lambda d: min(k, d) / d,
        density=lambda d: min(k, d) / d,
    )


def rand_k(k: int = 1, unbiased: bool = True, dtype: str = "float32") -> Compressor:
    """k coordinates uniformly without replacement, scaled by d/k if unbiased.

    Unbiased: omega = d/k - 1. Biased: alpha = k/d. Indices travel as a seed.
    """
    _check_k(k, "rand_k")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        d = x.size
        kk = min(k, d)
        seed = _seed_from(r.rng)
        idx = seeded_indices(IndexRule.RAND_K, d, seed, kk, 0, 0)
        vals = x[idx] * (d / kk) if unbiased else x[idx]
        return SeededSparseVector(IndexRule.RAND_K, seed, to_wire_dtype(vals, dtype), dtype=dtype)

    if unbiased:
        return Compressor(
            f"rand_k(k={k})",
            compress,
            omega=lambda d: d / min(k, d) - 1,
            density=lambda d: min(k, d) / d,
            deterministic=False,
        )
    return Compressor(
        f"rand_k(k={k}, unbiased=False)",
        compress,
        alpha=lambda d: min(k, d) / d,
        density=lambda d: min(k, d) / d,
        deterministic=False,
    )


def hard_threshold(threshold: float = 0.1, dtype: str = "float32") -> Compressor:
    """Keep x_j with |x_j| >= lambda: absolute, ||C(x) - x||^2 <= d lambda^2."""
    if not threshold > 0:
        raise ConfigError(f"hard_threshold: threshold must be > 0, got {threshold}")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        idx = np.flatnonzero(np.abs(x) >= threshold).astype(np.int64)
        return SparseVector(x.size, idx, to_wire_dtype(x[idx], dtype), dtype)

    return Compressor(
        f"hard_threshold(threshold={threshold})",
        compress,
        absolute=lambda d: d * threshold**2,
    )


# Config name -> factory. Every factory takes keyword parameters with defaults that run, and
# `dtype`, the wire dtype of values, which the run's config supplies.
COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "identity": identity,
    "top_k": top_k,
    "rand_k": rand_k,
    "hard_threshold": hard_threshold,
}


def make_compressor(name: str, params: dict[str, object], dtype: str) -> Compressor:
    """Build a registered compressor from config, with a clear error for unknown names/params."""
    return _build(COMPRESSORS, "compressor", name, {**params, "dtype": dtype})


def _build(registry: dict[str, Callable[..., Compressor]], what: str, name: str, params: dict) -> Compressor:
    import inspect

    factory = registry.get(name)
    if factory is None:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    sig = inspect.signature(factory)
    unknown = sorted(set(params) - set(sig.parameters))
    if unknown:
        raise ConfigError(
            f"{what} {name!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"takes {', '.join(p for p in sig.parameters if p != 'dtype')}"
        )
    return factory(**params)


def sqrt_one_minus(a: float) -> float:
    """sqrt(1 - a), clipped at 0 for a = 1 up to rounding."""
    return math.sqrt(max(0.0, 1.0 - a))
