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
class _LinearData:
    """A shard's features A (m x d) and targets y: what every problem here is built on."""

    features: sp.csr_matrix
    labels: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    def _logistic(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """(1/m) sum_j log(1 + exp(-y_j a_j^T x)) and its gradient."""
        margins = self.labels * (self.features @ x)
        loss = float(np.mean(np.logaddexp(0.0, -margins)))
        weights = -self.labels * expit(-margins) / self.rows
        return loss, np.asarray(self.features.T @ weights)


@dataclass(frozen=True, eq=False)
class LogisticNonconvex(_LinearData):
    """f_i(x) = (1/m) sum_j log(1 + exp(-y_j a_j^T x)) + lam sum_k x_k^2 / (1 + x_k^2).

    L_i <= lambda_max(A_i^T A_i) / (4 m) + 2 lam (EF21 paper, Section 4).
    """

    lam: float = 0.1

    def loss(self, x: np.ndarray) -> float:
        return self._logistic(x)[0] + self.lam * float(np.sum(x * x / (1.0 + x * x)))

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self._logistic(x)[1] + 2.0 * self.lam * x / (1.0 + x * x) ** 2

    def smoothness(self) -> float:
        return _lambda_max_gram(self.features) / (4.0 * self.rows) + 2.0 * self.lam


@dataclass(frozen=True, eq=False)
class LogisticL2(_LinearData):
    """f_i(x) = (1/m) sum_j log(1 + exp(-y_j a_j^T x)) + (lam/2) ||x||^2; L_i = lmax/(4m) + lam."""

    lam: float = 0.1

    def loss(self, x: np.ndarray) -> float:
        return self._logistic(x)[0] + 0.5 * self.lam * float(x @ x)

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self._logistic(x)[1] + self.lam * x

    def smoothness(self) -> float:
        return _lambda_max_gram(self.features) / (4.0 * self.rows) + self.lam


@dataclass(frozen=True, eq=False)
class LeastSquares(_LinearData):
    """f_i(x) = (1/m) ||A_i x - y_i||^2; L_i = 2 lambda_max(A_i^T A_i) / m."""

    def loss(self, x: np.ndarray) -> float:
        r = self.features @ x - self.labels
        return float(r @ r) / self.rows

    def grad(self, x: np.ndarray) -> np.ndarray:
        r = self.features @ x - self.labels
        return 2.0 * np.asarray(self.features.T @ r) / self.rows

    def smoothness(self) -> float:
        return 2.0 * _lambda_max_gram(self.features) / self.rows


PROBLEMS = {
    "logreg_nonconvex": LogisticNonconvex,
    "logreg_l2": LogisticL2,
    "least_squares": LeastSquares,
}


def make_problem(kind: str, data: Dataset, params: dict[str, float]) -> Problem:
    """Build problem `kind` on a data shard with its config parameters (e.g. lam)."""
    cls = PROBLEMS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown problem {kind!r}; known: {', '.join(sorted(PROBLEMS))}")
    try:
        return cls(data.features, data.labels, **params)
    except TypeError as err:
        raise ConfigError(f"problem {kind!r}: {err}") from err
