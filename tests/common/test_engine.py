"""The in-process reference engine: convergence, exact bit accounting, state never mutated."""

import dataclasses

import numpy as np
import pytest

from threepc.common import bitpack, config, engine
from threepc.common.errors import ConfigError
from threepc.common.payloads import Mode, SparseVector


def small(**overrides):
    base = {
        "workers": 3,
        "rounds": 60,
        "seed": 1,
        "stepsize_multiplier": 4.0,
        "compressor": {"name": "top_k", "k": 3},
        "data": {"dataset": "synthetic", "rows": 300, "dim": 30},
    }
    return config.parse({**base, **overrides})


def test_ef21_topk_drives_the_gradient_down() -> None:
    result = engine.run_in_process(engine.plan(small(rounds=300)))
    first, last = result.rows[0]["grad_norm_sq"], result.rows[-1]["grad_norm_sq"]
    assert last < first / 100


def test_bits_are_the_payload_bits_the_method_specifies() -> None:
    """Round 0 sends d float32 values; later rounds k values + the index set's coded bits."""
    cfg = small(rounds=5)
    p = engine.plan(cfg)
    full = engine.load_data(cfg)
    nodes = [engine.WorkerNode(cfg, i, engine.local_problem(cfg, engine.load_shard(cfg, i, full), i)) for i in range(3)]
    agg = engine.Aggregator(p)
    expected = np.zeros(3)
    for t in range(cfg.rounds):
        for node in nodes:
            message, diag = node.round(t, agg.x)
            if t == 0:
                assert message.mode is Mode.REPLACE
                expected[node.worker_id] += 32 * p.dim
            else:
                (part,) = message.parts
                assert isinstance(part, SparseVector) and part.indices.size == 3
                expected[node.worker_id] += 3 * 32 + bitpack.index_bits(part.indices, p.dim)
            agg.apply(node.worker_id, message, diag)
        row = agg.finish_round()
        assert row["bits_up_per_worker"] == expected.mean()
        assert row["value_bits_up_per_worker"] == (32 * p.dim + t * 3 * 32)


@pytest.mark.parametrize("state_dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"method": "gd", "compressor": "identity"},
        {"method": {"name": "clag", "zeta": 2.0}},
        {"method": "marina", "compressor": {"name": "rand_k", "k": 4}},
        {"method": {"name": "3pcv2", "q": {"name": "rand_k", "k": 3}}, "compressor": {"name": "top_k", "k": 2}},
        {"method": {"name": "3pcv2", "q": {"name": "qsgd", "s": 4}}, "compressor": {"name": "top_k", "k": 2}},
    ],
    ids=["ef21", "gd", "clag", "marina", "3pcv2", "3pcv2-qsgd"],
)
def test_worker_state_equals_the_coordinator_mirror_bit_for_bit(overrides: dict, state_dtype: str) -> None:
    """h and its mirror live at the state dtype (the iterate's): float32 halves the mirrors."""
    cfg = small(rounds=20, wire={"iterate_dtype": state_dtype}, **overrides)
    result_plan = engine.plan(cfg)
    full = engine.load_data(cfg)
    node = engine.WorkerNode(cfg, 0, engine.local_problem(cfg, engine.load_shard(cfg, 0, full), 0))
    agg = engine.Aggregator(result_plan)
    assert agg.mirrors.dtype == np.dtype(state_dtype)
    x = result_plan.x0
    for t in range(cfg.rounds):
        message, _ = node.round(t, x)
        agg.apply(0, message)
        assert node.state is not None and node.state.h.dtype == np.dtype(state_dtype)
        assert np.array_equal(node.state.h, agg.mirrors[0])
        x = x - 0.01 * agg.mirrors[0].astype(x.dtype)  # a moving iterate, so that every case is met


@pytest.mark.parametrize("whole", [True, False], ids=["summed", "incremental"])
def test_g_sum_is_the_sum_of_the_mirrors_when_gd_rows_are_overwritten(whole: bool) -> None:
    """GD's messages overwrite whole mirrors and g_sum is summed from them when the round closes
    (`Mechanism.whole`); a worker absent from a round keeps its row in the sum, and a message of
    another kind applied in such a round is in it too. The incremental path (kept for any other
    method) gives the same g_sum up to rounding."""
    from threepc.common.payloads import DenseVector, Message

    cfg = small(rounds=4, workers=3, method="gd", compressor="identity", wire={"iterate_dtype": "float32"})
    agg = engine.Aggregator(engine.plan(cfg))
    assert agg.sums_mirrors
    agg.sums_mirrors = whole
    rng = np.random.default_rng(3)
    d = agg.d
    for t, present in enumerate([(0, 1, 2), (0, 2), (1,), (0, 1, 2)]):
        for i in present:
            agg.apply(i, Message(Mode.REPLACE, (DenseVector(rng.normal(size=d).astype(np.float32), "float32"),)))
        if t == 2:  # a sparse change of worker 2's mirror in a round its row is summed again
            agg.apply(2, Message(Mode.DELTA, (SparseVector(d, np.array([0, 5]), np.array([1.5, -2.0]), "float64"),)))
        agg.finish_round([i for i in range(3) if i not in present and not (t == 2 and i == 2)])
        expected = agg.mirrors.sum(axis=0, dtype=np.float64)
        if whole:
            assert np.array_equal(agg.g_sum, expected)
        else:
            np.testing.assert_allclose(agg.g_sum, expected, rtol=1e-12, atol=1e-12)
    assert agg.g_sum.dtype == np.float64


def test_a_step_does_not_mutate_its_inputs() -> None:
    cfg = small()
    from threepc.common.methods import build_method
    from threepc.common.randomness import fixed

    mech = build_method(cfg, 30)
    rng = np.random.default_rng(0)
    grad0, grad1 = rng.normal(size=30), rng.normal(size=30)
    _, state = mech.first(grad0, fixed())
    for arr in (state.h, state.y, grad1):
        if arr is not None:  # y is not kept where the method never reads it
            arr.setflags(write=False)
    h_before = state.h.copy()
    mech.step(state, grad1, fixed(1))
    assert np.array_equal(state.h, h_before)


METHODS = [
    ({"method": "gd", "compressor": "identity"}, 1e-4),
    ({"method": "ef21"}, 1e-2),
    ({"method": "ef21_plus"}, 1e-2),
    ({"method": {"name": "lag", "zeta": 1.0}, "compressor": "identity"}, 1e-2),
    ({"method": {"name": "clag", "zeta": 1.0}}, 1e-2),
    ({"method": "3pcv1"}, 1e-2),
    ({"method": {"name": "3pcv2", "q": {"name": "rand_k", "k": 5}}}, 1e-2),
    ({"method": {"name": "3pcv4", "c2": {"name": "top_k", "k": 2}}}, 1e-2),
    ({"method": {"name": "3pcv5", "p": 0.2}}, 1e-2),
    ({"method": "marina", "compressor": {"name": "rand_k", "k": 5}}, 1e-2),
    ({"method": "marina", "compressor": "perm_k"}, 1e-2),  # AB-inequality stepsize
    ({"method": {"name": "marina", "iscc": True, "p": 0.2}, "stepsize": 0.5,
      "compressor": {"name": "rand_k", "k": 5}}, 1e-2),  # importance-sampling combinatorial Q
    ({"method": {"name": "marina", "p": 0.3}, "compressor": {"name": "cq"}}, 1e-2),
    ({"method": "ef14", "stepsize": 0.5}, 1e-2),
]


@pytest.mark.parametrize("overrides, factor", METHODS, ids=lambda v: str(v)[:40])
def test_every_method_drives_the_gradient_down_at_its_stepsize(overrides: dict, factor: float) -> None:
    cfg = small(rounds=400, **{"stepsize_multiplier": 1.0, **overrides})
    rows = engine.run_in_process(engine.plan(cfg)).rows
    assert rows[-1]["grad_norm_sq"] < factor * rows[0]["grad_norm_sq"]


def test_lag_skips_cost_one_bit() -> None:
    cfg = small(rounds=50, method={"name": "lag", "zeta": 4.0}, compressor="identity")
    rows = engine.run_in_process(engine.plan(cfg)).rows
    skipped = sum(r["skips"] for r in rows)
    assert skipped > 0
    # Round 0: 3 dense messages, no flag. Later: 1 flag bit each, plus d float32 values if sent.
    later = 3 * 49
    expected = 3 * 30 * 32 + later * 1 + (later - skipped) * 30 * 32
    assert rows[-1]["bits_up_per_worker"] * 3 == expected


def test_ef14_on_a_nonconvex_problem_needs_an_explicit_stepsize() -> None:
    from threepc.common.errors import ConfigError

    with pytest.raises(ConfigError, match="ef14: give an explicit stepsize"):
        engine.plan(small(method="ef14"))


def test_resuming_from_a_state_dict_reaches_the_same_iterate() -> None:
    """Interrupt after 10 rounds, restore coordinator and workers, finish: same x as one go."""
    cfg = small(rounds=20, method={"name": "clag", "zeta": 1.0})
    p = engine.plan(cfg)
    straight = engine.run_in_process(p)

    full = engine.load_data(p.resolved)
    def nodes():
        return [engine.WorkerNode(p.resolved, i, engine.local_problem(p.resolved, engine.load_shard(p.resolved, i, full), i)) for i in range(3)]
    first, agg = nodes(), engine.Aggregator(p)
    for t in range(10):
        for node in first:
            agg.apply(node.worker_id, node.round(t, agg.x)[0])
        agg.finish_round()
    saved = {k: v.copy() for k, v in agg.state_dict().items()}

    resumed = engine.Aggregator(p)
    resumed.load_state_dict(saved)
    second = nodes()  # fresh processes: their state comes from the coordinator's mirror
    for node in second:
        node.restore(resumed.mirrors[node.worker_id], resumed.x_prev)
    for t in range(10, 20):
        for node in second:
            resumed.apply(node.worker_id, node.round(t, resumed.x)[0])
        resumed.finish_round()
    assert np.array_equal(resumed.x, straight.x)


@pytest.mark.parametrize(
    "gradient, factor",
    [
        ({"name": "sgd", "batch": 8}, 0.1),
        ({"name": "sgd", "batch": 8, "sampling": "importance"}, 0.1),
        ({"name": "lsvrg", "batch": 4}, 1e-3),  # variance reduction: far below SGD's noise floor
    ],
    ids=["sgd", "sgd-importance", "lsvrg"],
)
def test_ec_sgd_and_ec_lsvrg_with_hard_threshold_make_progress(gradient: dict, factor: float) -> None:
    cfg = small(
        rounds=300, method="ef14", stepsize=0.5, stepsize_multiplier=1.0, gradient=gradient,
        compressor={"name": "hard_threshold", "threshold": 0.001},
    )
    rows = engine.run_in_process(engine.plan(cfg)).rows
    assert rows[-1]["grad_norm_sq"] < factor * rows[0]["grad_norm_sq"]


def test_stochastic_gradients_are_unbiased() -> None:
    from threepc.common import data, oracles, problems
    from threepc.common.randomness import fixed

    ds = data.synthetic(40, 6, seed=2)
    prob = problems.LogisticNonconvex(ds.features, ds.labels)
    x = np.random.default_rng(1).normal(size=6)
    for sampling in ("uniform", "importance"):
        oracle = oracles.sgd(batch=5, sampling=sampling)
        draws = [oracle.estimate(None, prob, x, fixed(seed))[0] for seed in range(4000)]
        mean, err = np.mean(draws, axis=0), np.std(draws, axis=0) / np.sqrt(len(draws))
        assert np.all(np.abs(mean - prob.grad(x)) < 5 * err + 1e-12), sampling


def test_naive_compressed_gd_stalls_where_ef21_converges() -> None:
    """EF21 paper, 'naive idea': g_i = TopK(grad f_i) has a wrong fixed point on heterogeneous
    data (shards sorted by label); EF21 with the same compressor and stepsize converges."""
    common = {
        "workers": 4, "rounds": 1500, "seed": 1, "stepsize": 0.083,
        "compressor": {"name": "top_k", "k": 1},
        "data": {"dataset": "synthetic", "rows": 400, "dim": 20, "split": "label_sorted"},
    }
    naive = engine.run_in_process(engine.plan(config.parse({**common, "method": "naive"}))).rows
    ef21 = engine.run_in_process(engine.plan(config.parse({**common, "method": "ef21"}))).rows
    start = naive[0]["grad_norm_sq"]
    assert min(r["grad_norm_sq"] for r in naive[750:]) > start / 100  # stalls
    assert ef21[-1]["grad_norm_sq"] < start * 1e-12  # converges


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "ef21"},
        {"method": {"name": "clag", "zeta": 2.0}},
        {"method": "marina", "compressor": {"name": "rand_k", "k": 4}},
        {"method": "gd", "compressor": "identity"},
    ],
    ids=["ef21", "clag", "marina", "gd"],
)
@pytest.mark.parametrize("iterate_dtype", ["float64", "float32"])
def test_a_follower_rebuilds_x_bit_for_bit_from_the_changes(overrides: dict, iterate_dtype: str) -> None:
    """Delta downlink: a worker that sees only (indices, new g_sum values) keeps x exactly, and
    hands its gradient x in float64 from the same pass."""
    cfg = small(rounds=40, wire={"iterate_dtype": iterate_dtype}, **overrides)
    p = engine.plan(cfg)
    full = engine.load_data(p.resolved)
    nodes = [engine.WorkerNode(p.resolved, i, engine.local_problem(p.resolved, engine.load_shard(p.resolved, i, full), i)) for i in range(3)]
    agg = engine.Aggregator(dataclasses.replace(p, downlink="delta"))
    follower = engine.IterateFollower(agg.x, agg.g_sum, agg.n, agg.step_scale)
    sent = 0
    for t in range(cfg.rounds):
        supports = []
        for node in nodes:
            message = node.round(t, follower.x, follower.x64)[0]
            supports.append(None if message.mode is not Mode.DELTA else message.support(agg.d))
            agg.apply(node.worker_id, message)
        agg.finish_round()
        assert agg.change is not None
        indices, values = agg.change
        if indices is not None:  # exactly this round's coordinates: none left over from the last
            assert set(indices.tolist()) == set().union(*(s.tolist() for s in supports if s is not None))
        sent += agg.d if indices is None else indices.size
        follower.follow(indices, values)
        assert engine.digest(follower.x) == engine.digest(agg.x)
        assert follower.x.dtype == np.dtype(iterate_dtype) and follower.x64.dtype == np.float64
        assert np.array_equal(follower.x64, follower.x.astype(np.float64))
    assert np.array_equal(follower.x, agg.x)
    if "ef21" in str(overrides):
        assert sent <= 3 * 3 * cfg.rounds + 30  # at most n k coordinates a round (+ round 0's d)
    if "clag" in str(overrides):
        assert sent < 3 * 3 * cfg.rounds  # skipped rounds change nothing


@pytest.mark.parametrize("state_dtype", ["float64", "float32"])
def test_sparse_in_place_apply_equals_the_dense_path(state_dtype: str) -> None:
    from threepc.common.payloads import Message, Mode, SparseVector

    cfg = small(rounds=1, wire={"iterate_dtype": state_dtype})
    p = engine.plan(cfg)
    fast, slow = engine.Aggregator(p), engine.Aggregator(p)
    rng = np.random.default_rng(3)
    for _ in range(50):
        i = int(rng.integers(3))
        idx = np.sort(rng.choice(30, 4, replace=False)).astype(np.int64)
        msg = Message(Mode.DELTA, (SparseVector(30, idx, rng.normal(size=4).astype(np.float32)),))
        fast.apply(i, msg)
        old = slow.mirrors[i].copy()
        new = msg.apply(old)
        slow.g_sum += new.astype(np.float64) - old
        slow.mirrors[i] = new
    assert np.array_equal(fast.mirrors, slow.mirrors) and np.array_equal(fast.g_sum, slow.g_sum)


def test_iscc_sends_from_one_worker_per_compressed_round() -> None:
    cfg = small(rounds=60, method={"name": "marina", "iscc": True, "p": 0.1}, stepsize=0.5,
                compressor={"name": "rand_k", "k": 5})
    p = engine.plan(cfg)
    assert len(p.resolved.method.params["weights"]) == 3  # q_j from L_j, handed to the workers
    rows = engine.run_in_process(p).rows
    total_skips = sum(r["skips"] for r in rows[1:])
    # Every round after 0 either is full (nobody skips) or compressed (exactly 2 of 3 skip).
    assert total_skips % 2 == 0 and total_skips > 0
    assert all(r["skips"] in (0, 2) for r in rows)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [1, 1000, engine.BLOCK + 7])
def test_next_iterate_is_the_formula_rounded_once(dtype: str, d: int) -> None:
    """x - g_sum (scale / count) in float64, rounded into x's dtype, whatever the blocks; the
    float64 copy a follower asks for is that same x."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal(d).astype(dtype)
    g_sum = rng.standard_normal(d) * 10.0 ** rng.integers(-8, 3, d)
    expected = (x.astype(np.float64) - g_sum * (0.3 / 7)).astype(dtype)
    widened = np.full(d, np.nan)
    new = engine.next_iterate(x, g_sum, 0.3, 7, widened_out=widened)
    assert new.dtype == x.dtype and np.array_equal(new, expected)
    assert np.array_equal(widened, expected.astype(np.float64))
    assert np.array_equal(engine.next_iterate(x, g_sum, 0.3, 7), expected)


def test_in_two_threads_does_every_block_once_and_raises_what_a_block_raised() -> None:
    size = 5 * engine.BLOCK + 3
    seen = np.zeros(size, np.int64)
    engine.in_two_threads(lambda block: np.add.at(seen, np.arange(block.start, block.stop), 1), size)
    assert (seen == 1).all()
    mirrors = np.random.default_rng(0).standard_normal((3, size)).astype(np.float32)
    total = np.empty(size)
    engine.in_two_threads(lambda block: np.sum(mirrors[:, block], axis=0, dtype=np.float64, out=total[block]), size)
    assert np.array_equal(total, mirrors.astype(np.float64).sum(axis=0))

    def fails_at_the_end(block: slice) -> None:
        if block.stop == size:  # the last block: the helper thread's half
            raise ValueError("the last block")

    with pytest.raises(ValueError, match="the last block"):
        engine.in_two_threads(fails_at_the_end, size)


def v5_modes(shared_coin: bool | None) -> list[set[Mode]]:
    """Per round after round 0, the set of message modes 3PCv5's workers sent (REPLACE: the
    coin came up and x went dense; DELTA: h + C(x - y))."""
    method: dict[str, object] = {"name": "3pcv5", "p": 0.4}
    if shared_coin is not None:
        method["shared_coin"] = shared_coin
    cfg = small(rounds=30, workers=4, method=method)
    p = engine.plan(cfg)
    full = engine.load_data(cfg)
    nodes = [engine.WorkerNode(cfg, i, engine.local_problem(cfg, engine.load_shard(cfg, i, full), i)) for i in range(4)]
    agg = engine.Aggregator(p)
    modes = []
    for t in range(cfg.rounds):
        sent = set()
        for node in nodes:
            message, diag = node.round(t, agg.x)
            sent.add(message.mode)
            agg.apply(node.worker_id, message, diag)
        agg.finish_round()
        if t > 0:
            modes.append(sent)
    return modes


def test_3pcv5_shared_coin_is_one_coin_per_round_for_every_worker() -> None:
    """shared_coin = true (the authors' code): in each round every worker sends x, or none does;
    the default (a coin per worker) mixes the two forms in some round."""
    shared = v5_modes(True)
    assert all(len(sent) == 1 for sent in shared)
    assert {Mode.REPLACE} in shared and {Mode.DELTA} in shared  # the coin does come up both ways
    assert any(len(sent) == 2 for sent in v5_modes(None))
    assert v5_modes(False) == v5_modes(None)


def test_3pcv5_shared_coin_keeps_the_theory_stepsize() -> None:
    """The 3PC inequality is per worker, and each worker's coin is Bernoulli(p) either way."""
    method = {"name": "3pcv5", "p": 0.4}
    assert engine.plan(small(method={**method, "shared_coin": True})).gamma == engine.plan(small(method=method)).gamma


@pytest.mark.parametrize("value", ["yes", 1, 0.5])
def test_3pcv5_shared_coin_must_be_a_boolean(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^method '3pcv5': shared_coin must be true or false, got "):
        engine.plan(small(method={"name": "3pcv5", "shared_coin": value}))


def test_x0_seed_pins_x0_apart_from_the_seed() -> None:
    """A sweep over seeds with x0_seed fixed keeps x^0 (as the papers' sweeps do), while the
    other random choices still follow the seed; without it x^0 follows the seed, as before."""
    a, b = engine.plan(small(seed=1, x0_seed=5)), engine.plan(small(seed=2, x0_seed=5))
    assert np.array_equal(a.x0, b.x0)
    assert np.array_equal(a.x0, np.random.default_rng(5).normal(0.0, 1.0, a.dim))
    one, two = engine.plan(small(seed=1)), engine.plan(small(seed=2))
    assert not np.array_equal(one.x0, two.x0)
    assert np.array_equal(one.x0, np.random.default_rng(1).normal(0.0, 1.0, one.dim))
    assert np.array_equal(one.x0, engine.plan(small(seed=1, x0_seed=1)).x0)


@pytest.mark.parametrize("value", [-1, "7", 2.5])
def test_x0_seed_must_be_a_nonnegative_integer(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^config: x0_seed: Input should be "):
        small(x0_seed=value)
