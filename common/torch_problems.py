"""Problems defined by torch modules (ALGORITHMS.md section 5): any `nn.Module` with a loss, and
the linear autoencoder f(D, E) = (1/N) sum_a ||D E a - a||^2.

    [problem]
    name = "torch"
    model = "package.module:factory"     # factory(**model_args) -> nn.Module
    loss = "mse"                         # or "cross_entropy", "reconstruction"

    [problem]
    name = "autoencoder"
    k = 16                               # code size; d_f is the data's width (784 for MNIST)
    images = "mnist"                     # optional: read the MNIST IDX file instead of the shard

The iterate x is the module's parameters flattened in float64, in `parameters_to_vector` order.
f_i(x) = (1/m) sum_j loss_j(x) on the worker's shard (features as a dense float64 tensor), with
the module evaluated in eval mode (no dropout; batch norm on its running statistics) so that f_i
is a deterministic function of x. Loss and gradient come from autograd through
`torch.func.functional_call`: the module's own parameters are never written, so a problem
holds no state that changes with x.

threepc.common.problems imports this module only when such a problem is built: torch is an
optional dependency.
"""

from __future__ import annotations

import gzip
import importlib
import itertools
import math
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from threepc.common import data as data_mod
from threepc.common.data import Dataset
from threepc.common.errors import ConfigError, DataError
from threepc.common.problems import lambda_max_gram

LOSSES = ("mse", "cross_entropy", "reconstruction")


def _dense(features: sp.csr_matrix | np.ndarray) -> torch.Tensor:
    array = features if isinstance(features, np.ndarray) else features.toarray()
    return torch.tensor(array, dtype=torch.float64)


def _targets(loss: str, labels: np.ndarray) -> torch.Tensor | None:
    """What the loss compares the outputs with: labels (mse), class indices (cross entropy:
    LibSVM's -1 becomes class 0), or nothing (reconstruction compares with the inputs)."""
    if loss == "mse":
        return torch.tensor(np.asarray(labels, dtype=np.float64))
    if loss == "cross_entropy":
        classes = np.where(np.asarray(labels) < 0, 0, labels)
        if np.any(classes != np.round(classes)):
            raise ConfigError(
                "cross_entropy: labels must be class indices (integers >= 0, or -1/+1)"
            )
        return torch.tensor(classes.astype(np.int64))
    if loss == "reconstruction":
        return None
    raise ConfigError(f"torch problem: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")


def _row_losses(
    loss: str, out: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor | None
) -> torch.Tensor:
    """loss_j for every row j of the batch."""
    m = out.shape[0]
    if loss == "cross_entropy":
        assert targets is not None
        return F.cross_entropy(out, targets, reduction="none")
    reference = inputs if loss == "reconstruction" else targets
    assert reference is not None
    out, reference = out.reshape(m, -1), reference.reshape(m, -1)
    if out.shape != reference.shape:
        raise ConfigError(
            f"torch problem: {loss} needs outputs of shape {tuple(reference.shape)}, got {tuple(out.shape)}"
        )
    return ((out - reference) ** 2).sum(dim=1)


class TorchProblem:
    """f_i(x) = (1/m) sum_j loss_j(x) for a torch module on the shard's rows.

    Loss per row: `mse` ||out_j - y_j||^2 (LeastSquares' (1/m) ||A x - y||^2 for a linear module),
    `cross_entropy` -log softmax(out_j)[y_j], `reconstruction` ||out_j - a_j||^2.

    Smoothness: `L` if the config gives it; otherwise a numerical estimate, the papers' practice:
    ||H v|| after `power_iterations` steps of power iteration on the Hessian H of f_i at the
    module's initial point (`initial_point(seed)`), through Hessian-vector products. It is a
    local value (a lower bound of ||H|| at that point), not a global constant: the theory's
    stepsize built on it is a heuristic, and networks have no global L to give. Row constants
    L_ij (importance sampling) are not available: use uniform sampling.
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        loss: str,
        features: sp.csr_matrix | np.ndarray,
        labels: np.ndarray,
        *,
        L: float | None = None,
        seed: int = 0,
        power_iterations: int = 20,
    ):
        if L is not None and not L > 0:
            raise ConfigError(f"torch problem: L must be > 0, got {L!r}")
        self.loss_name = loss
        self._factory = factory
        self._seed = int(seed)
        self._given_L = None if L is None else float(L)
        self._power_iterations = int(power_iterations)
        module = self._fresh_module(self._seed)
        self._module = module.double().eval()
        named = [(name, p.shape) for name, p in self._module.named_parameters()]
        self._names = [name for name, _ in named]
        self._shapes = [shape for _, shape in named]
        self._sizes = [math.prod(shape) for shape in self._shapes]
        self._buffers = dict(self._module.named_buffers())
        self._inputs = _dense(features)
        self._targets = _targets(loss, labels)
        self.dim = int(sum(self._sizes))
        self.rows = int(self._inputs.shape[0])
        self._L_estimate: float | None = None
        self._last_loss: tuple[np.ndarray, float] | None = None  # (x, f_i(x)) of the last grad(x)

    def _fresh_module(self, seed: int) -> nn.Module:
        # torch's initializers draw from its global generator: fork it so that nothing outside
        # sees the draw, and the same seed gives the same module anywhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self._factory()
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"torch problem: the model factory returned {type(module).__name__}, not an nn.Module"
            )
        return module

    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(flat, self._sizes)
        params = {
            name: piece.view(shape) for name, piece, shape in zip(self._names, pieces, self._shapes)
        }
        return {**params, **self._buffers}

    def _losses(self, flat: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
        inputs = (
            self._inputs
            if rows is None
            else self._inputs[torch.from_numpy(np.asarray(rows, np.int64))]
        )
        targets = self._targets
        if targets is not None and rows is not None:
            targets = targets[torch.from_numpy(np.asarray(rows, np.int64))]
        out = functional_call(self._module, self._params(flat), (inputs,))
        return _row_losses(self.loss_name, out, inputs, targets)

    def _check(self, x: np.ndarray) -> torch.Tensor:
        if x.shape != (self.dim,):
            raise ConfigError(
                f"torch problem: iterate of shape {x.shape}, the module has {self.dim} parameters"
            )
        return torch.tensor(x, dtype=torch.float64)

    def loss(self, x: np.ndarray) -> float:
        last = self._last_loss
        if last is not None and np.array_equal(last[0], x):
            return last[1]  # the engine asks for f_i(x^t) right after grad f_i(x^t)
        with torch.no_grad():
            return float(self._losses(self._check(x)).mean())

    def _grad(
        self, x: np.ndarray, rows: np.ndarray | None, weights: np.ndarray | None
    ) -> np.ndarray:
        flat = self._check(x).requires_grad_(True)
        losses = self._losses(flat, rows)
        value = (
            losses.mean()
            if weights is None
            else (torch.tensor(weights, dtype=torch.float64) * losses).mean()
        )
        (g,) = torch.autograd.grad(value, flat)
        if rows is None:
            # a cache of one value, not state: f_i(x) is the same whenever it is computed
            self._last_loss = (np.array(x, dtype=np.float64), float(value.detach()))
        return g.numpy()

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self._grad(x, None, None)

    def grad_rows(self, x: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(1/b) sum_{j in rows} w_j grad loss_j(x)."""
        return self._grad(x, rows, weights)

    def initial_point(self, seed: int | None = None) -> np.ndarray:
        """The module's own initialization (torch's defaults) under `seed`, flattened: a better x^0
        for a network than N(0, I)."""
        module = self._fresh_module(self._seed if seed is None else seed)
        return nn.utils.parameters_to_vector(module.parameters()).detach().double().numpy().copy()

    def hessian_norm_estimate(self, x: np.ndarray, iterations: int, seed: int = 0) -> float:
        """||H v|| after power iteration on the Hessian of f_i at x (a lower bound of ||H||_2)."""
        flat = self._check(x).requires_grad_(True)
        (g,) = torch.autograd.grad(self._losses(flat).mean(), flat, create_graph=True)
        v = torch.tensor(np.random.default_rng(seed).normal(size=self.dim))
        v /= torch.linalg.vector_norm(v)
        norm = 0.0
        for _ in range(max(iterations, 1)):
            (hv,) = torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True)
            norm = float(torch.linalg.vector_norm(hv))
            if norm == 0.0:
                break
            v = hv / norm
        return norm

    def smoothness(self) -> float:
        if self._given_L is not None:
            return self._given_L
        if self._L_estimate is None:
            x0 = self.initial_point()
            self._L_estimate = self.hessian_norm_estimate(x0, self._power_iterations, self._seed)
        return self._L_estimate

    def row_smoothness(self) -> np.ndarray:
        raise ConfigError(
            "torch problem: no row constants L_ij for importance sampling; use sampling = 'uniform'"
        )


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"torch problem: model must be 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"torch problem: cannot import {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"torch problem: {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def module_problem(data: Dataset, params: dict[str, Any]) -> TorchProblem:
    """`problem = {name = "torch", model = "pkg.mod:factory", loss = ..., model_args = {...}}`
    on the shard `data` (the whole f when it is all the data). Optional: `L` (smoothness to use
    instead of the estimate), `seed` (of the module's initialization), `power_iterations`."""
    p = dict(params)
    if "model" not in p:
        raise ConfigError("torch problem: give model = 'package.module:factory'")
    factory = _import_factory(str(p.pop("model")))
    model_args = dict(p.pop("model_args", {}) or {})
    loss = str(p.pop("loss", "mse"))
    if loss not in LOSSES:
        raise ConfigError(
            f"torch problem: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}"
        )
    unknown = set(p) - {"L", "seed", "power_iterations"}
    if unknown:
        raise ConfigError(f"torch problem: unknown parameter(s) {', '.join(sorted(unknown))}")
    return TorchProblem(lambda: factory(**model_args), loss, data.features, data.labels, **p)


def mlp(sizes: list[int], activation: str = "tanh", bias: bool = True) -> nn.Module:
    """A multilayer perceptron sizes[0] -> ... -> sizes[-1] (a factory for configs:
    model = "threepc.common.torch_problems:mlp", model_args = {sizes = [784, 64, 10]})."""
    if len(sizes) < 2:
        raise ConfigError(f"mlp: sizes needs at least an input and an output width, got {sizes}")
    activations: dict[str, Callable[[], nn.Module]] = {
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
    }
    if activation not in activations:
        raise ConfigError(
            f"mlp: activation must be one of {', '.join(activations)}, got {activation!r}"
        )
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(activations[activation]())
        layers.append(nn.Linear(int(a), int(b), bias=bias))
    return nn.Sequential(*layers)


# --- the linear autoencoder ---------------------------------------------------------------


class LinearAutoencoder(nn.Module):
    """a -> D E a, encoder E (k x d_f), decoder D (d_f x k), no biases. The decoder is registered
    first, so the iterate is x = (vec D, vec E), each row-major."""

    def __init__(self, features: int = 784, k: int = 16):
        super().__init__()
        self.decoder = nn.Linear(k, features, bias=False)  # weight: D, d_f x k
        self.encoder = nn.Linear(features, k, bias=False)  # weight: E, k x d_f

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(a))


class Autoencoder(TorchProblem):
    """f_i(D, E) = (1/m) sum_j ||D E a_j - a_j||^2 on the worker's images a_j (ALGORITHMS.md
    section 5: MNIST, d_f = 784).

    f is quartic in x, so no L holds everywhere; a bound holds on the convex set
    K(rho) = {||D||_2 <= rho, ||E||_2 <= rho}. With S = (1/m) sum_j a_j a_j^T, lambda = lambda_max(S),
    M = D E and a direction (U, V): f'' = 2 tr(dM S dM^T) + 4 tr((M - I) S (U V)^T), dM = U E + D V,
    |first| <= 2 lambda (rho ||U|| + rho ||V||)^2 <= 4 lambda rho^2 ||(U, V)||^2 and
    |second| <= 4 sqrt(lambda f) ||U|| ||V|| <= 2 sqrt(lambda tr S) (1 + rho^2) ||(U, V)||^2
    (Frobenius norms; f <= ||M - I||_2^2 tr S <= (1 + rho^2)^2 tr S). Hence on K(rho)

        L_i = 4 lambda rho^2 + 2 sqrt(lambda tr S) (1 + rho^2),   L_ij = ||a_j||^2 (6 rho^2 + 2).

    The default rho = sqrt(d_f) + sqrt(k) is about ||D||_2 and ||E||_2 at x^0 ~ N(0, I) (the
    engine's default start); a run whose iterates leave K(rho) is outside the bound. `L` in the
    config overrides it (the papers use a numerically estimated constant).

    The full loss and gradient use the second moment S instead of the rows (cost independent of
    m): with G = E S, H = G E^T, P = D^T D,
        f = tr S - 2 tr(D G) + tr(H P),  grad_D = 2 (D H - G^T),  grad_E = 2 (P G - D^T S);
    minibatch gradients go through the module and autograd (`TorchProblem`), and the tests
    check one against the other.
    """

    data_source: str | None = None  # the images file (`autoencoder` with `images`), for the summary
    stand_in: bool = False  # ... or a synthetic stand-in for it (data.fallback = "synthetic")

    def __init__(
        self,
        images: sp.csr_matrix | np.ndarray,
        *,
        k: int = 16,
        radius: float | None = None,
        L: float | None = None,
        seed: int = 0,
    ):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"problem 'autoencoder': k must be an integer >= 1, got {k!r}")
        features = int(images.shape[1])
        super().__init__(
            lambda: LinearAutoencoder(features, k),
            "reconstruction",
            images,
            np.zeros(images.shape[0]),
            L=L,
            seed=seed,
        )
        self.k = k
        self.features = features
        self.radius = math.sqrt(features) + math.sqrt(k) if radius is None else float(radius)
        if not self.radius > 0:
            raise ConfigError(f"problem 'autoencoder': radius must be > 0, got {radius!r}")
        a = self._inputs.numpy()
        self.moment = a.T @ a / self.rows  # S = (1/m) sum_j a_j a_j^T
        self._moment_trace = float(np.trace(self.moment))

    def _factors(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if x.shape != (self.dim,):
            raise ConfigError(
                f"autoencoder: iterate of shape {x.shape}, the problem has {self.dim} parameters"
            )
        split = self.features * self.k
        return x[:split].reshape(self.features, self.k), x[split:].reshape(self.k, self.features)

    def loss(self, x: np.ndarray) -> float:
        D, E = self._factors(np.asarray(x, dtype=np.float64))
        G = E @ self.moment
        return (
            self._moment_trace - 2 * float(np.sum(D * G.T)) + float(np.sum((G @ E.T) * (D.T @ D)))
        )

    def grad(self, x: np.ndarray) -> np.ndarray:
        D, E = self._factors(np.asarray(x, dtype=np.float64))
        G = E @ self.moment
        grad_D = 2 * (D @ (G @ E.T) - G.T)
        grad_E = 2 * ((D.T @ D) @ G - D.T @ self.moment)
        return np.concatenate([grad_D.ravel(), grad_E.ravel()])

    def smoothness(self) -> float:
        if self._given_L is not None:
            return self._given_L
        lam = (
            float(np.linalg.eigvalsh(self.moment)[-1])
            if self.features <= 2048
            else lambda_max_gram(self._inputs.numpy()) / self.rows
        )
        trace = self._moment_trace
        rho2 = self.radius**2
        return 4 * lam * rho2 + 2 * math.sqrt(lam * trace) * (1 + rho2)

    def row_smoothness(self) -> np.ndarray:
        squared_norms = (self._inputs**2).sum(dim=1).numpy()
        return squared_norms * (6 * self.radius**2 + 2)


MNIST_IMAGES = "mnist/t10k-images-idx3-ubyte.gz"
MNIST_SHAPE = (10000, 784)


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 image file (gzip or plain) as a float64 array (images x pixels) scaled to [0, 1]."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x803:
        raise DataError(f"{path}: not an IDX3 unsigned-byte image file (bad magic number)")
    count, height, width = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if len(raw) != 16 + count * height * width:
        raise DataError(
            f"{path}: {len(raw) - 16} pixel bytes, the header says {count} x {height} x {width}"
        )
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, height * width)
    return pixels / 255.0


def synthetic_images(rows: int, pixels: int, seed: int = 0) -> np.ndarray:
    """A seeded stand-in for MNIST: each image one of 10 sparse random prototypes plus noise,
    clipped to [0, 1] (low-rank-ish, like digits)."""
    rng = np.random.default_rng([seed, rows, pixels])
    prototypes = rng.random((10, pixels)) * (rng.random((10, pixels)) < 0.2)
    images = prototypes[rng.integers(0, 10, rows)] + 0.1 * rng.random((rows, pixels))
    return np.clip(images, 0.0, 1.0)


@lru_cache(maxsize=4)
def _images(spec: str, fallback: data_mod.Fallback = "error") -> tuple[np.ndarray, str, bool]:
    """The images, where they were read from, and whether they are a synthetic stand-in (only
    where the run asks for one by name: data.fallback = "synthetic")."""
    if spec == "mnist":
        path = data_mod.find_file(MNIST_IMAGES)
        if path is None:
            missing = data_mod.not_found(f"MNIST images {MNIST_IMAGES!r}", MNIST_IMAGES)
            if fallback != data_mod.SYNTHETIC:
                raise DataError(missing)
            warnings.warn(
                f"{missing}; using a synthetic stand-in of the same shape {MNIST_SHAPE}, "
                "as data.fallback = 'synthetic' asks",
                data_mod.DataFallbackWarning,
                stacklevel=4,
            )
            images = synthetic_images(*MNIST_SHAPE)
            source, stand_in = f"synthetic(rows={MNIST_SHAPE[0]}, dim={MNIST_SHAPE[1]})", True
        else:
            images, source, stand_in = read_idx_images(path), str(path), False
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(
                f"autoencoder: images file {spec!r} not found (give 'mnist' or an IDX file path)"
            )
        images, source, stand_in = read_idx_images(path), str(path), False
    images.setflags(write=False)
    return images, source, stand_in


def autoencoder(
    data: Dataset, params: dict[str, Any], worker_id: int | None, n_workers: int
) -> Autoencoder:
    """The linear autoencoder on the shard's features, or, with `images` ("mnist" or an IDX
    file), on that file's images: worker i takes its contiguous shard of them (the run's data
    set and split are then not used), the whole f all of them. The problem's `data_source` and
    `stand_in` then say where its images came from."""
    p = dict(params)
    spec = p.pop("images", None)
    if spec is None:
        return Autoencoder(data.features, **p)
    images, source, stand_in = _images(str(spec), data.fallback)
    if worker_id is not None:
        start, stop = data_mod.shard_bounds(images.shape[0], n_workers, worker_id)
        images = images[start:stop]
    problem = Autoencoder(images, **p)
    problem.data_source, problem.stand_in = source, stand_in  # read by engine.plan for the summary
    return problem
