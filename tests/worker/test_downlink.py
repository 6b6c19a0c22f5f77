"""The worker's side of the delta downlink: rebuild x from the change, or ask for a resync."""

import dataclasses

import numpy as np
import pytest

from threepc.common import codec, config, engine
from threepc.common.errors import DecodeError
from threepc.proto.threepc_pb2 import Round as ProtoRound
from threepc.worker.client import _iterate, _Session


def test_a_worker_rebuilds_x_and_asks_for_a_resync_when_the_digest_differs() -> None:
    cfg = config.parse({"workers": 2, "rounds": 3, "data": {"dataset": "synthetic", "rows": 40, "dim": 12}})
    p = engine.plan(cfg)
    full = engine.load_data(p.resolved)
    node = engine.WorkerNode(p.resolved, 0, engine.local_problem(p.resolved, engine.load_shard(p.resolved, 0, full), 0))
    session = _Session(worker_id=0)
    agg = engine.Aggregator(dataclasses.replace(p, downlink="delta"))
    dense = codec.fill_round(ProtoRound(), 0, agg.x, agg.g_sum, engine.digest(agg.x))
    assert dense.aggregate_zero and not dense.aggregate_sum  # round 0's g_sum: zeros, left out
    x, x64 = _iterate(session, node, dense, {})
    assert np.array_equal(x, agg.x) and np.array_equal(x64, agg.x.astype(np.float64))  # the follower's
    other = engine.WorkerNode(p.resolved, 1, engine.local_problem(p.resolved, engine.load_shard(p.resolved, 1, full), 1))
    for worker in (node, other):
        agg.apply(worker.worker_id, worker.round(0, agg.x)[0])
    agg.finish_round()
    indices, values = agg.change
    assert indices is None and values is agg.g_sum  # round 0 changed every coordinate: no copies
    delta = codec.fill_round_change(ProtoRound(), 1, agg.x.dtype.name, indices, values, p.dim, engine.digest(agg.x))
    assert delta.change_count == p.dim and not delta.change_indices  # d indices could only be 0..d-1
    x, x64 = _iterate(session, node, delta, {})
    assert np.array_equal(x, agg.x) and np.array_equal(x64, agg.x.astype(np.float64))
    # A follower that drifted (here: tampered with) gets None: the worker asks for round t densely.
    drifted = _Session(worker_id=0)
    _iterate(drifted, node, dense, {})
    drifted.follower.x[0] += 1.0
    assert _iterate(drifted, node, delta, {}) is None


def test_a_change_of_g_sum_decodes_exactly_and_refuses_what_no_coordinator_sends() -> None:
    d = 50
    values = np.random.default_rng(0).standard_normal(d)
    some = codec.fill_round_change(ProtoRound(), 4, "float32", np.array([3, 7, 41]), values[[3, 7, 41]], d, b"")
    indices, decoded = codec.round_change_from_proto(some, d)
    assert indices.tolist() == [3, 7, 41] and np.array_equal(decoded, values[[3, 7, 41]])
    every = codec.fill_round_change(ProtoRound(), 4, "float32", np.arange(d), values, d, b"")
    assert every.change_count == d and not every.change_indices
    indices, decoded = codec.round_change_from_proto(every, d)
    assert indices is None and np.array_equal(decoded, values)
    with pytest.raises(DecodeError, match="change_count: 51 > d = 50"):
        codec.round_change_from_proto(ProtoRound(change_count=51), d)
    with pytest.raises(DecodeError, match="given for a change of all d coordinates"):
        codec.round_change_from_proto(ProtoRound(change_count=d, change_indices=b"\x01", change_values=values.tobytes()), d)
    with pytest.raises(DecodeError, match="aggregate_sum: given with aggregate_zero"):
        codec.aggregate_from_proto(ProtoRound(aggregate_zero=True, aggregate_sum=values.tobytes()), d)
    with pytest.raises(DecodeError, match="change_values"):
        codec.round_change_from_proto(ProtoRound(change_count=d, change_values=values[:-1].tobytes()), d)
