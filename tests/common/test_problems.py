"""Problems: gradients against finite differences, smoothness constants against the inequality
they state, the quadratic generator's constants against dense linear algebra, torch problems
against the plain numpy ones."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from threepc.common import config, data, engine, problems
from threepc.common.errors import ConfigError, DataError

torch = pytest.importorskip("torch")
from threepc.common import torch_problems  # needs torch


def tiny_mlp() -> Any:
    """A model factory the tests name as 'tests.common.test_problems:tiny_mlp'."""
    return torch_problems.mlp([6, 5, 3], activation="tanh")


def tiny_linear(d: int = 6) -> Any:
    return torch.nn.Linear(d, 1, bias=False)


SHARD = data.synthetic(40, 6, seed=2)
IMAGES = np.random.default_rng(3).random((25, 12))


def build(
    kind: str, params: dict[str, Any], worker_id: int | None = 0, n: int = 3
) -> problems.Problem:
    return problems.make_problem(kind, SHARD, params, worker_id=worker_id, n_workers=n)


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "logreg_nonconvex": ("logreg_nonconvex", {"lam": 0.1}),
    "logreg_l2": ("logreg_l2", {"lam": 0.1}),
    "least_squares": ("least_squares", {}),
    "quadratic": ("quadratic", {"dim": 30, "noise_scale": 0.7, "lam": 0.01, "seed": 4}),
    "torch_mlp_mse": (
        "torch",
        {"model": "tests.common.test_problems:tiny_mlp", "loss": "cross_entropy"},
    ),
    "torch_linear_mse": (
        "torch",
        {"model": "tests.common.test_problems:tiny_linear", "loss": "mse"},
    ),
}


def all_problems() -> list[tuple[str, problems.Problem]]:
    built = [(name, build(kind, params)) for name, (kind, params) in CASES.items()]
    built.append(("autoencoder", torch_problems.Autoencoder(IMAGES, k=3)))
    return built


@pytest.mark.parametrize(
    "name, problem", all_problems(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_gradient_matches_central_differences(name: str, problem: problems.Problem) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 0.5, problem.dim)
    g = problem.grad(x)
    assert g.shape == (problem.dim,)
    for _ in range(3):
        v = rng.normal(size=problem.dim)
        h = 1e-5
        numeric = (problem.loss(x + h * v) - problem.loss(x - h * v)) / (2 * h)
        assert numeric == pytest.approx(g @ v, rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize(
    "name, problem", all_problems(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_minibatch_gradient_is_the_weighted_mean_of_row_gradients(
    name: str, problem: problems.Problem
) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(0, 0.5, problem.dim)
    every = np.arange(problem.rows)
    assert np.allclose(
        problem.grad_rows(x, every, np.ones(problem.rows)), problem.grad(x), rtol=1e-10, atol=1e-12
    )
    rows = rng.integers(0, problem.rows, 4)
    weights = rng.random(4) + 0.5
    one_by_one = sum(
        w * problem.grad_rows(x, np.array([j]), np.ones(1)) for j, w in zip(rows, weights)
    )
    assert np.allclose(problem.grad_rows(x, rows, weights), one_by_one / 4, atol=1e-12)


def assert_lipschitz(
    problem: problems.Problem, L: float, pairs: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    """||grad f(x) - grad f(y)|| <= L ||x - y|| on every pair, and the bound is not vacuous."""
    ratios = [
        np.linalg.norm(problem.grad(x) - problem.grad(y)) / np.linalg.norm(x - y) for x, y in pairs
    ]
    assert max(ratios) <= L * (1 + 1e-9)
    assert max(ratios) > 1e-2 * L


def random_pairs(rng: np.random.Generator, d: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Far pairs at a few scales, and near pairs (where the local curvature shows)."""
    pairs = [(rng.normal(0, s, d), rng.normal(0, s, d)) for s in (0.1, 1.0, 3.0) for _ in range(3)]
    near = [rng.normal(0, s, d) for s in (0.1, 1.0, 3.0)]
    return pairs + [(x, x + 1e-4 * rng.normal(size=d)) for x in near]


@pytest.mark.parametrize("kind", ["logreg_nonconvex", "logreg_l2", "least_squares", "quadratic"])
def test_smoothness_bounds_the_gradient_change(kind: str) -> None:
    rng = np.random.default_rng(7)
    for worker_id in (None, 0, 2):
        problem = build(kind, CASES[kind][1], worker_id)
        assert_lipschitz(problem, problem.smoothness(), random_pairs(rng, problem.dim))


def test_autoencoder_bound_holds_inside_its_radius() -> None:
    problem = torch_problems.Autoencoder(IMAGES, k=3)
    rng = np.random.default_rng(8)
    d_f, k = problem.features, problem.k

    def inside(scale: float) -> np.ndarray:
        D = rng.normal(0, scale, (d_f, k))
        E = rng.normal(0, scale, (k, d_f))
        # shrink each factor to spectral norm <= rho: the set K(rho) of the bound
        D *= min(1.0, problem.radius / np.linalg.norm(D, 2))
        E *= min(1.0, problem.radius / np.linalg.norm(E, 2))
        return np.concatenate([D.ravel(), E.ravel()])

    pairs = [(inside(s), inside(s)) for s in (0.3, 1.0, 3.0, 30.0)]
    corner = inside(30.0)
    pairs.append((corner, corner + 1e-5 * rng.normal(size=problem.dim)))
    assert_lipschitz(problem, problem.smoothness(), pairs)
    rows = problem.row_smoothness()
    for j in range(3):
        single = torch_problems.Autoencoder(IMAGES[j : j + 1], k=3)
        assert rows[j] >= single.smoothness()


def test_autoencoder_iterate_is_decoder_then_encoder() -> None:
    problem = torch_problems.Autoencoder(IMAGES, k=3)
    rng = np.random.default_rng(9)
    D, E = rng.normal(size=(12, 3)), rng.normal(size=(3, 12))
    x = np.concatenate([D.ravel(), E.ravel()])
    expected = np.mean(np.sum((IMAGES @ E.T @ D.T - IMAGES) ** 2, axis=1))
    assert problem.loss(x) == pytest.approx(expected, rel=1e-10)
    # closed form: grad_D = (2/N) R (E A)^T, grad_E = (2/N) D^T R A^T with R = D E A - A (A: d x N)
    A = IMAGES.T
    R = D @ E @ A - A
    n = IMAGES.shape[0]
    grad = np.concatenate([(2 / n * R @ (E @ A).T).ravel(), (2 / n * D.T @ R @ A.T).ravel()])
    assert np.allclose(problem.grad(x), grad, rtol=1e-10)
    # the second-moment form of the full gradient equals autograd through the module
    every = np.arange(problem.rows)
    assert np.allclose(problem.grad_rows(x, every, np.ones(problem.rows)), grad, rtol=1e-10)


def dense_constants(family: problems.QuadraticFamily) -> tuple[list[float], float, float]:
    matrices = [family.worker(i).matrix.toarray() for i in range(family.n_workers)]
    mean = sum(matrices) / len(matrices)
    L_i = [float(np.abs(np.linalg.eigvalsh(a)).max()) for a in matrices]
    variance = sum(a @ a for a in matrices) / len(matrices) - mean @ mean
    return (
        L_i,
        float(np.abs(np.linalg.eigvalsh(mean)).max()),
        float(np.sqrt(max(np.linalg.eigvalsh(variance)[-1], 0))),
    )


def test_quadratic_constants_equal_dense_linear_algebra() -> None:
    family = problems.quadratic_family(5, dim=40, noise_scale=0.8, lam=0.05, seed=1)
    L_i, L_minus, L_pm = dense_constants(family)
    assert [family.worker(i).smoothness() for i in range(5)] == pytest.approx(L_i, rel=1e-10)
    assert family.whole().smoothness() == pytest.approx(L_minus, rel=1e-10)
    assert family.hessian_variance() == pytest.approx(L_pm, rel=1e-8)
    mean = family.whole().matrix.toarray()
    assert np.linalg.eigvalsh(mean)[0] == pytest.approx(0.05, rel=1e-8)  # shifted: lambda_min = lam
    squares = sum(a @ a for a in (family.worker(i).matrix.toarray() for i in range(5))) / 5
    plus = np.sqrt(np.linalg.eigvalsh(squares)[-1])
    assert family.plus_tight() == pytest.approx(plus, rel=1e-10)
    assert L_pm <= family.plus_tight()


def test_hessian_variance_is_zero_without_noise_and_grows_with_it() -> None:
    values = [
        problems.hessian_variance("quadratic", {"dim": 50, "noise_scale": s}, 10)
        for s in (0.0, 0.1, 0.5, 2.0)
    ]
    assert values[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values))
    # at noise 0 the workers differ only in b_i (Hessian variance 0, CQ paper Proposition 2)
    family = problems.quadratic_family(4, dim=20, noise_scale=0.0)
    assert all((family.worker(i).matrix != family.worker(0).matrix).nnz == 0 for i in range(4))
    assert problems.hessian_variance("logreg_nonconvex", {"lam": 0.1}, 4) is None


def test_mean_of_worker_quadratics_is_the_whole_f() -> None:
    params = {"dim": 25, "noise_scale": 1.5, "lam": 0.1, "seed": 3}
    workers = [build("quadratic", params, i, 6) for i in range(6)]
    whole = build("quadratic", params, None, 6)
    x = np.random.default_rng(0).normal(size=25)
    assert np.mean([w.loss(x) for w in workers]) == pytest.approx(whole.loss(x), rel=1e-12)
    assert np.allclose(np.mean([w.grad(x) for w in workers], axis=0), whole.grad(x), atol=1e-12)


def test_worker_quadratic_noise_comes_from_seed_and_worker_id() -> None:
    four = problems.quadratic_family(4, dim=10, noise_scale=1.0, seed=2)
    three = problems.quadratic_family(3, dim=10, noise_scale=1.0, seed=2)
    assert np.array_equal(four.scales[:3], three.scales) and np.array_equal(
        four.offsets[:3], three.offsets
    )
    other = problems.quadratic_family(4, dim=10, noise_scale=1.0, seed=3)
    assert not np.array_equal(four.scales, other.scales)


def test_quadratic_scales_to_a_million_dimensions() -> None:
    problem = build("quadratic", {"dim": 1e6, "noise_scale": 0.5}, 1, 4)
    assert problem.dim == 1_000_000 and problem.matrix.nnz == 3 * 1_000_000 - 2
    x = problem.initial_point()
    assert problem.grad(x).shape == (1_000_000,)


def test_quadratic_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="quadratic.*unexpected keyword argument 'nosie_scale'"):
        build("quadratic", {"nosie_scale": 1.0})
    with pytest.raises(ConfigError, match="noise_scale must be >= 0"):
        build("quadratic", {"noise_scale": -1.0})
    with pytest.raises(ConfigError, match="dim must be an integer"):
        build("quadratic", {"dim": 2.5})


def test_in_process_run_converges_on_a_quadratic() -> None:
    cfg = config.parse(
        {
            "workers": 4,
            "rounds": 300,
            "method": "ef21",
            "stepsize_multiplier": 4.0,
            "compressor": {"name": "top_k", "k": 5},
            "problem": {"name": "quadratic", "dim": 40, "noise_scale": 0.5, "lam": 0.1},
            "data": {"dataset": "synthetic", "rows": 8, "dim": 2},
        }
    )
    plan = engine.plan(cfg)
    assert plan.dim == 40  # from the problem, not from the (placeholder) data set
    family = problems.quadratic_family(4, dim=40, noise_scale=0.5, lam=0.1)
    assert plan.smoothness.L_minus == pytest.approx(family.whole().smoothness())
    result = engine.run_in_process(plan)
    first, last = result.rows[0]["grad_norm_sq"], result.rows[-1]["grad_norm_sq"]
    assert last < 1e-6 * first


def test_torch_linear_mse_equals_least_squares() -> None:
    reference = problems.LeastSquares(SHARD.features, SHARD.labels)
    problem = build("torch", CASES["torch_linear_mse"][1])
    x = np.random.default_rng(1).normal(size=6)
    assert problem.dim == 6
    assert problem.loss(x) == pytest.approx(reference.loss(x), rel=1e-12)
    assert np.allclose(problem.grad(x), reference.grad(x), rtol=1e-12, atol=1e-14)


def test_torch_smoothness_estimate_is_the_hessian_norm_at_the_initial_point() -> None:
    problem = build("torch", CASES["torch_mlp_mse"][1])
    assert isinstance(problem, torch_problems.TorchProblem)
    x0 = problem.initial_point()
    flat = torch.tensor(x0)
    hessian = torch.autograd.functional.hessian(lambda v: problem._losses(v).mean(), flat).numpy()
    norm = np.abs(np.linalg.eigvalsh(hessian)).max()
    assert 0.5 * norm <= problem.smoothness() <= norm * (1 + 1e-9)
    given = build("torch", {**CASES["torch_mlp_mse"][1], "L": 3.5})
    assert given.smoothness() == 3.5


def test_torch_problem_leaves_global_random_state_alone_and_is_seeded() -> None:
    state = torch.random.get_rng_state()
    a = build("torch", CASES["torch_mlp_mse"][1])
    assert torch.equal(state, torch.random.get_rng_state())
    b = build("torch", CASES["torch_mlp_mse"][1])
    assert np.array_equal(a.initial_point(), b.initial_point())
    assert not np.array_equal(a.initial_point(0), a.initial_point(1))


def test_torch_problem_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="package.module:factory"):
        build("torch", {"model": "no_colon"})
    with pytest.raises(ConfigError, match="cannot import"):
        build("torch", {"model": "no.such.module:f"})
    with pytest.raises(ConfigError, match="unknown loss"):
        build("torch", {"model": "tests.common.test_problems:tiny_mlp", "loss": "hinge"})
    with pytest.raises(ConfigError, match="unknown parameter"):
        build("torch", {"model": "tests.common.test_problems:tiny_mlp", "lr": 1})
    with pytest.raises(ConfigError, match="sampling = 'uniform'"):
        build("torch", CASES["torch_mlp_mse"][1]).row_smoothness()


def test_importing_problems_does_not_import_torch() -> None:
    code = "import sys, threepc.common.problems, threepc.common.engine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_autoencoder_on_mnist_images_shards_them() -> None:
    # the shared MNIST file when present, else the synthetic stand-in (asked for by the run's
    # data.fallback, which the shard carries; with a DataFallbackWarning)
    params = {"k": 4, "images": "mnist"}
    shard = dataclasses.replace(SHARD, fallback="synthetic")
    shards = [
        problems.make_problem("autoencoder", shard, params, worker_id=i, n_workers=10)
        for i in range(10)
    ]
    whole = problems.make_problem("autoencoder", shard, params, n_workers=10)
    assert whole.rows == 10000 and whole.dim == 2 * 784 * 4
    assert [s.rows for s in shards] == [1000] * 10
    x = np.random.default_rng(0).normal(0, 0.1, whole.dim)
    assert np.mean([s.loss(x) for s in shards]) == pytest.approx(whole.loss(x), rel=1e-10)


def test_idx_reader_refuses_a_file_that_is_not_idx(tmp_path: Any) -> None:
    bad = tmp_path / "bad.gz"
    import gzip

    with gzip.open(bad, "wb") as stream:
        stream.write(b"\x00" * 64)
    with pytest.raises(DataError, match="bad magic number"):
        torch_problems.read_idx_images(bad)
    good = tmp_path / "tiny-idx3-ubyte"
    good.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 255, 51, 102]))
    assert np.allclose(torch_problems.read_idx_images(good), [[0, 1], [0.2, 0.4]])


def test_sparse_and_dense_features_give_the_same_torch_problem() -> None:
    dense = torch_problems.TorchProblem(
        tiny_mlp, "cross_entropy", SHARD.features.toarray(), SHARD.labels
    )
    sparse = torch_problems.TorchProblem(
        tiny_mlp, "cross_entropy", sp.csr_matrix(SHARD.features), SHARD.labels
    )
    x = dense.initial_point()
    assert dense.loss(x) == sparse.loss(x)
