"""Compressors: `compress(x, r) -> payload` with their defining constants.

ALGORITHMS.md section 1. A contractive compressor C meets E||C(x) - x||^2 <= (1 - alpha)||x||^2;
an unbiased Q meets E Q(x) = x and E||Q(x) - x||^2 <= omega ||x||^2; an absolute one meets
||C(x) - x||^2 <= Delta^2. Every payload's values are already in the wire dtype, so the value a
worker keeps equals the value the coordinator decodes. Norms, scales and ranges are metered as
32-bit figures (payloads.SCALE_BITS), so they are rounded to float32 here (rounded up where a
norm bounds the entries, so that every level stays in range and the rounding stays unbiased).

A compressor is a NamedTuple of a pure function and its constants (as functions of d), built by
a factory registered in `COMPRESSORS` under its config name. `compress(x, r)` draws private
randomness from `r.rng` and randomness shared by all workers of the round from `r.shared(...)`
(threepc.common.randomness).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from threepc.common import hadamard
from threepc.common.config import check_types
from threepc.common.errors import ConfigError
from threepc.common.payloads import (
    SCALE_BITS,
    Chosen,
    DenseVector,
    Grid,
    IndexRule,
    Kinds,
    PartKind,
    QuantizedVector,
    SeededQuantizedVector,
    SeededSparseVector,
    SignVector,
    SparseVector,
    VectorPayload,
    perm_k_block,
    seeded_indices,
    to_wire_dtype,
    value_bits,
)
from threepc.common.randomness import Randomness

CompressFn = Callable[[np.ndarray, Randomness], VectorPayload]
ConstantFn = Callable[[int], float]
WorkersFn = Callable[[int, int], Any]  # (d, n) -> a constant that depends on the n workers too


class Compressor(NamedTuple):
    """A compressor and its constants.

    `alpha(d)`: contraction constant (None if not contractive); `omega(d)`: variance constant
    (None if biased, or if it depends on the number of workers n); `absolute(d)`: Delta^2 of an
    absolute compressor (None otherwise); `density(d)`: expected fraction of a dense message
    sent (zeta_Q / d, MARINA's default p): values sent / d for sparsifiers, payload bits /
    (d * bits of a wire value) for quantizers; for a compressor whose share depends on n, the
    fraction at n = 1 (see `density_n`).

    Compressors whose workers share randomness (PermK, CQ, PermK + CQ) have constants that
    depend on n: `ab(d, n)` gives (A, B) of the AB-inequality of the mean of the n outputs,
    E||mean_i Q_i(a_i) - mean_i a_i||^2 <= A mean_i ||a_i||^2 - B ||mean_i a_i||^2 (Szlendak et
    al. 2021), None where not known; `density_n(d, n)` the fraction at n workers.

    `emits`: the payload kinds (`PartKind`) `compress` may return; a mechanism's message forms
    are built from them, and a decoder refuses any other kind in that place.

    `flag_bits`: bits the compressor's own choice costs on top of its payload (the Bernoulli
    wrapper's coin); a payload cannot carry them, so the mechanism adds them to the Message's
    `flag_bits`.
    """

    name: str
    compress: CompressFn
    alpha: ConstantFn | None = None
    omega: ConstantFn | None = None
    absolute: ConstantFn | None = None
    density: ConstantFn = lambda d: 1.0
    deterministic: bool = True
    ab: WorkersFn | None = None
    density_n: WorkersFn | None = None
    flag_bits: int = 0
    emits: Kinds = frozenset()  # the kinds of payload `compress` returns: the codec refuses others


def _seed_from(rng: np.random.Generator) -> int:
    """A fresh 63-bit seed for randomness the other end must redraw."""
    return int(rng.integers(0, 2**63 - 1))


def identity(dtype: str = "float32") -> Compressor:
    """C(x) = x: alpha = 1, omega = 0."""

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        return DenseVector(to_wire_dtype(x, dtype), dtype)

    return Compressor("identity", compress, alpha=lambda d: 1.0, omega=lambda d: 0.0, emits=_kind(DenseVector))


def _check_k(k: int, name: str) -> None:
    if k < 1:
        raise ConfigError(f"{name}: k must be >= 1, got {k}")


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """The sorted coordinates of the k entries of largest |x_j|, ties broken by lowest index.

    The k-th largest magnitude `cut` comes from a partition (O(d)); everything above it is in,
    and of the entries equal to it the lowest-indexed fill the rest. Gradient differences are
    often mostly zeros, on which numpy's introselect slows down 10x or more: the partition then
    runs over the nonzero entries only (zeros can only be picked after every nonzero).
    The nonzeros are found on a boolean mask: numpy's nonzero on float64 is 6x slower
    (3.4 ms vs 0.6 ms at d = 1e6).
    """
    is_nonzero = x != 0
    nonzero = np.count_nonzero(is_nonzero)
    if nonzero <= k:  # every nonzero, then the lowest-indexed zeros
        idx = np.flatnonzero(is_nonzero)
        if nonzero < k:
            # The first k - nonzero zeros lie among the first k coordinates: look only there.
            zeros = np.flatnonzero(x[:k] == 0)[: k - nonzero]
            idx = np.sort(np.concatenate([idx, zeros]), kind="stable")  # merges the two sorted runs
        return idx.astype(np.int64, copy=False)
    support = np.flatnonzero(is_nonzero) if nonzero < x.size // 2 else None
    mag = np.abs(x if support is None else x[support])
    cut = _kth_largest(mag, k)
    above = np.flatnonzero(mag > cut)
    at = np.flatnonzero(mag == cut)[: k - above.size]
    idx = np.concatenate([above, at])
    idx.sort(kind="stable")  # two sorted runs: timsort merges them (0.01 ms against 0.26 at k = 1e4)
    return (idx if support is None else support[idx]).astype(np.int64, copy=False)


def _kth_largest(mag: np.ndarray, k: int) -> np.floating:
    """The k-th largest entry of `mag` (1 <= k <= mag.size).

    numpy's introselect degrades when the k-th entry lies in a long run of equal values: binary
    features over a few rows give gradients of a handful of distinct magnitudes, and there a
    partition at m = 1e6 took 76 ms against 6 ms for a full sort (1.1 against 0.13 ms at
    m = 2e4). So where an evenly spaced probe of 64 entries repeats itself, the array is sorted.
    """
    m = mag.size
    probe = mag[:: max(1, m // 64)]
    if 2 * np.unique(probe).size <= probe.size:
        return np.sort(mag)[m - k]
    return np.partition(mag, m - k)[m - k]


def top_k(k: int = 1, dtype: str = "float32") -> Compressor:
    """Keep the k entries of largest |x_j| (ties: lowest index): alpha = k/d."""
    _check_k(k, "top_k")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        d = x.size
        kk = min(k, d)
        idx = np.arange(d, dtype=np.int64) if kk == d else top_k_indices(x, kk)
        return SparseVector(d, idx, to_wire_dtype(x[idx], dtype), dtype)

    return Compressor(
        f"top_k(k={k})",
        compress,
        alpha=lambda d: min(k, d) / d,
        density=lambda d: min(k, d) / d,
        emits=_kind(SparseVector),
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
            emits=_kind(SeededSparseVector),
        )
    return Compressor(
        f"rand_k(k={k}, unbiased=False)",
        compress,
        alpha=lambda d: min(k, d) / d,
        density=lambda d: min(k, d) / d,
        deterministic=False,
        emits=_kind(SeededSparseVector),
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
        emits=_kind(SparseVector),
    )


# ----------------------------------------------------------------------------- helpers


def _kind(payload: type) -> Kinds:
    return frozenset({PartKind(payload)})


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def _f32_up(v: float) -> float:
    """The least float32 >= v: a scale that travels as 32 bits without shrinking the range."""
    f = np.float32(v)
    if float(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def _f32_down(v: float) -> float:
    """The greatest float32 <= v."""
    f = np.float32(v)
    if float(f) > v:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _f32(v: float) -> float:
    """v rounded to the nearest float32 (a scale whose exact value does not matter)."""
    return float(np.float32(v))


def _level_bits(count: int) -> int:
    """ceil(log2 count): bits of a code in [0, count), at least 1."""
    return max(1, (count - 1).bit_length())


def _fraction(bits: float, d: int, dtype: str) -> float:
    """A payload's size as a fraction of d wire values (MARINA's p = zeta_Q / d)."""
    return min(1.0, bits / (d * value_bits(dtype)))


def _check_int(value: int, low: int, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: {what} must be an integer >= {low}, got {value!r}")


def _stochastic_levels(t: np.ndarray, u: np.ndarray, top: int) -> np.ndarray:
    """floor(t) + 1{u < frac(t)}, clipped to [0, top]: unbiased rounding of t to an integer."""
    low = np.floor(t)
    return np.minimum(low + (u < t - low), top).astype(np.uint32)


# Tags of r.shared(...) streams: each use of the round's shared randomness draws its own.
_PERM_K_TAG = 1
_CQ_TAG = 2
_PERM_K_CQ_TAG = 3
_CQ_CHUNK = 1 << 16  # coordinates per shared draw of CQ's keys (bounds memory at n * 2^16)


# ----------------------------------------------------------------------------- quantizers


def qsgd(s: int = 1, dtype: str = "float32") -> Compressor:
    """Standard dithering / QSGD(s) (Alistarh et al. 2017):
    Q(x)_j = ||x|| sign(x_j) xi_j / s, xi_j = floor(s|x_j|/||x||) + Bernoulli(frac), so E Q(x) = x.

    omega = min(d/s^2, sqrt(d)/s). Wire: the norm (float32, rounded up so that every level stays
    in [0, s] and the rounding stays unbiased), d signs, d levels of ceil(log2(s + 1)) bits.
    """
    _check_int(s, 1, "qsgd", "s")
    level_bits = _level_bits(s + 1)

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        norm = _f32_up(float(np.linalg.norm(x)))
        t = s * (np.abs(x) / norm) if norm > 0 else np.zeros(x.size)
        codes = _stochastic_levels(t, r.rng.random(x.size), s)
        return QuantizedVector(Grid.UNIFORM, s, norm, _frozen(codes), level_bits, _frozen(x < 0))

    return Compressor(
        f"qsgd(s={s})",
        compress,
        omega=lambda d: min(d / s**2, math.sqrt(d) / s),
        density=lambda d: _fraction(SCALE_BITS + d * (1 + level_bits), d, dtype),
        deterministic=False,
        emits=_kind(QuantizedVector),
    )


def natural_dithering(s: int = 2, dtype: str = "float32") -> Compressor:
    """Natural dithering(s) (Horvath et al. 2019): QSGD on the levels {0, 2^(1-s), ..., 1/2, 1},
    |x_j|/||x|| rounded to one of its two neighbouring levels with the probabilities that make
    it unbiased. Level code c in [0, s]: 0 for c = 0, else 2^(c - s) (Grid.NATURAL).

    omega = 1/8 + min(sqrt(d)/2^(s-1), d/2^(2(s-1))). Wire: the norm (float32, rounded up),
    d signs, d codes of ceil(log2(s + 1)) bits.
    """
    _check_int(s, 1, "natural_dithering", "s")
    level_bits = _level_bits(s + 1)

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        norm = _f32_up(float(np.linalg.norm(x)))
        t = np.abs(x) / norm if norm > 0 else np.zeros(x.size)
        _, e = np.frexp(t)  # t = f 2^e, f in [1/2, 1): t lies in [2^(e-1), 2^e)
        lower_code = np.where(t > 0, e - 1 + s, 0)
        below = lower_code < 1  # under the smallest non-zero level: between 0 and 2^(1-s)
        lower = np.where(below, 0.0, np.ldexp(1.0, e - 1))
        upper = np.where(below, 2.0 ** (1 - s), np.ldexp(1.0, e))
        lower_code = np.where(below, 0, lower_code)
        up = r.rng.random(x.size) < (t - lower) / (upper - lower)
        codes = np.minimum(lower_code + up, s).astype(np.uint32)
        return QuantizedVector(Grid.NATURAL, s, norm, _frozen(codes), level_bits, _frozen(x < 0))

    return Compressor(
        f"natural_dithering(s={s})",
        compress,
        omega=lambda d: 1 / 8 + min(math.sqrt(d) / 2 ** (s - 1), d / 2 ** (2 * (s - 1))),
        density=lambda d: _fraction(SCALE_BITS + d * (1 + level_bits), d, dtype),
        deterministic=False,
        emits=_kind(QuantizedVector),
    )


_EXPONENT_BIAS = 127  # Grid.EXPONENT: code c > 0 is 2^(c - 127), c in [1, 254] (float32's range)


def natural_compression(dtype: str = "float32") -> Compressor:
    """Natural compression (Horvath et al. 2019): each x_j rounded to one of the two powers of
    two around it, 2^e <= |x_j| < 2^(e+1), up with probability |x_j|/2^e - 1: unbiased,
    omega = 1/8. Wire: 1 sign + 8 exponent bits per entry (Grid.EXPONENT, scale 1, no header).

    The exponent range is float32's normal range: |x_j| < 2^-126 rounds between 0 and 2^-126
    (still unbiased); |x_j| >= 2^127 becomes 2^127 (biased, beyond any sane gradient).
    The wire dtype does not matter: every value is an exact power of two.
    """

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        a = np.abs(x)
        _, e = np.frexp(a)
        lower_code = np.where(a > 0, e - 1 + _EXPONENT_BIAS, 0)
        below = lower_code < 1
        lower = np.where(below, 0.0, np.ldexp(1.0, e - 1))
        upper = np.where(below, 2.0 ** (1 - _EXPONENT_BIAS), np.ldexp(1.0, e))
        lower_code = np.where(below, 0, lower_code)
        up = r.rng.random(x.size) < (a - lower) / (upper - lower)
        codes = np.minimum(lower_code + up, 254).astype(np.uint32)
        return QuantizedVector(Grid.EXPONENT, 8, 1.0, _frozen(codes), 8, _frozen(x < 0))

    return Compressor(
        "natural_compression",
        compress,
        omega=lambda d: 1 / 8,
        density=lambda d: _fraction(9 * d, d, dtype),
        deterministic=False,
        emits=_kind(QuantizedVector),
    )


def scaled_sign(dtype: str = "float32") -> Compressor:
    """Sign with scale (Karimireddy et al. 2019): C(x) = (||x||_1 / d) sign(x), sign(0) = +1.

    ||C(x) - x||^2 = (1 - alpha(x))||x||^2 with alpha(x) = ||x||_1^2 / (d ||x||_2^2), which
    depends on x; `alpha(d)` is its worst case 1/d (x a multiple of a basis vector). Wire: the
    scale (float32) + d sign bits.
    """

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        scale = _f32(float(np.sum(np.abs(x))) / x.size) if x.size else 0.0
        return SignVector(scale, _frozen(x < 0))

    return Compressor(
        "scaled_sign",
        compress,
        alpha=lambda d: 1 / d,
        density=lambda d: _fraction(SCALE_BITS + d, d, dtype),
        emits=_kind(SignVector),
    )


def drive(unbiased: bool = False, dtype: str = "float32") -> Compressor:
    """DRIVE (Vargaftik et al. 2021): rotate R x = H D x / sqrt(d') with a randomized Hadamard
    transform (threepc.common.hadamard; d padded to d' = 2^ceil(log2 d)), send S sign(R x),
    decode R^{-1}(S sign(R x)) truncated to d.

    Biased (the paper's Section 3): S = ||R x||_1 / d', which minimizes ||R x - S sign(R x)||^2
    = (1 - ||R x||_1^2/(d' ||x||^2)) ||x||^2; `alpha(d)` = 1/d' is the worst case
    (||R x||_1 >= ||x||_2); typically ||R x||_1^2/(d' ||x||^2) is about 2/pi.
    Unbiased (Section 4): S = ||x||^2 / ||R x||_1, unbiased for a uniformly random rotation;
    with the Hadamard rotation only approximately (the paper's note on RHT): measured biased here,
    so this variant declares neither alpha nor omega. ALGORITHMS.md calls ||x||^2/||Rx||_1 the biased scale; the
    paper's (which we follow) is ||R x||_1 / d'.

    The rotation seed is the worker's own (drawn from r.rng) and travels in the payload.
    Wire: seed + S (float32) + d' sign bits.
    """

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        d = x.size
        seed = _seed_from(r.rng)
        rx = hadamard.rotation(x, seed, d)
        l1 = float(np.sum(np.abs(rx)))
        if l1 == 0.0:
            scale = 0.0
        elif unbiased:
            scale = _f32(float(np.dot(x, x)) / l1)
        else:
            scale = _f32(l1 / rx.size)
        return SignVector(scale, _frozen(rx < 0), seed, True)

    density = lambda d: _fraction(SCALE_BITS + hadamard.padded_size(d), d, dtype)
    if unbiased:
        # Measured here: 7-12% relative bias on Gaussian inputs (d = 8..30) with the Hadamard
        # rotation, so it claims no omega and methods that need an unbiased Q refuse it.
        return Compressor(
            "drive(unbiased=True)", compress, density=density, deterministic=False, emits=_kind(SignVector)
        )
    return Compressor(
        "drive",
        compress,
        alpha=lambda d: 1 / hadamard.padded_size(d),
        density=density,
        deterministic=False,
        emits=_kind(SignVector),
    )


# ----------------------------------------------------------------------------- correlated compressors


def perm_k(dtype: str = "float32") -> Compressor:
    """PermK (Szlendak et al. 2021): a permutation shared by the n workers of the round splits
    the coordinates into n blocks; worker i sends its block scaled by n (n <= d), so
    Q_i(x) is unbiased and mean_i Q_i(x) = x exactly on equal inputs. The general definition
    for n not dividing d (padding) and n > d (each coordinate sent by ~n/d workers) is
    `threepc.common.payloads.perm_k_block`.

    AB-inequality: A = B = 1 (`ab`). Per worker, omega = n - 1 for n <= d (d - 1 for d | n):
    it depends on n, so `omega(d)` is None. Sends ~d/n values (`density_n`). Wire: the shared
    seed + the block's values (no indices).
    """

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        d = x.size
        seed = _seed_from(r.shared(_PERM_K_TAG))
        idx, scale = perm_k_block(d, seed, r.worker_id, r.n_workers)
        values = to_wire_dtype(x[idx] * scale, dtype)
        return SeededSparseVector(
            IndexRule.PERM_K, seed, _frozen(values), r.worker_id, r.n_workers, dtype
        )

    return Compressor(
        "perm_k",
        compress,
        density=lambda d: 1.0,
        deterministic=False,
        ab=lambda d, n: (1.0, 1.0),
        density_n=lambda d, n: 1 / min(n, d),
        emits=_kind(SeededSparseVector),
    )


def _range_quantized(v: np.ndarray, u: np.ndarray, levels: int) -> QuantizedVector:
    """v on the grid l + (r - l) m/(levels - 1), [l, r] = [min v, max v], rounded up or down
    by 1{u < frac}: unbiased when u ~ U[0, 1). The range travels as two float32 (l rounded
    down, r - l up) so that v stays inside it."""
    if v.size == 0:
        return QuantizedVector(
            Grid.RANGE, levels, 0.0, _frozen(np.zeros(0, np.uint32)), _level_bits(levels)
        )
    low = _f32_down(float(v.min()))
    width = _f32_up(float(v.max()) - low)
    t = np.clip((v - low) / width * (levels - 1), 0, levels - 1) if width > 0 else np.zeros(v.size)
    codes = _stochastic_levels(t, u, levels - 1)
    return QuantizedVector(
        Grid.RANGE, levels, width, _frozen(codes), _level_bits(levels), None, low
    )


def _stratified_uniforms(
    r: Randomness, tags: tuple[int, ...], row: int, rows: int, size: int
) -> np.ndarray:
    """CQ's U_j = pi_j(row)/rows + gamma_j (Suresh et al. 2022): pi_j a uniformly random
    permutation of the `rows` workers, one per coordinate, shared (the rank of the row's key
    among `rows` shared keys, ties broken by row), gamma_j ~ U[0, 1/rows) private."""
    rank = np.empty(size, dtype=np.int64)
    for start in range(0, size, _CQ_CHUNK):
        stop = min(start + _CQ_CHUNK, size)
        keys = r.shared(*tags, start // _CQ_CHUNK).random((rows, stop - start))
        mine = keys[row]
        rank[start:stop] = (keys < mine).sum(axis=0) + (keys[:row] == mine).sum(axis=0)
    return (rank + r.rng.random(size)) / rows


def _check_levels(levels: int, name: str) -> None:
    _check_int(levels, 2, name, "levels")


def _range_omega(levels: int) -> ConstantFn:
    # Per coordinate the variance is at most (r - l)^2 / (4 (levels - 1)^2), and
    # (r - l)^2 <= 2 (r^2 + l^2) <= 2 ||x||^2 (l and r are two of x's entries, or r = l).
    return lambda d: d / (2 * (levels - 1) ** 2)


def iq(levels: int = 2, dtype: str = "float32") -> Compressor:
    """Independent quantization (CQ paper, Definition 6): per coordinate
    Q(x)_j = l + (r - l) 1{U_j < (x_j - l)/(r - l)} with U_j ~ U[0, 1) private (levels = 2; with
    k levels the same rule on the fractional position in the grid l + (r - l) m/(k - 1)).

    The range [l, r] is the vector's own [min x, max x], sent as offset l and scale r - l
    (two float32): nothing has to be known in advance, and on equal inputs every worker uses
    the same range. Unbiased; omega = d/(2 (k - 1)^2). Wire: 64 + d ceil(log2 k) bits.
    """
    _check_levels(levels, "iq")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        return _range_quantized(x, r.rng.random(x.size), levels)

    return _range_compressor(f"iq(levels={levels})", compress, levels, dtype)


def _range_compressor(name: str, compress: CompressFn, levels: int, dtype: str) -> Compressor:
    """IQ's and CQ's constants: unbiased with omega = d/(2 (k - 1)^2); 64 + d ceil(log2 k) bits."""
    return Compressor(
        name,
        compress,
        omega=_range_omega(levels),
        density=lambda d: _fraction(2 * SCALE_BITS + d * _level_bits(levels), d, dtype),
        deterministic=False,
        emits=_kind(QuantizedVector),
    )


def cq(levels: int = 2, dtype: str = "float32") -> Compressor:
    """Correlated quantization (Suresh et al. 2022; CQ paper, Algorithm 2 and Definition 7):
    IQ with U_ij = pi_j(i)/n + gamma_ij, pi_j a random permutation of the n workers for each
    coordinate j, shared by the workers (r.shared), gamma_ij ~ U[0, 1/n) private. Each U_ij is
    U[0, 1), so each worker is unbiased with IQ's omega = d/(2 (k - 1)^2); the n draws of a
    coordinate are stratified, so on equal inputs the mean's error falls like 1/n^2, not 1/n.

    Range as IQ: the vector's own [min x, max x] (equal on equal inputs). The AB constants are
    not given (`ab` None): the paper's A = d/(4 n^2) assumes a range common to all workers.
    Wire: 64 + d ceil(log2 k) bits; the permutations are redrawn from the round's seed.
    Cost: the shared keys are n per coordinate, O(n d) time per worker and round.
    """
    _check_levels(levels, "cq")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        u = _stratified_uniforms(r, (_CQ_TAG,), r.worker_id, r.n_workers, x.size)
        return _range_quantized(x, u, levels)

    return _range_compressor(f"cq(levels={levels})", compress, levels, dtype)


def perm_k_cq(blocks: int = 2, levels: int = 2, dtype: str = "float32") -> Compressor:
    """PermK + CQ (CQ paper, Algorithm 3): B = min(blocks, n, d) groups. A shared permutation of
    the n workers cuts them into B groups of sizes m_g ~ n/B; PermK's rule cuts the coordinates
    into B blocks (`perm_k_block`, d padded to a multiple of B); group g sends block g scaled by
    n/m_g (= B when B divides n, as in the paper), quantized by CQ among the m_g workers of the
    group (its own range, as `cq`). B = 1 is CQ; B = n is PermK with each block quantized.

    Each worker is unbiased: coordinate j is in its group's block with probability 1/B and
    P(group g) = m_g/n, so E = sum_g (m_g/n)(1/B)(n/m_g) = 1. Constants depend on n and B and
    are not given. Wire: seed + block's range (64 bits) + ceil(log2 k) bits per coordinate of
    the block (about d/B).
    """
    _check_int(blocks, 1, "perm_k_cq", "blocks")
    _check_levels(levels, "perm_k_cq")

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        d, n = x.size, r.n_workers
        groups = max(1, min(blocks, n, d))
        shared = r.shared(_PERM_K_CQ_TAG)
        position = int(shared.permutation(n)[r.worker_id])
        seed = _seed_from(shared)
        bounds = np.linspace(0, n, groups + 1).round().astype(np.int64)
        g = int(np.searchsorted(bounds, position, side="right")) - 1
        members = int(bounds[g + 1] - bounds[g])
        idx, _ = perm_k_block(d, seed, g, groups)
        u = _stratified_uniforms(
            r, (_PERM_K_CQ_TAG, g + 1), position - int(bounds[g]), members, idx.size
        )
        quantized = _range_quantized(x[idx] * (n / members), u, levels)
        return SeededQuantizedVector(IndexRule.PERM_K, seed, g, groups, quantized)

    return Compressor(
        f"perm_k_cq(blocks={blocks}, levels={levels})",
        compress,
        density=lambda d: _fraction(2 * SCALE_BITS + d * _level_bits(levels), d, dtype),
        deterministic=False,
        density_n=lambda d, n: _fraction(
            2 * SCALE_BITS + math.ceil(d / max(1, min(blocks, n, d))) * _level_bits(levels),
            d,
            dtype,
        ),
        emits=_kind(SeededQuantizedVector),
    )


# ----------------------------------------------------------------------------- wrappers


def bernoulli(p: float = 0.5, inner: Any = None, dtype: str = "float32") -> Compressor:
    """Bernoulli(p) wrapper: with probability p send x exactly (DenseVector), else the inner
    compressor's payload (`inner` a component table {name = ..., params...}; default top_k).

    Contractive inner: alpha = p + (1 - p) alpha_in. Unbiased inner: omega = (1 - p) omega_in.
    Absolute inner: the same Delta^2. The coin costs one flag bit: the payload is `Chosen`, which
    carries (and meters) it.
    """
    from threepc.common.config import Component

    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"bernoulli: p must be in [0, 1], got {p}")
    spec = Component.model_validate(inner if inner is not None else {"name": "top_k"})
    if spec.name == "bernoulli":
        raise ConfigError("bernoulli: the inner compressor cannot be bernoulli itself")
    c = make_compressor(spec.name, spec.params, dtype)

    def compress(x: np.ndarray, r: Randomness) -> VectorPayload:
        if r.rng.random() < p:
            return Chosen(DenseVector(_frozen(np.array(to_wire_dtype(x, dtype))), dtype))
        inner_payload = c.compress(x, r)
        if isinstance(inner_payload, Chosen):  # not reachable (no nested bernoulli), kept exact
            return Chosen(inner_payload.payload, 1 + inner_payload.flag_bits)
        return Chosen(inner_payload)

    alpha, omega, absolute = c.alpha, c.omega, c.absolute
    return Compressor(
        f"bernoulli(p={p}, inner={c.name})",
        compress,
        alpha=(lambda d: p + (1 - p) * alpha(d)) if alpha is not None else None,
        omega=(lambda d: (1 - p) * omega(d)) if omega is not None else None,
        absolute=absolute,
        density=lambda d: p + (1 - p) * c.density(d),
        deterministic=p == 1.0 or (p == 0.0 and c.deterministic),
        flag_bits=1 + c.flag_bits,
        emits=frozenset(PartKind(kind.payload, True) for kind in c.emits | _kind(DenseVector)),
    )


# Config name -> factory. Every factory takes keyword parameters with defaults that run, and
# `dtype`, the wire dtype of values, which the run's config supplies.
COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "identity": identity,
    "top_k": top_k,
    "rand_k": rand_k,
    "hard_threshold": hard_threshold,
    "qsgd": qsgd,
    "natural_dithering": natural_dithering,
    "natural_compression": natural_compression,
    "scaled_sign": scaled_sign,
    "perm_k": perm_k,
    "iq": iq,
    "cq": cq,
    "perm_k_cq": perm_k_cq,
    "drive": drive,
    "bernoulli": bernoulli,
}


def make_compressor(name: str, params: dict[str, object], dtype: str) -> Compressor:
    """Build a registered compressor from config, with a clear error for unknown names/params."""
    return _build(COMPRESSORS, "compressor", name, {**params, "dtype": dtype})


def _build(
    registry: dict[str, Callable[..., Compressor]], what: str, name: str, params: dict
) -> Compressor:
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
    check_types(factory, params, f"{what} {name!r}")
    return factory(**params)


def sqrt_one_minus(a: float) -> float:
    """sqrt(1 - a), clipped at 0 for a = 1 up to rounding."""
    return math.sqrt(max(0.0, 1.0 - a))
