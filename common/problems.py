"""Local problems f_i, their gradients and smoothness constants (ALGORITHMS.md section 5).

A problem knows nothing of methods or the wire: `loss(x)`, `grad(x)` and `smoothness()` (L_i)
on one worker's data. `make_problem` builds one from the run's problem config and a data shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from threepc.common.data import Dataset
from threepc.common.errors import ConfigError


class Problem(Protocol):
    """f_i on one worker's data."""

    dim: int
    rows: int

    def loss(self, x: np.ndarray) -> float: ...

    def grad(self, x: np.ndarray) -> np.ndarray: ...

    def smoothness(self) -> float: ...

    def grad_rows(self, x: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray: ...

    def row_smoothness(self) -> np.ndarray: ...


def _lambda_max_gram(features: sp.csr_matrix) -> float:
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

    def _reg(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.0, np.zeros_like(x)

    def reg_smoothness(self) -> float:
        return 0.0

    def loss(self, x: np.ndarray) -> float:
        values, _ = self._phi(self.features @ x, self.labels)
        return float(np.mean(values)) + self._reg(x)[0]

    def grad(self, x: np.ndarray) -> np.ndarray:
        _, slopes = self._phi(self.features @ x, self.labels)
        return np.asarray(self.features.T @ slopes) / self.rows + self._reg(x)[1]

    def grad_rows(self, x: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(1/b) sum_{j in rows} w_j grad f_ij(x), with f_ij = phi(a_j^T x, y_j) + r(x)."""
        part = self.features[rows]
        _, slopes = self._phi(part @ x, self.labels[rows])
        return np.asarray(part.T @ (weights * slopes)) / rows.size + float(np.mean(weights)) * self._reg(x)[1]

    def smoothness(self) -> float:
        return self.curvature * _lambda_max_gram(self.features) / self.rows + self.reg_smoothness()

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


PROBLEMS = {
    "logreg_nonconvex": LogisticNonconvex,
    "logreg_l2": LogisticL2,
    "least_squares": LeastSquares,
}


def make_problem(
    kind: str, data: Dataset, params: dict[str, float], *, worker_id: int | None = None, n_workers: int = 1
) -> Problem:
    """Problem `kind` with its config parameters (e.g. lam): worker i's f_i on its shard `data`,
    or, with worker_id None, the whole f on all the data (for L_- and the theory's stepsize).

    Data-driven problems only look at `data`; generated ones (quadratics) use worker_id/n_workers.
    """
    cls = PROBLEMS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown problem {kind!r}; known: {', '.join(sorted(PROBLEMS))}")
    try:
        return cls(data.features, data.labels, **params)
    except TypeError as err:
        raise ConfigError(f"problem {kind!r}: {err}") from err
