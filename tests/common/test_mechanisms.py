"""Tests for threepc.common.mechanisms: every 3PC variant meets its inequality, and no step
mutates its inputs.

Each variant is built as threepc.common.methods builds it (`_build_3pc`), and checked on
random (h, y, x) against E||C_{h,y}(x) - x||^2 <= (1 - A)||h - y||^2 + B||x - y||^2 with its
own (A, B). Monte Carlo: the mean over DRAWS rounds gets Z standard errors of slack; variants
that only use deterministic compressors must meet the bound on every draw. The values travel
as float64 (dtype="float64") so that float32 rounding does not blur bounds that are tight
(A = 1, B = 0 for GD; exact skips for LAG); norms and scales still travel as float32, hence a
1e-9 relative slack.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threepc.common import mechanisms as m
from threepc.common.compressors import make_compressor
from threepc.common.methods import ThreePoint, _build_3pc
from threepc.common.randomness import round_randomness

MC = settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
DRAWS = 300
Z = 6.0
DTYPE = "float64"

TOP2 = {"name": "top_k", "k": 2}
# (method, method params, compressor): every variant of ALGORITHMS.md section 2, and the
# contractive compressors of section 1 inside them.
VARIANTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("gd", {}, {"name": "identity"}),
    ("ef21", {}, TOP2),
    ("ef21", {}, {"name": "rand_k", "k": 2, "unbiased": False}),
    ("ef21", {}, {"name": "scaled_sign"}),
    ("ef21", {}, {"name": "drive"}),
    ("ef21", {}, {"name": "bernoulli", "p": 0.3, "inner": {"name": "top_k", "k": 1}}),
    ("ef21_plus", {}, TOP2),
    ("ef21_plus", {}, {"name": "scaled_sign"}),
    ("lag", {"zeta": 0.5}, {"name": "identity"}),
    ("lag", {"zeta": 3.0}, {"name": "identity"}),
    ("clag", {"zeta": 0.5}, TOP2),
    ("clag", {"zeta": 4.0}, {"name": "rand_k", "k": 3, "unbiased": False}),
    ("3pcv1", {}, TOP2),
    ("3pcv1", {}, {"name": "drive"}),
    ("3pcv2", {"q": {"name": "rand_k", "k": 2}}, TOP2),
    ("3pcv2", {"q": {"name": "qsgd", "s": 2}}, {"name": "scaled_sign"}),
    ("3pcv2", {"q": {"name": "natural_compression"}}, TOP2),
    ("3pcv3", {"inner": {"name": "ef21"}}, TOP2),
    ("3pcv3", {"inner": {"name": "lag", "zeta": 1.0}}, {"name": "scaled_sign"}),
    ("3pcv3", {"inner": {"name": "3pcv2", "q": {"name": "iq"}}}, TOP2),
    ("3pcv4", {"c2": {"name": "top_k", "k": 1}}, TOP2),
    ("3pcv4", {"c2": {"name": "rand_k", "k": 2, "unbiased": False}}, {"name": "scaled_sign"}),
    ("3pcv5", {"p": 0.3}, TOP2),
    ("3pcv5", {"p": 0.7}, {"name": "drive"}),
]


def _id(v: tuple[str, dict[str, Any], dict[str, Any]]) -> str:
    method, params, comp = v
    extra = "".join(f"-{k}={p['name'] if isinstance(p, dict) else p}" for k, p in params.items())
    return f"{method}{extra}-{comp['name']}"


def _compressor_specs(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The compressor tables among a method's parameters (q, c1, c2, and those of `inner`)."""
    specs: list[dict[str, Any]] = []
    for key, value in params.items():
        if key in ("q", "c1", "c2"):
            specs.append(value)
        elif key == "inner":
            specs += _compressor_specs({k: v for k, v in value.items() if k != "name"})
    return specs


def _make(spec: dict[str, Any]) -> Any:
    return make_compressor(spec["name"], {k: v for k, v in spec.items() if k != "name"}, DTYPE)


def _build(v: tuple[str, dict[str, Any], dict[str, Any]], d: int) -> tuple[ThreePoint, bool]:
    """The 3PC function as a method uses it, and whether it draws no randomness at all."""
    method, params, comp = v
    built = _build_3pc(method, params, _make(comp), DTYPE, d)
    coins = method == "3pcv5" or params.get("inner", {}).get("name") == "3pcv5"
    deterministic = not coins and all(
        _make(s).deterministic for s in [comp, *_compressor_specs(params)]
    )
    return built, deterministic


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


@st.composite
def triples(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, y, x): independent, and the edge cases h = y, x = y, x = h, x near y, h near x."""
    d = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h, y, x = (rng.normal(size=d) * 10.0 ** rng.integers(-2, 3) for _ in range(3))
    shape = draw(st.sampled_from(["independent", "h=y", "x=y", "x=h", "x~y", "h~x"]))
    if shape == "h=y":
        h = y.copy()
    elif shape == "x=y":
        x = y.copy()
    elif shape == "x=h":
        x = h.copy()
    elif shape == "x~y":
        x = y + 1e-3 * rng.normal(size=d)
    elif shape == "h~x":
        h = x + 1e-3 * rng.normal(size=d)
    return _frozen(h), _frozen(y), _frozen(x)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@MC
@given(hyx=triples())
def test_three_point_inequality(
    variant: tuple[str, dict[str, Any], dict[str, Any]], hyx: tuple[np.ndarray, ...]
) -> None:
    """E||C_{h,y}(x) - x||^2 <= (1 - A)||h - y||^2 + B||x - y||^2 (3PC paper, Definition 3.1)."""
    h, y, x = hyx
    d = x.size
    built, deterministic = _build(variant, d)
    fn, (a, b) = built.fn, built.constants
    assert 0 < a <= 1 and b >= 0
    errors = np.array(
        [
            np.sum((fn(h, y, x, round_randomness(0, t, 0, 1)).apply(h) - x) ** 2)
            for t in range(DRAWS)
        ]
    )
    bound = (1 - a) * float(np.sum((h - y) ** 2)) + b * float(np.sum((x - y) ** 2))
    slack = 1e-9 * float(h @ h + y @ y + x @ x)
    if deterministic:
        assert np.all(errors <= bound + slack), (errors.max(), bound)
    se = float(np.std(errors)) / math.sqrt(DRAWS)
    assert errors.mean() <= bound + slack + Z * se, (errors.mean(), bound, se)


def test_inequality_check_has_power() -> None:
    """A variant given constants it does not meet fails the check (EF21 with TopK claimed as GD)."""
    fn = _build(("ef21", {}, TOP2), 10)[0].fn
    rng = np.random.default_rng(0)
    h, y, x = (_frozen(rng.normal(size=10)) for _ in range(3))
    err = float(np.sum((fn(h, y, x, round_randomness(0, 0, 0, 1)).apply(h) - x) ** 2))
    assert err > (1 - 1.0) * float(np.sum((h - y) ** 2)) + 0.0 * float(np.sum((x - y) ** 2))


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_a_variant_that_keeps_no_y_never_reads_it(variant: tuple[str, dict[str, Any], dict[str, Any]]) -> None:
    """Workers drop y where `reads_y` is False (GD, EF21, ...): the message must then be the same
    whatever y is; where it is True, some y must change it (else y is kept for nothing)."""
    d = 12
    built, _ = _build(variant, d)
    rng = np.random.default_rng(3)
    differs = False
    for t in range(8):
        h, x = _frozen(rng.normal(size=d)), _frozen(rng.normal(size=d))
        y1, y2 = _frozen(x.copy()), _frozen(x + 10 * rng.normal(size=d))  # lazy triggers: send, skip
        m1 = built.fn(h, y1, x, round_randomness(5, t, 0, 1)).apply(h)
        m2 = built.fn(h, y2, x, round_randomness(5, t, 0, 1)).apply(h)
        differs |= m1.tobytes() != m2.tobytes()
    assert differs == built.reads_y


def _frozen_state(state: Any) -> Any:
    for arr in state:
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    return state


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_step_does_not_mutate_its_inputs(
    variant: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    """Frozen h, y, x and a frozen worker state go through a round without a write."""
    d = 9
    rng = np.random.default_rng(1)
    h, y, x = (_frozen(rng.normal(size=d)) for _ in range(3))
    copies = [a.copy() for a in (h, y, x)]
    built, _ = _build(variant, d)
    fn = built.fn
    for t in range(5):
        fn(h, y, x, round_randomness(2, t, 0, 1))
    for before, after in zip(copies, (h, y, x)):
        assert before.tobytes() == after.tobytes()

    method, _, comp = variant
    c = _make(comp)
    for init in ("full", "compressed"):
        mech = m.three_point(
            method, fn, lambda _d: built.constants, DTYPE, init=init, initial=c, skips=built.skips,
            reads_y=built.reads_y,
        )
        message, state = mech.first(_frozen(rng.normal(size=d)), round_randomness(2, 0, 0, 1))
        for t in range(1, 6):
            state = _frozen_state(state)
            kept = [a.copy() for a in state if a is not None]
            grad = _frozen(rng.normal(size=d))
            message, new_state = mech.step(state, grad, round_randomness(2, t, 0, 1))
            assert all(k.tobytes() == a.tobytes() for k, a in zip(kept, [a for a in state if a is not None]))
            assert (new_state.y is None) == (not built.reads_y)
            # The worker's new h is the coordinator's mirror after the same message.
            assert message.apply(state.h).tobytes() == new_state.h.tobytes()
            state = new_state


@pytest.mark.parametrize("name", ["marina", "error_feedback"])
def test_other_mechanisms_do_not_mutate_their_inputs(name: str) -> None:
    """MARINA and EF (when present) also leave frozen states and gradients alone."""
    if not hasattr(m, name):
        pytest.skip(f"threepc.common.mechanisms has no {name} yet")
    c = (
        make_compressor("rand_k", {"k": 2}, DTYPE)
        if name == "marina"
        else make_compressor("top_k", {"k": 2}, DTYPE)
    )
    mech = m.marina(c, 0.3, DTYPE) if name == "marina" else m.error_feedback(c, 0.1)
    rng = np.random.default_rng(3)
    _, state = mech.first(_frozen(rng.normal(size=7)), round_randomness(4, 0, 0, 1))
    for t in range(1, 8):
        state = _frozen_state(state)
        kept = [a.copy() for a in state]
        _, new_state = mech.step(state, _frozen(rng.normal(size=7)), round_randomness(4, t, 0, 1))
        assert all(k.tobytes() == a.tobytes() for k, a in zip(kept, state))
        state = new_state
