"""Tests for threepc.common.compressors (and the rotation of threepc.common.hadamard).

Monte Carlo checks of each compressor's defining inequality against its declared constant,
exact wire sizes against ALGORITHMS.md's "what goes on the wire", and bit-exact round trips
through the codec for every wire dtype. The inequality tests use dtype="float64": float32
rounding of the values sent would blur the bounds by ~1e-7 relative, which matters where a
bound is tight (alpha = 1, omega = 0, exact means). Norms and scales still travel as float32
(SCALE_BITS), so the bounds get a 1e-12 relative slack.

Monte Carlo tolerance: a mean over N draws is compared with its bound plus Z standard errors
of that mean (estimated from the draws), with Z = 6; the examples are derandomized, so a run
is reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import scipy.linalg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threepc.common import codec, hadamard
from threepc.common.bitpack import index_bits
from threepc.common.compressors import COMPRESSORS, Compressor, make_compressor
from threepc.common.errors import ConfigError
from threepc.common.payloads import (
    DenseVector,
    Expect,
    Grid,
    PartKind,
    QuantizedVector,
    SeededQuantizedVector,
    SeededSparseVector,
    SignVector,
    perm_k_block,
    value_bits,
)
from threepc.common.randomness import round_randomness

MC = settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
DRAWS = 300
Z = 6.0
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _frozen(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    x.setflags(write=False)
    return x


@st.composite
def vectors(draw: st.DrawFn, max_d: int = 24) -> np.ndarray:
    """Gaussian, heavy-tailed, sparse, constant and one-spike vectors, d in [1, max_d]."""
    d = draw(st.integers(1, max_d))
    shape = draw(st.sampled_from(["normal", "cauchy", "sparse", "constant", "spike", "ties"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-3, 3))
    if shape == "normal":
        x = rng.normal(size=d)
    elif shape == "cauchy":
        x = rng.standard_cauchy(size=d)
    elif shape == "sparse":
        x = rng.normal(size=d) * (rng.random(d) < 0.3)
    elif shape == "constant":
        x = np.full(d, rng.normal())
    elif shape == "spike":
        x = np.zeros(d)
        x[rng.integers(d)] = rng.normal()
    else:
        x = rng.choice([-1.0, 0.5, 2.0], size=d)
    return _frozen(x * scale)


def _draws(c: Compressor, x: np.ndarray, n: int = 1, worker: int = 0, seed: int = 0) -> np.ndarray:
    """DRAWS decoded outputs of worker `worker` of n, one per round (fresh randomness each)."""
    d = x.size
    return np.array(
        [c.compress(x, round_randomness(seed, t, worker, n)).dense(d) for t in range(DRAWS)]
    )


def _sq_errors(outputs: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.sum((outputs - x) ** 2, axis=1)


def _mean_bound(samples: np.ndarray) -> float:
    """Z standard errors of the mean of `samples`, plus float slack."""
    return Z * float(np.std(samples)) / math.sqrt(samples.size)


def _assert_unbiased(outputs: np.ndarray, x: np.ndarray, var_floor: float) -> None:
    """|mean_j - x_j| within Z standard errors per coordinate.

    The standard error uses the sample variance plus `var_floor`, a per-coordinate share of the
    declared variance (omega ||x||^2 / d): a rare rounding (x_j just above a level) may not
    occur in DRAWS draws, and then the sample variance alone would claim a bias.
    """
    mean = outputs.mean(axis=0)
    se = np.sqrt((outputs.var(axis=0) + var_floor) / outputs.shape[0])
    slack = 1e-6 * float(np.max(np.abs(x)))  # float32 ranges and norms: ~6e-8 relative
    bad = np.abs(mean - x) > Z * se + slack
    assert not bad.any(), (
        f"biased at {np.flatnonzero(bad)}: mean {mean[bad]} vs x {x[bad]}, se {se[bad]}"
    )


# ----------------------------------------------------------------------------- the catalogue

CONTRACTIVE: list[tuple[str, dict[str, Any]]] = [
    ("identity", {}),
    ("top_k", {"k": 3}),
    ("rand_k", {"k": 3, "unbiased": False}),
    ("scaled_sign", {}),
    ("drive", {}),
    ("bernoulli", {"p": 0.3, "inner": {"name": "top_k", "k": 2}}),
    ("bernoulli", {"p": 0.5, "inner": {"name": "scaled_sign"}}),
]
UNBIASED: list[tuple[str, dict[str, Any]]] = [
    ("identity", {}),
    ("rand_k", {"k": 3}),
    ("qsgd", {"s": 1}),
    ("qsgd", {"s": 5}),
    ("natural_dithering", {"s": 1}),
    ("natural_dithering", {"s": 3}),
    ("natural_compression", {}),
    ("iq", {"levels": 2}),
    ("iq", {"levels": 5}),
    ("cq", {"levels": 2}),
    ("cq", {"levels": 4}),
    ("bernoulli", {"p": 0.3, "inner": {"name": "qsgd", "s": 2}}),
]
ABSOLUTE: list[tuple[str, dict[str, Any]]] = [
    ("hard_threshold", {"threshold": 0.5}),
    ("bernoulli", {"p": 0.4, "inner": {"name": "hard_threshold", "threshold": 0.2}}),
]
# Compressors with shared randomness: unbiased per worker for any n; constants depend on n.
CORRELATED: list[tuple[str, dict[str, Any]]] = [
    ("perm_k", {}),
    ("cq", {"levels": 2}),
    ("perm_k_cq", {"blocks": 2}),
    ("perm_k_cq", {"blocks": 3, "levels": 3}),
]


def _id(case: tuple[str, dict[str, Any]]) -> str:
    name, params = case
    return name + "".join(
        f"-{k}={v['name'] if isinstance(v, dict) else v}" for k, v in params.items()
    )


def test_registry_has_every_compressor() -> None:
    expected = {
        "identity", "top_k", "rand_k", "hard_threshold", "qsgd", "natural_dithering",
        "natural_compression", "scaled_sign", "perm_k", "iq", "cq", "perm_k_cq", "drive", "bernoulli",
    }  # fmt: skip
    assert expected <= set(COMPRESSORS)
    for name in COMPRESSORS:  # every factory's defaults run
        assert isinstance(make_compressor(name, {}, "float32"), Compressor)


@pytest.mark.parametrize("case", CONTRACTIVE, ids=_id)
@MC
@given(x=vectors())
def test_contractive(case: tuple[str, dict[str, Any]], x: np.ndarray) -> None:
    """E||C(x) - x||^2 <= (1 - alpha)||x||^2."""
    c = make_compressor(*case, "float64")
    assert c.alpha is not None
    d = x.size
    errors = _sq_errors(_draws(c, x), x)
    sq = float(x @ x)
    bound = (1 - c.alpha(d)) * sq + 1e-12 * sq  # scales travel as float32: ~1e-15 relative
    if c.deterministic:
        assert np.all(errors <= bound)
    assert errors.mean() <= bound + _mean_bound(errors)


@pytest.mark.parametrize("case", UNBIASED, ids=_id)
@MC
@given(x=vectors(max_d=16))
def test_unbiased(case: tuple[str, dict[str, Any]], x: np.ndarray) -> None:
    """E Q(x) = x and E||Q(x) - x||^2 <= omega ||x||^2."""
    c = make_compressor(*case, "float64")
    assert c.omega is not None
    outputs = _draws(c, x)
    _assert_unbiased(outputs, x, c.omega(x.size) * float(x @ x) / x.size)
    errors = _sq_errors(outputs, x)
    assert (
        errors.mean() <= c.omega(x.size) * float(x @ x) * (1 + 1e-6) + _mean_bound(errors) + 1e-300
    )


def test_unbiasedness_check_has_power() -> None:
    """The check above rejects the biased RandK (k/d of x's mass is missing in expectation)."""
    c = make_compressor("rand_k", {"k": 2, "unbiased": False}, "float64")
    x = _frozen(np.random.default_rng(3).normal(size=10))
    omega = 10 / 2 - 1  # the unbiased RandK's
    with pytest.raises(AssertionError, match="biased"):
        _assert_unbiased(_draws(c, x), x, omega * float(x @ x) / x.size)


@pytest.mark.parametrize("case", ABSOLUTE, ids=_id)
@MC
@given(x=vectors())
def test_absolute(case: tuple[str, dict[str, Any]], x: np.ndarray) -> None:
    """||C(x) - x||^2 <= d lambda^2 on every draw."""
    c = make_compressor(*case, "float64")
    assert c.absolute is not None
    errors = _sq_errors(_draws(c, x)[:50], x)
    assert np.all(errors <= c.absolute(x.size))


@pytest.mark.parametrize("case", CORRELATED, ids=_id)
@pytest.mark.parametrize("n", [1, 3, 8])
@MC
@given(x=vectors(max_d=16), data=st.data())
def test_correlated_unbiased_per_worker(
    case: tuple[str, dict[str, Any]], n: int, x: np.ndarray, data: st.DataObject
) -> None:
    """Each worker's output is unbiased over the round's shared and private randomness."""
    worker = data.draw(st.integers(0, n - 1))
    c = make_compressor(*case, "float64")
    # Per worker: PermK's omega is n - 1, CQ's is IQ's d/2, a block scaled by B <= n and then
    # quantized has at most (B - 1) + B d/2.
    omega = {"perm_k": n, "cq": x.size / 2}.get(case[0], n + n * x.size / 2)
    _assert_unbiased(_draws(c, x, n, worker), x, omega * float(x @ x) / x.size)


# ----------------------------------------------------------------------------- PermK and CQ


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 20, 40])
@pytest.mark.parametrize("d", [1, 7, 8, 13, 24])
def test_perm_k_mean_exact_on_equal_inputs(n: int, d: int) -> None:
    """mean_i Q_i(x) = x for every round, also for n not dividing d and n > d."""
    c = make_compressor("perm_k", {}, "float64")
    x = _frozen(np.random.default_rng(n * 100 + d).normal(size=d))
    for t in range(5):
        outputs = [c.compress(x, round_randomness(7, t, i, n)) for i in range(n)]
        mean = np.mean([p.dense(d) for p in outputs], axis=0)
        np.testing.assert_allclose(mean, x, rtol=1e-14, atol=0)
        covered = np.concatenate([p.indices(d) for p in outputs])  # type: ignore[union-attr]
        if n <= d:  # every coordinate sent by exactly one worker
            assert np.array_equal(np.sort(covered), np.arange(d))
        else:  # every worker sends one coordinate, each coordinate by floor or ceil(n/d) workers
            counts = np.bincount(covered, minlength=d)
            assert counts.min() >= n // d and counts.max() <= -(-n // d)


def test_perm_k_block_matches_the_paper_when_n_divides_d() -> None:
    """n | d: blocks of d/n consecutive slots of one permutation of [d], scale n (Szlendak et al.)."""
    d, n, seed = 12, 4, 99
    perm = np.random.default_rng(seed).permutation(d)
    for i in range(n):
        idx, scale = perm_k_block(d, seed, i, n)
        assert scale == n
        assert np.array_equal(idx, np.sort(perm[i * 3 : (i + 1) * 3]))


@MC
@given(data=st.data())
def test_perm_k_ab_inequality(data: st.DataObject) -> None:
    """E||mean_i Q_i(a_i) - abar||^2 <= A mean_i||a_i||^2 - B||abar||^2 with A = B = 1."""
    n = data.draw(st.integers(2, 9))
    d = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = rng.normal(size=(n, d)) + rng.normal(size=d)
    c = make_compressor("perm_k", {}, "float64")
    assert c.ab is not None
    big_a, big_b = c.ab(d, n)
    abar = a.mean(axis=0)
    errors = np.array(
        [
            np.sum(
                (
                    np.mean(
                        [c.compress(a[i], round_randomness(1, t, i, n)).dense(d) for i in range(n)],
                        axis=0,
                    )
                    - abar
                )
                ** 2
            )
            for t in range(200)
        ]
    )
    bound = big_a * np.mean(np.sum(a**2, axis=1)) - big_b * float(abar @ abar)
    assert errors.mean() <= bound + _mean_bound(errors) + 1e-12


def _mean_mse(c: Compressor, x: np.ndarray, n: int, rounds: int) -> float:
    d = x.size
    errs = []
    for t in range(rounds):
        mean = np.mean(
            [c.compress(x, round_randomness(5, t, i, n)).dense(d) for i in range(n)], axis=0
        )
        errs.append(np.sum((mean - x) ** 2))
    return float(np.mean(errs))


def test_cq_mean_error_falls_n_times_faster_than_iq() -> None:
    """Homogeneous inputs, n = 16: CQ's MSE of the mean is >= n/4 times lower than IQ's."""
    n, d = 16, 64
    x = _frozen(np.random.default_rng(11).normal(size=d))
    mse_iq = _mean_mse(make_compressor("iq", {}, "float64"), x, n, 60)
    mse_cq = _mean_mse(make_compressor("cq", {}, "float64"), x, n, 60)
    assert mse_iq >= (n / 4) * mse_cq, (mse_iq, mse_cq)


def test_perm_k_cq_is_cq_for_one_block_and_groups_workers() -> None:
    """blocks = 1 gives CQ's error; with B blocks each worker sends about d/B levels."""
    n, d = 8, 40
    x = _frozen(np.random.default_rng(2).normal(size=d))
    one = _mean_mse(make_compressor("perm_k_cq", {"blocks": 1}, "float64"), x, n, 40)
    cq = _mean_mse(make_compressor("cq", {}, "float64"), x, n, 40)
    assert 0.5 < one / cq < 2
    c = make_compressor("perm_k_cq", {"blocks": 4}, "float64")
    payloads = [c.compress(x, round_randomness(0, 0, i, n)) for i in range(n)]
    assert all(
        isinstance(p, SeededQuantizedVector) and p.indices(d).size == d // 4 for p in payloads
    )
    blocks = {p.block for p in payloads}  # type: ignore[union-attr]
    assert blocks == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- quantizer details


@MC
@given(x=vectors(), s=st.integers(1, 6))
def test_natural_dithering_levels(x: np.ndarray, s: int) -> None:
    """|Q(x)_j| / ||x|| is 0 or a power of two in [2^(1-s), 1], and neighbours |x_j|/||x||."""
    p = make_compressor("natural_dithering", {"s": s}, "float64").compress(
        x, round_randomness(0, 0, 0, 1)
    )
    assert isinstance(p, QuantizedVector) and p.grid is Grid.NATURAL and p.levels == s
    norm = float(np.linalg.norm(x))
    if norm == 0:
        return
    level = np.abs(p.dense(x.size)) / p.scale
    allowed = np.concatenate([[0.0], 2.0 ** np.arange(1 - s, 1)])
    assert np.all(np.isin(level, allowed))
    t = np.abs(x) / p.scale
    below = allowed[np.searchsorted(allowed, t, side="right") - 1]
    above = allowed[np.minimum(np.searchsorted(allowed, t, side="left"), s)]
    assert np.all((level == below) | (level == above))
    assert p.scale >= norm and p.scale == float(np.float32(p.scale))


@MC
@given(x=vectors())
def test_natural_compression_rounds_to_neighbouring_powers_of_two(x: np.ndarray) -> None:
    p = make_compressor("natural_compression", {}, "float64").compress(
        x, round_randomness(0, 0, 0, 1)
    )
    y = p.dense(x.size)
    nonzero = x != 0
    assert np.all(y[~nonzero] == 0)
    lo = 2.0 ** np.floor(np.log2(np.abs(x[nonzero])))
    assert np.all((np.abs(y[nonzero]) == lo) | (np.abs(y[nonzero]) == 2 * lo))
    assert np.all(np.sign(y[nonzero]) == np.sign(x[nonzero]))


@MC
@given(x=vectors(max_d=40))
def test_drive_scales(x: np.ndarray) -> None:
    """Unbiased scale: <Q(x), x> = ||x||^2 exactly; biased: the error-minimizing ||Rx||_1/d'."""
    d = x.size
    r = round_randomness(0, 0, 0, 1)
    sq = float(x @ x)
    u = make_compressor("drive", {"unbiased": True}, "float64").compress(x, r)
    assert isinstance(u, SignVector) and u.rotated and u.negative.size == hadamard.padded_size(d)
    assert math.isclose(float(u.dense(d) @ x), sq, rel_tol=1e-6, abs_tol=1e-300)
    b = make_compressor("drive", {}, "float64").compress(x, round_randomness(0, 0, 0, 1))
    assert isinstance(b, SignVector)
    rx = hadamard.rotation(x, b.rotation_seed, d)
    assert math.isclose(b.scale, float(np.abs(rx).sum()) / rx.size, rel_tol=1e-7)
    assert (
        float(np.sum((b.dense(d) - x) ** 2))
        <= sq - float(np.abs(rx).sum()) ** 2 / rx.size + 1e-6 * sq
    )


@pytest.mark.parametrize("d", [1, 2, 3, 8, 100, 1024])
def test_hadamard_rotation(d: int) -> None:
    """R is orthonormal, R^{-1} R = I, and fwht is H x for the Sylvester H."""
    x = np.random.default_rng(d).normal(size=d)
    y = hadamard.rotation(x, 5, d)
    assert y.size == hadamard.padded_size(d) >= d
    assert math.isclose(float(y @ y), float(x @ x), rel_tol=1e-12)
    np.testing.assert_allclose(
        hadamard.inverse_rotation(y, 5, d), x, rtol=0, atol=1e-12 * np.abs(x).max()
    )
    n = hadamard.padded_size(d)
    v = np.random.default_rng(0).normal(size=n)
    np.testing.assert_allclose(hadamard.fwht(v), scipy.linalg.hadamard(n) @ v, atol=1e-9)


# ----------------------------------------------------------------------------- determinism, flags


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_deterministic_given_r_and_flag(name: str) -> None:
    """Equal randomness gives equal payloads; `deterministic` says whether other randomness may differ."""
    c = make_compressor(name, {}, "float64")
    x = _frozen(np.random.default_rng(4).normal(size=33))
    a = c.compress(x, round_randomness(1, 2, 1, 3)).dense(33)
    b = c.compress(x, round_randomness(1, 2, 1, 3)).dense(33)
    assert a.tobytes() == b.tobytes()
    others = [c.compress(x, round_randomness(s, 2, 1, 3)).dense(33).tobytes() for s in range(2, 8)]
    if c.deterministic:
        assert set(others) == {a.tobytes()}
    else:
        assert len(set(others + [a.tobytes()])) > 1


def test_bad_parameters_are_config_errors() -> None:
    for name, params in [
        ("qsgd", {"s": 0}),
        ("natural_dithering", {"s": 0}),
        ("iq", {"levels": 1}),
        ("cq", {"levels": 1}),
        ("perm_k_cq", {"blocks": 0}),
        ("bernoulli", {"p": 1.5}),
        ("bernoulli", {"inner": {"name": "nope"}}),
        ("qsgd", {"q": 1}),
    ]:
        with pytest.raises(ConfigError):
            make_compressor(name, params, "float32")


def test_bernoulli_constants_and_flag() -> None:
    inner = make_compressor("top_k", {"k": 2}, "float32")
    c = make_compressor("bernoulli", {"p": 0.25, "inner": {"name": "top_k", "k": 2}}, "float32")
    assert c.alpha is not None and inner.alpha is not None
    assert math.isclose(c.alpha(10), 0.25 + 0.75 * inner.alpha(10))
    assert c.flag_bits == 1 and not c.deterministic
    q = make_compressor("bernoulli", {"p": 0.25, "inner": {"name": "qsgd", "s": 2}}, "float32")
    assert q.omega is not None and math.isclose(q.omega(16), 0.75 * min(16 / 4, 4 / 2))
    payloads = [c.compress(np.ones(10), round_randomness(0, t, 0, 1)) for t in range(40)]
    assert {type(p.payload).__name__ for p in payloads} == {"DenseVector", "SparseVector"}
    # The coin is metered: one bit on top of the chosen payload.
    assert all(p.flag_bits == 1 and p.bits() == 1 + p.payload.bits() for p in payloads)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 320),
    st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    st.sampled_from([None, 1, 2, 3]),
    st.integers(0, 2**32 - 1),
)
def test_top_k_picks_the_definitions_coordinates(d: int, k: int, zeros: float, levels: int | None, seed: int) -> None:
    """TopK = the first k of a stable sort on -|x| (ties: lowest index), also on vectors that
    are mostly zeros or full of ties, where the fast path partitions the nonzeros only, and on
    vectors of a few distinct magnitudes (`levels`), where the k-th largest comes from a sort."""
    from threepc.common.compressors import top_k_indices

    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=d), 1) if levels is None else rng.integers(-levels, levels + 1, d) * 0.5
    x = values * (rng.random(d) >= zeros)  # ties and zeros
    k = min(k, d)
    expected = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    assert np.array_equal(top_k_indices(x, k), expected)


def test_top_k_on_a_few_distinct_magnitudes_matches_the_partition() -> None:
    """The sorted path (a probe that repeats itself) and the partition pick the same k-th value:
    the shape that slowed numpy's introselect 12x, the k-th entry inside a long run of equals."""
    from threepc.common.compressors import _kth_largest, top_k_indices

    rng = np.random.default_rng(7)
    m = 20_000
    mag = rng.permutation(np.repeat([16.2, 93.0, 109.3], [9_903, 97, m - 10_000]))
    for k in (1, 97, 5_000, 10_000, 12_345, m):
        assert _kth_largest(mag, k) == np.partition(mag, m - k)[m - k]
    x = mag * rng.choice([-1.0, 1.0], m)
    expected = np.sort(np.argsort(-np.abs(x), kind="stable")[:10_000])
    assert np.array_equal(top_k_indices(x, 10_000), expected)


# ----------------------------------------------------------------------------- bits and the wire


def _expected_bits(name: str, params: dict[str, Any], p: Any, d: int, dtype: str) -> int:
    """ALGORITHMS.md section 1, "what goes on the wire"."""
    vb = value_bits(dtype)
    if name == "identity":
        return d * vb
    if name in ("top_k", "hard_threshold"):
        return index_bits(p.indices, d) + p.indices.size * vb
    if name == "rand_k":
        return min(params.get("k", 1), d) * vb
    if name in ("qsgd", "natural_dithering"):
        s = params.get("s", 1 if name == "qsgd" else 2)
        return 32 + d + d * math.ceil(math.log2(s + 1))
    if name == "natural_compression":
        return d * (1 + 8)
    if name == "scaled_sign":
        return 32 + d
    if name == "drive":
        return 32 + hadamard.padded_size(d)
    if name == "perm_k":
        return p.indices(d).size * vb
    if name in ("iq", "cq"):
        return 2 * 32 + d * math.ceil(math.log2(params.get("levels", 2)))
    if name == "perm_k_cq":
        return 2 * 32 + p.indices(d).size * math.ceil(math.log2(params.get("levels", 2)))
    raise AssertionError(name)


WIRE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("identity", {}),
    ("top_k", {"k": 5}),
    ("rand_k", {"k": 5}),
    ("hard_threshold", {"threshold": 0.7}),
    ("qsgd", {"s": 1}),
    ("qsgd", {"s": 6}),
    ("natural_dithering", {"s": 2}),
    ("natural_dithering", {"s": 8}),
    ("natural_compression", {}),
    ("scaled_sign", {}),
    ("drive", {}),
    ("drive", {"unbiased": True}),
    ("perm_k", {}),
    ("iq", {"levels": 2}),
    ("iq", {"levels": 7}),
    ("cq", {"levels": 2}),
    ("perm_k_cq", {"blocks": 2}),
    ("bernoulli", {"p": 0.5, "inner": {"name": "qsgd"}}),
]


@pytest.mark.parametrize("case", WIRE_CASES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 37, 64])
def test_bits_match_the_formula(case: tuple[str, dict[str, Any]], dtype: str, d: int) -> None:
    name, params = case
    c = make_compressor(name, params, dtype)
    x = _frozen(np.random.default_rng(d).normal(size=d))
    total = 0
    for i in range(3):
        p = c.compress(x, round_randomness(0, 0, i, 3))
        if name == "bernoulli":
            inner = "identity" if isinstance(p.payload, DenseVector) else params["inner"]["name"]
            assert p.bits() == 1 + _expected_bits(inner, {}, p.payload, d, dtype)
        else:
            assert p.bits() == _expected_bits(name, params, p, d, dtype)
        assert p.value_bits() <= p.bits()
        if isinstance(p, SeededSparseVector) and name == "perm_k":
            total += p.values.size
    if name == "perm_k":  # the n blocks together send d values (n = 3 <= d) or n (n > d)
        assert total == max(d, 3)


ROUND_TRIP = [(case, d, n) for case in WIRE_CASES for d, n in [(64, 3), (37, 3), (2, 5)]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("case", "d", "n"), ROUND_TRIP, ids=[f"{_id(c)}-d{d}-n{n}" for c, d, n in ROUND_TRIP]
)
def test_round_trip_through_the_codec(
    case: tuple[str, dict[str, Any]], d: int, n: int, dtype: str
) -> None:
    """part_from_proto(part_to_proto(p), d).dense(d) equals p.dense(d) bit for bit, n > d
    included (PermK then gives each worker one coordinate, shared by ~n/d workers): the decoder
    takes up to n blocks from the run (`Expect.workers`). Each payload is of a kind the
    compressor declares (`emits`)."""
    c = make_compressor(*case, dtype)
    rng = np.random.default_rng(d * n)
    expect = Expect(frozenset(), dtype, float(np.finfo(np.float64).max), n)
    for t in range(4):
        x = _frozen(rng.normal(size=d) * 10.0 ** rng.integers(-2, 3))
        p = c.compress(x, round_randomness(3, t, n - 1, n))
        assert PartKind.of(p) in c.emits
        back = codec.part_from_proto(codec.part_to_proto(p), d, expect=expect)
        assert type(back) is type(p)
        assert back.dense(d).tobytes() == p.dense(d).tobytes()
        assert back.bits() == p.bits()
