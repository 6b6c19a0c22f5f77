"""Updates the aggregate must not take (issue 19, item 6).

What a run's method does not send (another payload kind or mode, another dtype, a value beyond
the state dtype's range) is refused at decode, naming the field; a well-formed update that would
still make a mirror or g_sum non-finite (finite parts summing past float64's range, a value
rounding past float32's) is refused by `Aggregator.apply` before anything changes. Every message
an honest worker of each method sends is admitted (`Expect` is built from the method itself).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from threepc.common import codec, config, engine
from threepc.common.errors import DecodeError, DivergedError, RefusedUpdate
from threepc.common.payloads import DenseVector, Grid, Message, Mode, QuantizedVector, SparseVector
from threepc.common.splice import Bulk
from threepc.common.wire import Meter, Reassembler, frames
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage

F32_MAX = float(np.finfo(np.float32).max)


def small(**overrides: Any) -> config.RunConfig:
    base = {
        "workers": 3,
        "rounds": 8,
        "seed": 1,
        "compressor": {"name": "top_k", "k": 3},
        "data": {"dataset": "synthetic", "rows": 300, "dim": 30},
    }
    wire = {**base.get("wire", {}), **overrides.pop("wire", {})}  # type: ignore[dict-item]
    return config.parse({**base, **overrides, "wire": wire})


def nodes_of(cfg: config.RunConfig) -> list[engine.WorkerNode]:
    full = engine.load_data(cfg)
    return [
        engine.WorkerNode(cfg, i, engine.local_problem(cfg, engine.load_shard(cfg, i, full), i))
        for i in range(cfg.workers)
    ]


def through_the_wire(message: Message, d: int, t: int, worker_id: int, expect: Any) -> Message:
    """Encoded as a worker encodes it, decoded as the coordinator decodes it (with its Expect)."""
    envelope, bulk = ProtoWorkerMessage(), Bulk()
    codec.fill_update(envelope.update, t, worker_id, message, bulk)
    inbound = Reassembler(ProtoWorkerMessage, Meter(), 1 << 26)
    received = None
    for frame in frames(envelope, 1 << 20, bulk):
        received = inbound.feed(frame)
    assert received is not None
    return codec.message_from_proto(received.message.update, d, t, worker_id, received.bulk, expect)


# ----------------------------------------------------------------------------- honest messages pass

METHODS: list[dict[str, Any]] = [
    {},
    {"method": "gd", "compressor": "identity"},
    {"method": "ef21_plus"},
    {"method": "naive"},
    {"method": {"name": "lag", "zeta": 0.5}},
    {"method": {"name": "clag", "zeta": 0.5}},
    {"method": "3pcv1"},
    {"method": {"name": "3pcv2", "q": {"name": "rand_k", "k": 5}}},
    {"method": {"name": "3pcv3", "inner": {"name": "lag", "zeta": 0.5}}},
    {"method": {"name": "3pcv4", "c2": {"name": "top_k", "k": 2}}},
    {"method": {"name": "3pcv5", "p": 0.5}},
    {"method": "marina", "compressor": {"name": "rand_k", "k": 4}},
    {"method": {"name": "marina", "iscc": True}, "compressor": {"name": "qsgd", "s": 2}},
    {"method": "marina", "compressor": "perm_k", "workers": 5, "data": {"dataset": "synthetic", "rows": 300, "dim": 3}},
    {"method": "marina", "compressor": {"name": "perm_k_cq", "blocks": 2}, "stepsize": 0.01},
    {"method": "ef14", "stepsize": 0.01},
    {"compressor": {"name": "bernoulli", "p": 0.5, "inner": {"name": "top_k", "k": 2}}},
    {"compressor": "drive"},
    {"compressor": "scaled_sign", "init": "compressed"},
    {"wire": {"value_dtype": "float64", "iterate_dtype": "float32"}},
    {"wire": {"value_dtype": "bfloat16", "downlink": "delta"}},
]


@pytest.mark.parametrize("overrides", METHODS, ids=lambda o: repr(o)[:60])
def test_every_message_a_method_sends_is_admitted_and_applies_as_in_process(overrides: dict[str, Any]) -> None:
    """Each message, through the wire with the coordinator's `expects(i)`, decodes and leaves
    the aggregate where the in-process engine leaves it. The last worker comes in at round 3 (its
    first message then, not round 0's), as a worker whose mirror holds nothing does."""
    cfg = small(**overrides)
    plan = engine.plan(cfg)
    over_wire, in_process = engine.Aggregator(plan), engine.Aggregator(plan)
    nodes, late = nodes_of(cfg), cfg.workers - 1
    for t in range(cfg.rounds):
        absent = [late] if t < 3 else []
        for node in nodes:
            if node.worker_id in absent:
                continue
            message, diagnostics = node.round(t, over_wire.x)
            decoded = through_the_wire(message, plan.dim, t, node.worker_id, over_wire.expects(node.worker_id))
            over_wire.apply(node.worker_id, decoded, diagnostics)
            in_process.apply(node.worker_id, message, diagnostics)
        over_wire.finish_round(absent)
        in_process.finish_round(absent)
        assert over_wire.x.tobytes() == in_process.x.tobytes()
    assert np.isfinite(over_wire.x).all()


# ----------------------------------------------------------------------------- refused at decode


def _after_round_0(**overrides: Any) -> engine.Aggregator:
    """An aggregator past round 0, every worker's mirror holding its round-0 message."""
    cfg = small(**overrides)
    agg = engine.Aggregator(engine.plan(cfg))
    for node in nodes_of(cfg):
        agg.apply(node.worker_id, *node.round(0, agg.x))
    agg.finish_round()
    return agg


def _sparse(values: list[float], dtype: str = "float32", d: int = 30) -> Message:
    indices = np.arange(len(values), dtype=np.int64)
    return Message(Mode.DELTA, (SparseVector(d, indices, np.array(values, dtype), dtype),))


def _dense(value: float, dtype: str = "float32", mode: Mode = Mode.REPLACE, parts: int = 1, d: int = 30) -> Message:
    return Message(mode, tuple(DenseVector(np.full(d, value, dtype), dtype) for _ in range(parts)))


def test_a_dense_update_in_an_ef21_topk_round_is_refused_and_round_0_takes_one() -> None:
    agg = engine.Aggregator(engine.plan(small()))
    first = agg.expects(0)
    through_the_wire(_dense(1.0), 30, 0, 0, first)  # g_i^0 = grad f_i(x^0), sent in full
    with pytest.raises(DecodeError, match=r"form DELTA\(SparseVector\), but this run's method sends REPLACE\(DenseVector\)"):
        through_the_wire(_sparse([1.0]), 30, 0, 0, first)
    later = _after_round_0().expects(0)
    with pytest.raises(DecodeError, match=r"form REPLACE\(DenseVector\), but this run's method sends DELTA\(SparseVector\)"):
        through_the_wire(_dense(1.0), 30, 1, 0, later)
    with pytest.raises(DecodeError, match=r"form DELTA\(DenseVector\)"):
        through_the_wire(_dense(1.0, mode=Mode.DELTA), 30, 1, 0, later)
    with pytest.raises(DecodeError, match=r"form DELTA\(SparseVector, SparseVector\)"):
        through_the_wire(Message(Mode.DELTA, _sparse([1.0]).parts * 2), 30, 1, 0, later)
    through_the_wire(_sparse([1.0, 2.0, 3.0]), 30, 1, 0, later)


def test_a_replace_where_the_method_sends_only_delta_is_refused() -> None:
    later = _after_round_0().expects(1)
    replace = Message(Mode.REPLACE, _sparse([1.0]).parts)
    with pytest.raises(DecodeError, match=r"update: a message of form REPLACE\(SparseVector\)"):
        through_the_wire(replace, 30, 1, 1, later)


def test_a_skip_is_refused_where_the_method_never_skips_and_taken_where_it_does() -> None:
    with pytest.raises(DecodeError, match=r"form DELTA\(\)"):
        through_the_wire(Message(Mode.DELTA, (), 1), 30, 1, 0, _after_round_0().expects(0))
    lag = _after_round_0(method={"name": "lag", "zeta": 1.0})
    assert through_the_wire(Message(Mode.DELTA, (), 1), 30, 1, 0, lag.expects(0)).is_skip


def test_values_in_another_dtype_than_the_runs_are_refused() -> None:
    later = _after_round_0().expects(2)
    with pytest.raises(DecodeError, match=r"update\.parts\[0\]\.sparse\.values: float64 values, this run sends float32"):
        through_the_wire(_sparse([1.0], "float64"), 30, 1, 2, later)
    with pytest.raises(DecodeError, match=r"update\.parts\[0\]\.dense\.values: float16 values"):
        through_the_wire(_dense(1.0, "float16"), 30, 0, 2, engine.Aggregator(engine.plan(small())).expects(2))


def test_values_beyond_the_state_dtypes_range_are_refused() -> None:
    """float64 values into float32 state: 1e39 is finite on the wire, and no float32 value."""
    wide = {"wire": {"value_dtype": "float64", "iterate_dtype": "float32"}}
    later = _after_round_0(**wide).expects(0)
    with pytest.raises(DecodeError, match=r"sparse\.values: \|value\| up to 1e\+39, beyond the state dtype's range"):
        through_the_wire(_sparse([1.0, -1e39], "float64"), 30, 1, 0, later)
    first = engine.Aggregator(engine.plan(small(**wide))).expects(0)
    with pytest.raises(DecodeError, match=r"dense\.values: \|value\| up to 1e\+39"):
        through_the_wire(_dense(1e39, "float64"), 30, 0, 0, first)
    assert through_the_wire(_sparse([F32_MAX], "float64"), 30, 1, 0, later).parts[0].values[0] == F32_MAX
    # float64 state holds float64's whole range: 1.7e308 is a value (the sum is apply's to check).
    assert through_the_wire(_sparse([1.7e308], "float64"), 30, 1, 0, _after_round_0(wire={"value_dtype": "float64"}).expects(0))


# ----------------------------------------------------------------------------- refused at apply


def _state(agg: engine.Aggregator) -> dict[str, Any]:
    """Everything apply may change, copied (bit-for-bit comparable)."""
    return {
        "mirrors": agg.mirrors.tobytes(),
        "g_sum": agg.g_sum.tobytes(),
        "meters": [vars(m).copy() for m in agg.meters],
        "touched": (agg._touched.tobytes(), agg._touched_all),
        "resum": agg._resum,
        "skips": agg.skips_round,
        "figures": (None if agg._grad_sum is None else agg._grad_sum.tobytes(), agg._loss_sum, agg._diag_count),
    }


F64 = {"value_dtype": "float64", "iterate_dtype": "float64"}
F64_INTO_F32 = {"value_dtype": "float64", "iterate_dtype": "float32"}
GD = {"method": "gd", "compressor": "identity"}
# A natural-compression payload whose scale is float32's largest: 2^127 x 3.4e38 per value.
HUGE_EXPONENT = QuantizedVector(Grid.EXPONENT, 8, F32_MAX, np.full(30, 254, np.uint32), 8, np.zeros(30, bool))

# (config overrides, messages taken first as (worker, message), the hostile worker's message):
# each hostile message would make a mirror or g_sum non-finite.
HOSTILE = [
    pytest.param({"wire": F64}, [], _dense(1.7e308, "float64", parts=2), id="two-float64-parts-of-1.7e308"),
    pytest.param({"wire": F64_INTO_F32}, [], _dense(1e39, "float64"), id="1e39-into-float32-state"),
    pytest.param(
        {"wire": {**F64_INTO_F32, "downlink": "delta"}}, [], _sparse([1.0, 1e39], "float64"), id="sparse-1e39-into-float32"
    ),
    pytest.param(
        {"wire": {**F64, "downlink": "delta"}, "stepsize": 1e-3},
        [(0, _sparse([1.7e308], "float64"))],
        _sparse([1.7e308, 1.0], "float64"),
        id="sparse-g_sum-past-float64",
    ),
    pytest.param({**GD, "wire": F64_INTO_F32}, [], _dense(1e39, "float64"), id="gd-1e39-into-float32-state"),
    pytest.param(
        {**GD, "wire": F64, "stepsize": 1e-3}, [(0, _dense(1.7e308, "float64"))], _dense(1.7e308, "float64"), id="gd-rows-summing-past-float64"
    ),
    pytest.param(
        {"wire": F64, "stepsize": 1e-3},
        [(0, _dense(-1.7e308, "float64", mode=Mode.DELTA))],
        _dense(-1.7e308, "float64", mode=Mode.DELTA),
        id="dense-g_sum-past-float64",
    ),
    pytest.param(  # finite sums, but a step of gamma / n = 3.3 times 1.7e308
        {"wire": {**F64, "downlink": "delta"}, "stepsize": 10.0}, [], _sparse([1.7e308], "float64"), id="sparse-step-past-float64"
    ),
    pytest.param({**GD, "wire": F64}, [], _dense(1.7e308, "float64"), id="gd-step-past-float64"),
    pytest.param(
        {"wire": {"iterate_dtype": "float32"}, "stepsize": 10.0}, [], _dense(F32_MAX / 2, mode=Mode.DELTA), id="step-past-float32"
    ),
    pytest.param(
        {"method": "marina", "compressor": "natural_compression", "wire": {"iterate_dtype": "float32"}}, [], Message(Mode.DELTA, (HUGE_EXPONENT,)), id="quantized-past-float32"
    ),
]


@pytest.mark.parametrize(("overrides", "before", "hostile"), HOSTILE)
def test_apply_refuses_what_would_make_the_aggregate_non_finite_and_changes_nothing(
    overrides: dict[str, Any], before: list[tuple[int, Message]], hostile: Message
) -> None:
    """RefusedUpdate, the state bit for bit as it was (diagnostics given with the update are
    dropped with it), and the run goes on: the round closes without that worker, finite, exactly
    as if its update had never come."""
    agg, reference = _after_round_0(**overrides), _after_round_0(**overrides)
    given = dict(before)
    for worker in (0, 1):  # the others' updates of the round (a skip where none is given)
        message = given.get(worker, Message(Mode.DELTA, (), 1))
        agg.apply(worker, message)
        reference.apply(worker, message)
    kept = _state(agg)
    with pytest.raises(RefusedUpdate, match=r"worker 2's update for round 1 would make the aggregate non-finite"):
        agg.apply(2, hostile, (1.0, np.ones(30)))
    assert _state(agg) == kept
    assert agg.finish_round([2]) == reference.finish_round([2])
    assert np.isfinite(agg.x).all() and np.isfinite(agg.g_sum).all()
    assert agg.x.tobytes() == reference.x.tobytes() and agg.g_sum.tobytes() == reference.g_sum.tobytes()
    assert agg.change is None or all(
        a is None and b is None or np.array_equal(a, b) for a, b in zip(agg.change, reference.change)  # type: ignore[arg-type]
    )


def test_a_diverging_run_ends_in_process_where_it_ends_over_grpc() -> None:
    """Least squares with a stepsize far too large: round 20 takes worker 0's update and refuses
    the others' (each would push x^{21} past float32's range), round 21 refuses all three and
    ends the run. In process the refused workers are absent and restored from the mirror, as the
    coordinator does, so both transports end at the same round with the same rows (before, in
    process ended at round 20 and over gRPC at 21)."""
    cfg = small(method="gd", compressor="identity", problem="least_squares", stepsize=100.0, rounds=60, wire=F64_INTO_F32)
    rows: list[dict] = []
    with pytest.raises(DivergedError, match=r"the run diverged at round 21: each of its 3 updates would have made"):
        engine.run_in_process(engine.plan(cfg), rows.append)
    assert len(rows) == 21 and rows[20]["absent"] == 2 and all(r["absent"] == 0 for r in rows[:20])


def test_a_round_whose_every_update_is_refused_is_a_divergence() -> None:
    """Honest workers whose updates all leave the range (a stepsize too large) are not hostile
    peers: the round ends the run as a divergence, as it did in process and over gRPC before."""
    agg = _after_round_0(wire={"iterate_dtype": "float32"}, stepsize=10.0)
    for worker in range(3):
        with pytest.raises(RefusedUpdate):
            agg.apply(worker, _dense(F32_MAX / 2, mode=Mode.DELTA))
    with pytest.raises(DivergedError, match=r"the run diverged at round 1: each of its 3 updates would have made"):
        agg.finish_round()


def test_a_decoded_dense_update_carries_its_largest_value_and_apply_checks_by_it() -> None:
    """The decoder's finiteness pass finds max |value|; apply takes it instead of a pass of its own."""
    decoded = through_the_wire(_dense(-1e39, "float64"), 30, 0, 2, None)
    assert decoded.parts[0].largest == 1e39  # type: ignore[union-attr]
    agg = engine.Aggregator(engine.plan(small(wire=F64_INTO_F32)))
    kept = _state(agg)
    with pytest.raises(RefusedUpdate, match=r"a value of 1e\+39 for state of \|x\| <= 3.402823e\+38"):
        agg.apply(2, decoded)
    assert _state(agg) == kept
