"""Methods by config name: a worker mechanism, its constants, and the theory's stepsize.

`build_method(config, d)` turns the run's `method` and `compressor` components into a
`Mechanism` (threepc.common.mechanisms). A method parameter that names a second compressor
(3PCv2's `q`, 3PCv4's `c2`, 3PCv3's inner `c1`) is a component table like `compressor`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from threepc.common import mechanisms as m
from threepc.common.compressors import Compressor, make_compressor
from threepc.common.config import Component, RunConfig
from threepc.common.errors import ConfigError
from threepc.common.oracles import ORACLES
from threepc.common.payloads import DENSE, Form, Mode
from threepc.common.problems import CONVEXITY


class Smoothness(NamedTuple):
    """L_- (smoothness of f), L_+ (sqrt(mean L_i^2)), every L_i, and the Hessian variance L_pm
    where the problem can compute it (else None; L_pm <= L_+ bounds it)."""

    L_minus: float
    L_plus: float
    L_i: tuple[float, ...]
    L_pm: float | None = None


def _sub_compressor(spec: Any, dtype: str, what: str) -> Compressor:
    if spec is None:
        raise ConfigError(f"method needs a second compressor `{what}` (a table with a name)")
    component = Component.model_validate(spec)
    return make_compressor(component.name, component.params, dtype)


def _omega(q: Compressor, d: int) -> float:
    if q.omega is None:
        raise ConfigError(f"{q.name} is not unbiased; this method needs an unbiased compressor")
    return q.omega(d)


class ThreePoint(NamedTuple):
    """A 3PC function as a method uses it."""

    fn: m.ThreePointFn
    constants: m.Constants  # (A, B) at the run's dimension
    skips: bool  # whether its messages can be lazy skips
    reads_y: bool  # whether it reads y = grad f_i(x^t) (else the worker does not keep it)
    forms: frozenset[Form]  # the forms of its messages (what the coordinator accepts)
    whole: bool = False  # whether every message is g_i itself, dense (GD)


def _build_3pc(name: str, params: dict[str, Any], c: Compressor, dtype: str, d: int) -> ThreePoint:
    """The 3PC function of method `name` with compressor c at dimension d."""
    p = dict(params)

    def take(key: str, default: Any) -> Any:
        return p.pop(key, default)

    def number(key: str, default: float) -> float:
        """A numeric parameter, refused in one line where it is not a number (zeta = "x")."""
        value = take(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"method {name!r}: {key} must be a number, got {value!r}")
        return float(value)

    result: ThreePoint
    if name == "gd":
        result = ThreePoint(m.gd_3pc(dtype), m.Constants(1.0, 0.0), False, False, frozenset({m.FULL}), whole=True)
    elif name in ("ef21", "ef21_plus"):
        fn = m.ef21_3pc(c) if name == "ef21" else m.ef21_plus_3pc(c)
        modes = (Mode.DELTA,) if name == "ef21" else (Mode.DELTA, Mode.REPLACE)  # EF21+: h + C(x - h) or C(x)
        forms = frozenset(Form(mode, (c.emits,)) for mode in modes)
        result = ThreePoint(fn, m._ef21_constants(m._alpha(c, d)), False, False, forms)
    elif name == "naive":
        result = ThreePoint(m.naive_3pc(c), m.Constants(1.0, 0.0), False, False, frozenset({Form(Mode.REPLACE, (c.emits,))}))
    elif name == "lag":
        zeta = number("zeta", 1.0)
        forms = frozenset({m.FULL, m.SKIP})
        result = ThreePoint(m.lazy(m.gd_3pc(dtype), zeta), m.Constants(1.0, zeta), True, True, forms)
    elif name == "clag":
        zeta = number("zeta", 1.0)
        a, b = m._ef21_constants(m._alpha(c, d))
        forms = frozenset({Form(Mode.DELTA, (c.emits,)), m.SKIP})
        result = ThreePoint(m.lazy(m.ef21_3pc(c), zeta), m.Constants(a, max(b, zeta)), True, True, forms)
    elif name == "3pcv1":
        alpha = m._alpha(c, d)
        forms = frozenset({Form(Mode.REPLACE, (DENSE, c.emits))})
        result = ThreePoint(m.v1_3pc(c, dtype), m.Constants(1.0, 1.0 - alpha), False, True, forms)
    elif name == "3pcv2":
        q = _sub_compressor(take("q", None), dtype, "q")
        alpha = m._alpha(c, d)
        forms = frozenset({Form(Mode.DELTA, (q.emits, c.emits))})
        result = ThreePoint(m.v2_3pc(c, q), m.Constants(alpha, (1.0 - alpha) * _omega(q, d)), False, True, forms)
    elif name == "3pcv3":
        inner = Component.model_validate(take("inner", {"name": "ef21"}))
        inner_c = _sub_compressor(take("c1", None), dtype, "c1") if "c1" in p else c
        first = _build_3pc(inner.name, inner.params, inner_c, dtype, d)
        a1, b1 = first.constants
        alpha = m._alpha(c, d)
        constants = m.Constants(1 - (1 - alpha) * (1 - a1), (1 - alpha) * b1)
        forms = frozenset(form.then(c.emits) for form in first.forms)
        result = ThreePoint(m.v3_3pc(c, first.fn), constants, first.skips, first.reads_y, forms)
    elif name == "3pcv4":
        c2 = _sub_compressor(take("c2", None), dtype, "c2")
        abar = 1 - (1 - m._alpha(c, d)) * (1 - m._alpha(c2, d))
        forms = frozenset({Form(Mode.DELTA, (c2.emits, c.emits))})
        result = ThreePoint(m.v4_3pc(c, c2), m._ef21_constants(abar), False, False, forms)
    elif name == "3pcv5":
        prob = number("p", c.density(d))
        if not 0 < prob <= 1:
            raise ConfigError(f"3pcv5: p must be in (0, 1], got {prob}")
        shared_coin = take("shared_coin", False)
        if not isinstance(shared_coin, bool):
            raise ConfigError(f"method '3pcv5': shared_coin must be true or false, got {shared_coin!r}")
        alpha = m._alpha(c, d)
        a = 1 - math.sqrt(1 - prob)
        constants = m.Constants(a, (1 - prob) * (1 - alpha) / a)
        forms = frozenset({m.FULL, Form(Mode.DELTA, (c.emits,))})
        result = ThreePoint(m.v5_3pc(c, prob, dtype, shared_coin), constants, False, True, forms)
    else:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(THREE_POINT))}")
    if p:
        raise ConfigError(f"method {name!r}: unknown parameter(s) {', '.join(sorted(p))}")
    return result


# Config name -> parameters it takes (for `threepc methods` and error messages).
THREE_POINT: dict[str, str] = {
    "gd": "",
    "ef21": "",
    "ef21_plus": "",
    "lag": "zeta=1.0",
    "clag": "zeta=1.0",
    "3pcv1": "",
    "3pcv2": "q={name=...}",
    "3pcv3": "inner={name=...}, c1={name=...}",
    "3pcv4": "c2={name=...}",
    "3pcv5": "p=k/d, shared_coin=false",
    "naive": "",
}


# The 3PC constants (A, B) of each method, as the 3PC paper's Table 1 gives them (alpha: C's).
CONSTANTS: dict[str, str] = {
    "gd": "A = 1, B = 0",
    "ef21": "A = 1 - sqrt(1 - alpha), B = (1 - alpha) / (1 - sqrt(1 - alpha))",
    "ef21_plus": "as EF21",
    "lag": "A = 1, B = zeta",
    "clag": "A = 1 - sqrt(1 - alpha), B = max((1 - alpha) / (1 - sqrt(1 - alpha)), zeta)",
    "3pcv1": "A = 1, B = 1 - alpha",
    "3pcv2": "A = alpha, B = (1 - alpha) omega_q",
    "3pcv3": "A = 1 - (1 - alpha)(1 - A1), B = (1 - alpha) B1",
    "3pcv4": "as EF21 with abar = 1 - (1 - alpha1)(1 - alpha2)",
    "3pcv5": "A = 1 - sqrt(1 - p), B = (1 - p)(1 - alpha) / (1 - sqrt(1 - p)); "
    "shared_coin = true: one coin per round for every worker (the authors' code), same A, B",
    "naive": "g_i = C(grad f_i), no error feedback: not a 3PC, can stall (stepsize as GD's)",
    "marina": "gamma = 1/(L_- + L_+ sqrt((1-p) omega / (p n))); AB form for PermK, CQ; "
    "iscc: 1/(L_- + L_w sqrt((omega + 1)(1-p)/p)), L_w = mean L_j at q_j ~ L_j",
    "ef14": "convex f_ij: gamma = 1/(4 M) absolute C, min(1/(8 M), alpha/sqrt(96 L_- E)) "
    "contractive C; M = L_-, L_- + 2 cL/n, L_- + 14 cL/(3n) and E = 4 max L_i, 4 cL, 18 cL "
    "for full, sgd, lsvrg gradients (cL: expected smoothness)",
}

# Methods outside the 3PC family, with their parameters.
OTHER: dict[str, str] = {
    "marina": "p=zeta_Q/d, iscc=false, weights=L_j",
    "ef14": "[gradient] full, sgd (EC-SGD), lsvrg",
}


def _marina_p(config: RunConfig, c: Compressor, d: int) -> float:
    """MARINA's p: given, or zeta_Q / d, the expected fraction of a dense message Q sends."""
    default = c.density_n(d, config.workers) if c.density_n is not None else c.density(d)
    p = float(config.method.params.get("p", default))
    if not 0 < p <= 1:
        raise ConfigError(f"marina: p must be in (0, 1], got {p}")
    return p


def _iscc_sampling(
    config: RunConfig, default: Sequence[float] | None = None
) -> tuple[float, ...] | None:
    """MARINA's ISCC probabilities q_j: `weights` (the plan sets them from L_j), normalized;
    `default` if none (the plan's stepsize passes the L_j it will set), else uniform; None
    without `iscc = true`."""
    params = config.method.params
    if not params.get("iscc", False):
        return None
    weights = params.get("weights") or (list(default) if default else [1.0] * config.workers)
    if len(weights) != config.workers or min(weights) <= 0:
        raise ConfigError(f"marina: iscc weights must be {config.workers} positive numbers, got {weights}")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def build_method(config: RunConfig, d: int) -> m.Mechanism:
    """The run's worker mechanism at dimension d."""
    dtype = config.wire.value_dtype
    state = config.wire.iterate_dtype  # h and the coordinator's mirrors of it
    c = make_compressor(config.compressor.name, config.compressor.params, dtype)
    name = config.method.name
    if name in OTHER:
        unknown = set(config.method.params) - ({"p", "iscc", "weights"} if name == "marina" else set())
        if unknown:
            raise ConfigError(f"method {name!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        if name == "marina":
            if c.omega is None and c.ab is None and c.alpha is not None:
                raise ConfigError(f"marina: {c.name} is biased; MARINA needs an unbiased compressor")
            return m.marina(c, _marina_p(config, c, d), dtype, _iscc_sampling(config), state)
        if not isinstance(config.stepsize, float):
            raise ConfigError("ef14: give an explicit stepsize (the paper states no closed form for it)")
        return m.error_feedback(c, config.stepsize * config.stepsize_multiplier)
    built = _build_3pc(name, config.method.params, c, dtype, d)
    return m.three_point(
        name, built.fn, lambda _d: built.constants, dtype, init=config.init, initial=c, skips=built.skips,
        state_dtype=state, reads_y=built.reads_y, whole=built.whole and config.init == "full", forms=built.forms,
    )


def theory_stepsize(mechanism: m.Mechanism, d: int, smooth: Smoothness) -> float:
    """gamma = 1 / (L_- + L_+ sqrt(B / A)) (3PC paper, Theorem 1)."""
    a, b = mechanism.constants(d)
    return 1.0 / (smooth.L_minus + smooth.L_plus * math.sqrt(b / a))


def marina_stepsize(config: RunConfig, d: int, smooth: Smoothness) -> float:
    """MARINA's theory stepsize (ALGORITHMS.md section 3).

    Independent unbiased Q: gamma = 1 / (L_- + L_+ sqrt((1 - p) omega / (p n))).
    Correlated Q with the AB-inequality (PermK, ...):
    gamma = 1 / (L_- + sqrt(((1 - p)/p) ((A - B) L_+^2 + B L_pm^2))), with L_pm <= L_+ where the
    problem does not give it. With `iscc = true`: `iscc_stepsize`.
    """
    c = make_compressor(config.compressor.name, config.compressor.params, config.wire.value_dtype)
    p, n = _marina_p(config, c, d), config.workers
    sampling = _iscc_sampling(config, smooth.L_i)
    if sampling is not None:
        return iscc_stepsize(c, d, p, smooth, sampling)
    if c.omega is not None:
        return 1.0 / (smooth.L_minus + smooth.L_plus * math.sqrt((1 - p) * c.omega(d) / (p * n)))
    if c.ab is None:
        raise ConfigError(
            f"marina: {c.name} states neither omega nor AB-inequality constants: give an explicit stepsize"
        )
    a, b = c.ab(d, n)
    l_pm = smooth.L_pm if smooth.L_pm is not None else smooth.L_plus
    return 1.0 / (smooth.L_minus + math.sqrt((1 - p) / p * ((a - b) * smooth.L_plus**2 + b * l_pm**2)))


def iscc_stepsize(
    c: Compressor, d: int, p: float, smooth: Smoothness, sampling: Sequence[float]
) -> float:
    """MARINA with the importance-sampling combinatorial compressor (ISCC): the CQ paper's
    Theorem 2 (MARINA under the weighted AB-inequality, its Assumption 6) with Lemma 4's constants,
    as its Theorem 3 combines them.

    In a compressed round worker j ~ q sends Q(a_j / q_j) and g moves by S = Q(a_j / q_j) / n, so
    for Q unbiased with variance omega
        E||S - mean a||^2 = sum_j E||Q(a_j / q_j)||^2 q_j / n^2 - ||mean a||^2
                          <= (omega + 1) sum_j ||a_j||^2 / (n^2 q_j) - ||mean a||^2:
    the weighted AB-inequality with A = omega + 1, B = 1 and weights w = q (Lemma 4; the paper's
    formulas were lost in conversion, so it is re-derived here). Theorem 2's stepsize
        gamma = 1 / (L_- + sqrt((1 - p)/p ((A - B) L_{+,w}^2 + B L_{pm,w}^2)))
    with L_{+,w}^2 = sum_j L_j^2 / (n^2 q_j) (its Assumption 7, from the L_j) and the weighted
    Hessian variance bounded by it (L_{pm,w} <= L_{+,w}; nothing smaller is computed) is
        gamma = 1 / (L_- + L_{+,w} sqrt((omega + 1)(1 - p) / p)).
    At the plan's q_j = L_j / sum_l L_l, L_{+,w} = L_AM = mean_j L_j (Theorem 3).
    """
    if c.omega is None:
        raise ConfigError(
            f"marina with iscc: {c.name} states no omega; ISCC composes one unbiased compressor "
            "with importance sampling (CQ paper, Lemma 4): give an explicit stepsize"
        )
    n = len(sampling)
    if len(smooth.L_i) != n:
        raise ConfigError(f"marina with iscc: {n} sampling weights for {len(smooth.L_i)} workers")
    plus_w = math.sqrt(sum(L * L / (n * n * q) for L, q in zip(smooth.L_i, sampling)))
    return 1.0 / (smooth.L_minus + plus_w * math.sqrt((c.omega(d) + 1.0) * (1.0 - p) / p))


def expected_smoothness(
    rows: Sequence[np.ndarray], L_i: Sequence[float], batch: int, sampling: str
) -> float:
    """The expected smoothness cL of a minibatch of `batch` rows drawn with replacement (EC-SGD
    paper, 'Arbitrary sampling'): the smallest cL with, on every worker i,
        E||grad f_xi(x) - grad f_xi(x*)||^2 <= 2 cL D_{f_i}(x, x*)   (f_ij convex, L_ij-smooth).

    One row (the paper's values): uniform sampling cL_US = max_ij L_ij; importance sampling
    (P(j) = L_ij / (m Lbar_i), weight Lbar_i / L_ij) cL_IS = max_i Lbar_i, Lbar_i = mean_j L_ij.
    b rows average b independent draws X_s with mean grad f_i(x) - grad f_i(x*), and
    E||mean_s X_s||^2 = (1 - 1/b) ||E X||^2 + E||X||^2 / b, so with ||E X||^2 <= 2 L_i D_{f_i}:
        cL = max_i (cL_1,i / b + (1 - 1/b) L_i).
    `rows[i]` holds worker i's L_ij (Problem.row_smoothness), `L_i` its f_i's constant.
    """
    if batch < 1:
        raise ConfigError(f"gradient batch must be >= 1, got {batch}")
    if sampling not in ("uniform", "importance"):
        raise ConfigError(f"gradient sampling must be 'uniform' or 'importance', got {sampling!r}")
    one = [float(np.max(r)) if sampling == "uniform" else float(np.mean(r)) for r in rows]
    return max(single / batch + (1.0 - 1.0 / batch) * L for single, L in zip(one, L_i))


def _oracle_params(spec: Component) -> dict[str, Any]:
    """A gradient oracle's parameters with its factory's defaults filled in."""
    factory = ORACLES.get(spec.name)
    if factory is None:
        raise ConfigError(f"unknown gradient {spec.name!r}; known: {', '.join(ORACLES)}")
    parameters = inspect.signature(factory).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    return {**defaults, **spec.params}


def ef14_stepsize(
    config: RunConfig, d: int, smooth: Smoothness, rows: Callable[[], Sequence[np.ndarray]]
) -> float:
    """EF / EC-SGD's theory stepsize on convex problems (Danilova and Gorbunov 2022,
    arXiv:2203.02383, 'Unified analysis'; ec-sgd-absolute-compression.md). `rows()` gives every
    worker's row constants L_ij; it is called only for stochastic gradients.

    Assumptions (the paper's): every row loss f_ij convex and L_ij-smooth, f L_--smooth, and f
    mu-strongly convex for the linear rate (mu = 0 is covered too; the stepsize has no mu). A
    problem not known to be convex (problems.CONVEXITY) is refused.

    The paper's general theorem: if g^k = mean_i g_i^k is unbiased and, for some sigma_k,
        E||g^k||^2 <= 2 A (f(x^k) - f*) + B sigma_k^2 + D_1,
        E sigma_{k+1}^2 <= (1 - rho) sigma_k^2 + 2 C (f(x^k) - f*) + D_2,
    then EC-SGD with an absolute compressor (||C(x) - x||^2 <= Delta^2) satisfies
        E f(xbar^K) - f* <= (1 - eta)^(K+1) 2 T^0 / gamma
                            + 2 gamma (D_1 + F D_2 + 3 L gamma Delta^2).
    Our copy of the paper (the talk) states the bound but not the stepsize; redoing its proof
    (the virtual iterate x - mean_i e_i moves by -gamma g^k; Young's inequality on
    <grad f(x^k), mean_i e_i^k>) gives exactly that bound under
        gamma <= 1 / (4 M),   M = A + C F,   F = 4 B / (3 rho),   eta = min(gamma mu / 2, rho / 4),
    the constants of Gorbunov et al. 2020's framework, which the paper extends (to be checked
    against the arXiv text). The paper's gradient estimators (cL: `expected_smoothness`):
        full   g_i = grad f_i(x):        A = L_-,           B = 0              M = L_-
        sgd    arbitrary sampling:       A = L_- + 2 cL/n,  B = 0              M = L_- + 2 cL/n
        lsvrg  EC-LSVRG, w <- x w.p. p:  A = L_- + 2 cL/n,  B = 2/n, rho = p,  C = p cL
                                                                               M = L_- + 14 cL/(3n)
    (p cancels in M: the stepsize does not depend on L-SVRG's p).

    Contractive compressors (alpha): the paper only quotes the rate O(L/(alpha mu) exp(-alpha mu
    K / L) + ...) of earlier work (its 'Convergence of EC-SGD' slide, Stich and Karimireddy 2019),
    no closed form. The stepsize here is derived in the same proof, not quoted: with
        E||e_i^{k+1}||^2 <= (1 - alpha/2) ||e_i^k||^2 + (2/alpha) gamma^2 E||g_i^k||^2,
        mean_i E||g_i^k||^2 <= E (f(x^k) - f*) + const, E = 4 max_i L_i (full), 4 cL (sgd),
        18 cL (lsvrg, its sigma_k summed in),
    the error term 3 L_- gamma ||mean e^k||^2 takes at most a quarter of gamma (f(x^k) - f*) when
        gamma <= min(1 / (8 M), alpha / sqrt(96 L_- E))   (and eta <= alpha/4).

    Our mechanism compresses e + gamma g (ALGORITHMS.md section 4), the paper gamma C(e/gamma + g):
    the same for positively homogeneous C (TopK); for HardThreshold(lambda) ours acts as the
    paper's threshold lambda/gamma, so its error is Delta, not gamma Delta. That changes the
    neighbourhood (3 L Delta^2 in place of 3 L gamma^2 Delta^2), not the stepsize condition.
    """
    convex = CONVEXITY.get(config.problem.name)
    if convex is None or not convex(config.problem.params, config.workers):
        raise ConfigError(
            "ef14: give an explicit stepsize: the EC-SGD theory stepsize (Danilova and Gorbunov "
            f"2022) needs convex f_ij, and {config.problem.name!r} with these parameters is not "
            f"known to be convex (known convex: {', '.join(sorted(CONVEXITY))})"
        )
    c = make_compressor(config.compressor.name, config.compressor.params, config.wire.value_dtype)
    if c.absolute is None and c.alpha is None:
        raise ConfigError(
            f"ef14: give an explicit stepsize: {c.name} is neither absolute nor contractive "
            "(the EC-SGD theory covers those two kinds)"
        )
    n, L = config.workers, smooth.L_minus
    oracle = config.gradient.name
    if oracle == "full":
        M, E = L, 4.0 * max(smooth.L_i)
    else:
        params = _oracle_params(config.gradient)
        cL = expected_smoothness(rows(), smooth.L_i, int(params["batch"]), str(params["sampling"]))
        if oracle == "sgd":
            M, E = L + 2.0 * cL / n, 4.0 * cL
        elif oracle == "lsvrg":
            M, E = L + 14.0 * cL / (3.0 * n), 18.0 * cL
        else:
            raise ConfigError(
                f"ef14: no theory stepsize for gradient {oracle!r}: give an explicit stepsize"
            )
    if c.absolute is not None:
        return 1.0 / (4.0 * M)
    assert c.alpha is not None
    return min(1.0 / (8.0 * M), c.alpha(d) / math.sqrt(96.0 * L * E))


def stepsize(
    config: RunConfig,
    mechanism: m.Mechanism,
    d: int,
    smooth: Smoothness,
    rows: Callable[[], Sequence[np.ndarray]] = tuple,
) -> float:
    """The run's gamma: explicit, or the theory's, times the multiplier. `rows()`: every
    worker's row constants L_ij (EF14 with stochastic gradients asks for them)."""
    if isinstance(config.stepsize, float):
        base = config.stepsize
    elif config.method.name == "ef14":
        base = ef14_stepsize(config, d, smooth, rows)
    elif config.method.name == "marina":
        base = marina_stepsize(config, d, smooth)
    else:
        base = theory_stepsize(mechanism, d, smooth)
    return base * config.stepsize_multiplier

