"""Gradient oracles: what gradient a worker feeds its mechanism (ALGORITHMS.md section 4).

    full     grad f_i(x)
    sgd      (1/b) sum_{j in S} w_j grad f_ij(x): uniform sampling (w_j = 1), or importance
             sampling P(j) = L_ij / (m Lbar_i) with w_j = Lbar_i / L_ij; minibatch of b rows
    lsvrg    grad_S f(x) - grad_S f(w) + grad f_i(w), and w <- x with probability p (about 1/m);
             the full gradient at w is recomputed only when w moves (EC-LSVRG)

An oracle is a NamedTuple of pure functions like a mechanism: `init(problem) -> state`,
`estimate(state, problem, x, r) -> (gradient, state)`. Its draws come from a stream of their
own, so they never shift the mechanism's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from threepc.common.config import Component
from threepc.common.errors import ConfigError
from threepc.common.problems import Problem
from threepc.common.randomness import Randomness

SAMPLING_STREAM = 0x5A3


class Oracle(NamedTuple):
    name: str
    init: Callable[[Problem], Any]
    estimate: Callable[[Any, Problem, np.ndarray, Randomness], tuple[np.ndarray, Any]]
    exact: bool  # True: the estimate is grad f_i(x) itself


class ReferencePoint(NamedTuple):
    """L-SVRG's state."""

    w: np.ndarray | None  # the reference point (None until the first round)
    grad_w: np.ndarray | None  # grad f_i(w), recomputed only when w moves


def _sampler(problem: Problem, batch: int, sampling: str) -> Callable[[Randomness], tuple[np.ndarray, np.ndarray]]:
    m = problem.rows
    if sampling == "uniform":
        probs, weights = None, np.ones(m)
    elif sampling == "importance":
        row_l = problem.row_smoothness()
        probs = row_l / row_l.sum()  # = L_ij / (m Lbar_i)
        weights = row_l.mean() / row_l  # = Lbar_i / L_ij
    else:
        raise ConfigError(f"gradient sampling must be 'uniform' or 'importance', got {sampling!r}")

    def draw(r: Randomness) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([r.shared_seed, r.worker_id, SAMPLING_STREAM])
        rows = rng.choice(m, size=batch, replace=True, p=probs)
        return rows, weights[rows]

    return draw


def full() -> Oracle:
    return Oracle("full", lambda problem: None, lambda state, problem, x, r: (problem.grad(x), None), True)


def sgd(batch: int = 1, sampling: str = "uniform") -> Oracle:
    if batch < 1:
        raise ConfigError(f"gradient batch must be >= 1, got {batch}")
    samplers: dict[int, Callable] = {}

    def estimate(state: Any, problem: Problem, x: np.ndarray, r: Randomness) -> tuple[np.ndarray, Any]:
        draw = samplers.setdefault(id(problem), _sampler(problem, batch, sampling))
        rows, weights = draw(r)
        return problem.grad_rows(x, rows, weights), None

    return Oracle(f"sgd(batch={batch}, sampling={sampling})", lambda problem: None, estimate, False)


def lsvrg(batch: int = 1, p: float | None = None, sampling: str = "uniform") -> Oracle:
    if p is not None and not 0 < p <= 1:
        raise ConfigError(f"lsvrg: p must be in (0, 1], got {p}")
    samplers: dict[int, Callable] = {}

    def estimate(state: ReferencePoint, problem: Problem, x: np.ndarray, r: Randomness) -> tuple[np.ndarray, ReferencePoint]:
        if state.w is None:
            state = ReferencePoint(x.copy(), problem.grad(x))
        draw = samplers.setdefault(id(problem), _sampler(problem, batch, sampling))
        rows, weights = draw(r)
        assert state.w is not None and state.grad_w is not None
        g = problem.grad_rows(x, rows, weights) - problem.grad_rows(state.w, rows, weights) + state.grad_w
        move = np.random.default_rng([r.shared_seed, r.worker_id, SAMPLING_STREAM, 1]).random()
        if move < (p if p is not None else 1.0 / problem.rows):
            state = ReferencePoint(x.copy(), problem.grad(x))
        return g, state

    return Oracle("lsvrg", lambda problem: ReferencePoint(None, None), estimate, False)


ORACLES: dict[str, Callable[..., Oracle]] = {"full": full, "sgd": sgd, "lsvrg": lsvrg}


def make_oracle(spec: Component) -> Oracle:
    factory = ORACLES.get(spec.name)
    if factory is None:
        raise ConfigError(f"unknown gradient {spec.name!r}; known: {', '.join(ORACLES)}")
    try:
        return factory(**spec.params)
    except TypeError as err:
        raise ConfigError(f"gradient {spec.name!r}: {err}") from None
