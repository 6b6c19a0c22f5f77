"""Local problems f_i, their gradients and smoothness constants (ALGORITHMS.md section 5).

A problem knows nothing of methods or the wire: `loss(x)`, `grad(x)` and `smoothness()` (L_i)
on one worker's data. `make_problem` builds one from the run's problem config and a data shard.

    logreg_nonconvex, logreg_l2, least_squares   linear models on the data shard (below)
    quadratic     f_i(x) = 1/2 x^T A_i x - b_i^T x, generated from (seed, i) (CQ paper, App. D.3,
                  Algorithm 5: controlled L_- and Hessian variance L_pm)
    quadratic_different_l   the same family with A_i = c_i T, c_i spread by `noise_scale`
                  (CQ paper, Algorithm 6: workers of different L_i)
    autoencoder   f(D, E) = (1/N) sum_a ||D E a - a||^2, in torch (threepc.common.torch_problems)
    torch         any torch nn.Module with a loss, on the data shard (threepc.common.torch_problems)

torch is optional: this module never imports it; building a torch problem does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from threepc.common.config import check_types
from threepc.common.data import Dataset
from threepc.common.errors import ConfigError


class Problem(Protocol):
    """f_i on one worker's data."""

    @property
    def dim(self) -> int: ...

    @property
    def rows(self) -> int: ...

    def loss(self, x: np.ndarray) -> float: ...

    def grad(self, x: np.ndarray) -> np.ndarray: ...

    def smoothness(self) -> float: ...

    def grad_rows(self, x: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray: ...

    def row_smoothness(self) -> np.ndarray: ...


def lambda_max_gram(features: sp.csr_matrix | np.ndarray) -> float:
    """Largest eigenvalue of A^T A (dense eigensolver for small d, Lanczos otherwise)."""
    d = features.shape[1]
    if d <= 2048:
        gram = (features.T @ features).toarray() if sp.issparse(features) else features.T @ features
        return float(np.linalg.eigvalsh(gram)[-1])
    from scipy.sparse.linalg import svds

    top = svds(features.astype(np.float64), k=1, return_singular_vectors=False, random_state=0)
    return float(top[0] ** 2)


@dataclass(frozen=True, eq=False)
class _LinearModel:
    """f_i(x) = (1/m) sum_j phi(a_j^T x, y_j) + r(x) on a shard's features A (m x d) and targets y.

    A subclass gives the row loss phi (with phi'' <= `curvature`) and the regularizer r (with an
    L-smooth gradient, `reg_smoothness`); the gradients, minibatch gradients and smoothness
    constants follow: L_i = curvature * lambda_max(A^T A) / m + reg_smoothness, and the row
    constant L_ij = curvature * ||a_j||^2 + reg_smoothness (for importance sampling).
    """

    features: sp.csr_matrix
    labels: np.ndarray
    curvature = 0.25

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    def _phi(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row losses and their derivatives in z."""
        raise NotImplementedError

    def _reg(self, x: np.ndarray) -> tuple[float, np.ndarray | float]:
        return 0.0, 0.0  # no regularizer: a scalar zero, not a d-vector of them

    def reg_smoothness(self) -> float:
        return 0.0

    def loss(self, x: np.ndarray) -> float:
        values, _ = self._phi(self.features @ x, self.labels)
        return float(np.mean(values)) + self._reg(x)[0]

    def grad(self, x: np.ndarray) -> np.ndarray:
        _, slopes = self._phi(self.features @ x, self.labels)
        # 1/m on the m slopes, not on the d-vector: at d = 1e6 each pass over it costs ~0.35 ms.
        grad = np.asarray(self.features.T @ (slopes / self.rows), dtype=np.float64)
        reg = self._reg(x)[1]
        if not isinstance(reg, float):
            grad += reg
        return grad

    def grad_rows(self, x: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(1/b) sum_{j in rows} w_j grad f_ij(x), with f_ij = phi(a_j^T x, y_j) + r(x)."""
        part = self.features[rows]
        _, slopes = self._phi(part @ x, self.labels[rows])
        return (
            np.asarray(part.T @ (weights * slopes / rows.size))
            + float(np.mean(weights)) * self._reg(x)[1]
        )

    def smoothness(self) -> float:
        return self.curvature * lambda_max_gram(self.features) / self.rows + self.reg_smoothness()

    def row_smoothness(self) -> np.ndarray:
        squared_norms = np.asarray(self.features.multiply(self.features).sum(axis=1)).ravel()
        return self.curvature * squared_norms + self.reg_smoothness()


class _Logistic(_LinearModel):
    """phi(z, y) = log(1 + exp(-y z)), phi'' <= 1/4."""

    def _phi(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        margins = y * z
        return np.logaddexp(0.0, -margins), -y * expit(-margins)


@dataclass(frozen=True, eq=False)
class LogisticNonconvex(_Logistic):
    """f_i(x) = (1/m) sum_j log(1 + exp(-y_j a_j^T x)) + lam sum_k x_k^2 / (1 + x_k^2).

    L_i <= lambda_max(A_i^T A_i) / (4 m) + 2 lam (EF21 paper, Section 4).
    """

    lam: float = 0.1

    def _reg(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        sq = x * x
        return self.lam * float(np.sum(sq / (1.0 + sq))), 2.0 * self.lam * x / (1.0 + sq) ** 2

    def reg_smoothness(self) -> float:
        return 2.0 * self.lam


@dataclass(frozen=True, eq=False)
class LogisticL2(_Logistic):
    """f_i(x) = (1/m) sum_j log(1 + exp(-y_j a_j^T x)) + (lam/2) ||x||^2; L_i = lmax/(4m) + lam."""

    lam: float = 0.1

    def _reg(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.5 * self.lam * float(x @ x), self.lam * x

    def reg_smoothness(self) -> float:
        return self.lam


@dataclass(frozen=True, eq=False)
class LeastSquares(_LinearModel):
    """f_i(x) = (1/m) ||A_i x - y_i||^2; L_i = 2 lambda_max(A_i^T A_i) / m."""

    curvature = 2.0

    def _phi(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = z - y
        return r * r, 2.0 * r


def tridiagonal_extremes(d: int) -> tuple[float, float]:
    """Smallest and largest eigenvalues of T = tridiag(-1, 2, -1) (d x d): 4 sin^2(k pi / (2 (d + 1)))
    for k = 1 and k = d (the sine form keeps the smallest one accurate at d = 1e6)."""
    angle = math.pi / (2 * (d + 1))
    return 4 * math.sin(angle) ** 2, 4 * math.sin(d * angle) ** 2


@dataclass(frozen=True)
class QuadraticFamily:
    """The n quadratics of the CQ paper's Algorithm 5 (Appendix D.3, after Tyurin et al. 2022):

        nu_i = 1 + s xi_i,  nu'_i = s xi'_i,  xi_i, xi'_i ~ N(0, 1) from the seed (seed, i)
        c_i = (L/4) nu_i,   A_i = c_i T + shift I,   b_i = c_i (nu'_i - 1) e_1
        shift = lam - lambda_min((1/n) sum_i c_i T)   (so that lambda_min(mean A) = lam)

    with T = tridiag(-1, 2, -1) and s the noise scale. Every A_i is a multiple of the same T
    plus the same shift, so the constants have closed forms in the extreme eigenvalues of T:
    L_i = ||A_i||_2, L_- = ||mean A||_2 and the Hessian variance
    L_pm^2 = lambda_max((1/n) sum A_i^2 - (mean A)^2) = var(c) lambda_max(T)^2, so
    L_pm = std(c) lambda_max(T) ~ L s: zero at s = 0 (equal Hessians, differing b_i only).
    A worker's (c_i, b_i) come from (seed, i) alone; the shift needs all n draws, which every
    worker redraws (2 normals each).
    """

    dim: int
    scales: np.ndarray  # c_i, one per worker
    offsets: np.ndarray  # b_i[0], one per worker (b_i is zero elsewhere)
    shift: float  # added to every A_i's diagonal

    @property
    def n_workers(self) -> int:
        return int(self.scales.size)

    def _matrix(self, scale: float) -> sp.csr_matrix:
        d = self.dim
        main = np.full(d, 2.0 * scale + self.shift)
        side = np.full(d - 1, -scale)
        return sp.diags([side, main, side], [-1, 0, 1], shape=(d, d), format="csr")

    def _vector(self, offset: float) -> np.ndarray:
        b = np.zeros(self.dim)
        b[0] = offset
        return b

    def _norm(self, scale: float) -> float:
        """||c T + shift I||_2 (its eigenvalues are c mu + shift, mu in [mu_min, mu_max])."""
        mu_min, mu_max = tridiagonal_extremes(self.dim)
        return float(max(abs(scale * mu_min + self.shift), abs(scale * mu_max + self.shift)))

    def worker(self, i: int) -> Quadratic:
        """Worker i's f_i, with L_i = ||A_i||_2 (lambda_max(A_i) when A_i is positive definite)."""
        return Quadratic(
            self._matrix(self.scales[i]), self._vector(self.offsets[i]), self._norm(self.scales[i])
        )

    def whole(self) -> Quadratic:
        """f = (1/n) sum_i f_i = 1/2 x^T (mean A) x - (mean b)^T x, with L_- = ||mean A||_2."""
        scale = float(np.mean(self.scales))
        return Quadratic(
            self._matrix(scale), self._vector(float(np.mean(self.offsets))), self._norm(scale)
        )

    def hessian_variance(self) -> float:
        """L_pm = sqrt(lambda_max((1/n) sum_i A_i^2 - (mean A)^2)) = std(c) lambda_max(T)."""
        if np.ptp(self.scales) == 0:
            return 0.0
        return float(np.std(self.scales)) * tridiagonal_extremes(self.dim)[1]

    def plus_tight(self) -> float:
        """The tight L_+ of the 3PC paper's Assumption 3: sqrt(lambda_max((1/n) sum_i A_i^2))."""
        mu_min, mu_max = tridiagonal_extremes(self.dim)
        c = self.scales
        return math.sqrt(max(float(np.mean((c * mu + self.shift) ** 2)) for mu in (mu_min, mu_max)))


def _family_dim(where: str, n_workers: int, dim: float, noise_scale: float, L: float, seed: int) -> int:
    """The quadratic generators' shared parameter checks; `dim` as an int (TOML reads 1e6 as a float)."""
    if isinstance(dim, float) and dim.is_integer():
        dim = int(dim)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"{where}: dim must be an integer >= 1, got {dim!r}")
    if not noise_scale >= 0:
        raise ConfigError(f"{where}: noise_scale must be >= 0, got {noise_scale!r}")
    if not L > 0:
        raise ConfigError(f"{where}: L must be > 0, got {L!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    if n_workers < 1:
        raise ConfigError(f"{where}: needs n_workers >= 1, got {n_workers}")
    return dim


def quadratic_family(
    n_workers: int,
    *,
    dim: float = 1000,
    noise_scale: float = 0.0,
    lam: float = 1e-6,
    L: float = 1.0,
    seed: int = 0,
) -> QuadraticFamily:
    """The n workers' quadratics (see `QuadraticFamily`): dimension `dim`, noise scale s,
    lambda_min of the mean Hessian `lam`, base curvature `L` (lambda_max(A_i) < L + lam at s = 0)."""
    dim = _family_dim("problem 'quadratic'", n_workers, dim, noise_scale, L, seed)
    draws = np.array(
        [np.random.default_rng([seed, i]).standard_normal(2) for i in range(n_workers)]
    )
    nu = 1.0 + noise_scale * draws[:, 0]
    nu_b = noise_scale * draws[:, 1]
    scales = (L / 4.0) * nu
    offsets = scales * (nu_b - 1.0)
    mean_scale = float(np.mean(scales))
    mu_min, mu_max = tridiagonal_extremes(dim)
    shift = float(lam) - min(mean_scale * mu_min, mean_scale * mu_max)
    return QuadraticFamily(dim, scales, offsets, shift)


@dataclass(frozen=True, eq=False)
class Quadratic:
    """f_i(x) = 1/2 x^T A x - b^T x with A symmetric (sparse), L_i = ||A||_2 given by its maker.

    A generated f_i has no data rows: it is one "row" (rows = 1, f_i1 = f_i), so a stochastic
    gradient oracle returns the exact gradient (times the mean weight) and L_i1 = L_i.
    """

    matrix: sp.csr_matrix
    vector: np.ndarray
    lipschitz: float

    @property
    def dim(self) -> int:
        return int(self.vector.size)

    @property
    def rows(self) -> int:
        return 1

    def loss(self, x: np.ndarray) -> float:
        return float(0.5 * x @ (self.matrix @ x) - self.vector @ x)

    def grad(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.matrix @ x) - self.vector

    def grad_rows(self, x: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(1/b) sum_j w_j grad f_i(x): the one row is f_i itself."""
        if np.any(rows != 0):
            raise ConfigError(f"quadratic problem has one row; asked for rows {np.unique(rows)}")
        return float(np.mean(weights)) * self.grad(x)

    def smoothness(self) -> float:
        return self.lipschitz

    def row_smoothness(self) -> np.ndarray:
        return np.array([self.lipschitz])

    def initial_point(self, seed: int = 0) -> np.ndarray:
        """The CQ paper's starting point x^0 = (sqrt(d), 0, ..., 0) (Algorithm 5); `seed` unused."""
        x0 = np.zeros(self.dim)
        x0[0] = math.sqrt(self.dim)
        return x0


# A problem factory: (worker's shard, config params, worker id or None for the whole f, n) -> Problem.
ProblemFactory = Callable[[Dataset, dict[str, Any], "int | None", int], Problem]


def _on_data(cls: type) -> ProblemFactory:
    """A data-driven problem: the class built on the shard's features and labels."""

    def build(
        data: Dataset, params: dict[str, Any], worker_id: int | None, n_workers: int
    ) -> Problem:
        check_types(cls, params, f"problem {cls.__name__}")
        problem: Problem = cls(data.features, data.labels, **params)
        return problem

    return build


def _quadratic(
    data: Dataset, params: dict[str, Any], worker_id: int | None, n_workers: int
) -> Problem:
    """Generated from (seed, i): the data shard is not used."""
    family = quadratic_family(n_workers, **params)
    return family.whole() if worker_id is None else family.worker(worker_id)


def _torch_module(kind: str) -> Any:
    try:
        from threepc.common import torch_problems
    except ImportError as err:
        raise ConfigError(
            f"problem {kind!r} needs torch ({err}); install it with pip install 'threepc[torch]'"
        ) from err
    return torch_problems


def _autoencoder(
    data: Dataset, params: dict[str, Any], worker_id: int | None, n_workers: int
) -> Problem:
    problem: Problem = _torch_module("autoencoder").autoencoder(data, params, worker_id, n_workers)
    return problem


def _torch(data: Dataset, params: dict[str, Any], worker_id: int | None, n_workers: int) -> Problem:
    problem: Problem = _torch_module("torch").module_problem(data, params)
    return problem


PROBLEMS: dict[str, ProblemFactory] = {
    "logreg_nonconvex": _on_data(LogisticNonconvex),
    "logreg_l2": _on_data(LogisticL2),
    "least_squares": _on_data(LeastSquares),
    "quadratic": _quadratic,
    "autoencoder": _autoencoder,
    "torch": _torch,
}


def make_problem(
    kind: str,
    data: Dataset,
    params: dict[str, Any],
    *,
    worker_id: int | None = None,
    n_workers: int = 1,
) -> Problem:
    """Problem `kind` with its config parameters (e.g. lam): worker i's f_i on its shard `data`,
    or, with worker_id None, the whole f on all the data (for L_- and the theory's stepsize).

    Data-driven problems only look at `data`; generated ones (quadratics) use worker_id/n_workers.
    """
    factory = PROBLEMS.get(kind)
    if factory is None:
        raise ConfigError(f"unknown problem {kind!r}; known: {', '.join(sorted(PROBLEMS))}")
    try:
        return factory(data, dict(params), worker_id, n_workers)
    except TypeError as err:
        raise ConfigError(f"problem {kind!r}: {err}") from err


def hessian_variance(kind: str, params: dict[str, Any], n_workers: int) -> float | None:
    """The Hessian variance L_pm (CQ paper, Definition 4), the smallest L with
    (1/n) sum_i ||grad f_i(x) - grad f_i(y)||^2 - ||grad f(x) - grad f(y)||^2 <= L^2 ||x - y||^2;
    for quadratics L_pm^2 = lambda_max((1/n) sum_i A_i^2 - (mean A)^2). None where not computed
    (a caller may bound it by L_+, since L_pm <= L_+)."""
    families = {"quadratic": quadratic_family, "quadratic_different_l": different_l_family}
    if kind not in families:
        return None
    try:
        return families[kind](n_workers, **params).hessian_variance()
    except TypeError as err:
        raise ConfigError(f"problem {kind!r}: {err}") from err


# ----------------------------------------------------------------------------- appended generators


def different_l_family(
    n_workers: int,
    *,
    dim: float = 1000,
    noise_scale: float = 0.0,
    L: float = 1.0,
    lam: float = 0.0,
    seed: int = 0,
) -> QuadraticFamily:
    """The n convex quadratics of the CQ paper's Algorithm 6 (Appendix D.3, after Tyurin et al.
    2022), whose L_i spread out with the noise scale s:

        nu_i = 1 + s E_i,  E_i ~ Exp(1);  nu'_i = s xi_i,  xi_i ~ N(0, 1)   (drawn from (seed, i))
        A_i = (L/4) nu_i T,   b_i = (nu'_i - L/4) e_1,   x^0 = (sqrt(d), 0, ..., 0)

    with T = tridiag(-1, 2, -1). Unlike Algorithm 5 (`quadratic_family`) nothing is shifted: every
    nu_i >= 1, so every A_i is positive definite (each f_i convex) and the constants have closed
    forms in c_i = (L/4) nu_i and mu = lambda_max(T) < 4: L_i = c_i mu + lam,
    L_- = mean(c) mu + lam, L_+ = sqrt(mean_i L_i^2) and the Hessian variance L_pm = std(c) mu.
    At s = 0 every L_i equals L_- and L_pm = 0; as s grows the L_i spread out (one-sided
    exponential noise: no A_i turns indefinite, which Algorithm 5's normal noise allows).
    `lam` adds lam I to every A_i (not in Algorithm 6; lam = 0 reproduces it).

    Recovered from the authors' code (Tyurin et al.'s `create_convex_different_liptschitz`:
    `scale = 1 + s * standard_exponential()`, the base matrix and b of the worst-case quadratic
    times `scale`, then `b[0] += s * standard_normal()`); there one generator draws every
    worker's noises in turn, here each worker's come from (seed, i) alone, as in
    `quadratic_family`.
    """
    where = "problem 'quadratic_different_l'"
    dim = _family_dim(where, n_workers, dim, noise_scale, L, seed)
    if not lam >= 0:
        raise ConfigError(f"{where}: lam must be >= 0 (so every A_i stays convex), got {lam!r}")
    exponential, normal = np.array(
        [
            (rng.standard_exponential(), rng.standard_normal())
            for rng in (np.random.default_rng([seed, i]) for i in range(n_workers))
        ]
    ).T
    scales = (L / 4.0) * (1.0 + noise_scale * exponential)
    offsets = noise_scale * normal - L / 4.0
    return QuadraticFamily(dim, scales, offsets, float(lam))


def _different_l(
    data: Dataset, params: dict[str, Any], worker_id: int | None, n_workers: int
) -> Problem:
    """Generated from (seed, i) like `quadratic`: the data shard is not used."""
    family = different_l_family(n_workers, **params)
    return family.whole() if worker_id is None else family.worker(worker_id)


PROBLEMS["quadratic_different_l"] = _different_l


def _quadratic_is_convex(params: dict[str, Any], n_workers: int) -> bool:
    """Every A_i = c_i T + shift I positive semidefinite: c_i mu + shift >= 0 at both ends of T's
    spectrum. Algorithm 5's shift sets only the mean Hessian's lambda_min to lam, so with noise a
    worker whose c_i is below the mean is indefinite unless lam covers (mean c - c_i) mu_min."""
    family = quadratic_family(n_workers, **params)
    mu_min, mu_max = tridiagonal_extremes(family.dim)
    ends = np.minimum(family.scales * mu_min, family.scales * mu_max) + family.shift
    return bool(np.all(ends >= 0))


# Problem name -> whether every row loss f_ij (hence every f_i and f) is convex, from the config
# parameters and n. A name not listed is not known to be convex (logreg_nonconvex, torch models).
# The EC-SGD theory (Danilova and Gorbunov 2022) needs convex f_ij.
CONVEXITY: dict[str, Callable[[dict[str, Any], int], bool]] = {
    "logreg_l2": lambda params, n: float(params.get("lam", 0.1)) >= 0,
    "least_squares": lambda params, n: True,
    "quadratic": _quadratic_is_convex,
    "quadratic_different_l": lambda params, n: True,
}
