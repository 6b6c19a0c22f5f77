"""The worker's side of the delta downlink: rebuild x from the change, or ask for a resync."""

import dataclasses
import numpy as np

from threepc.common import codec, config, engine
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
    assert np.array_equal(_iterate(session, node, dense, {}), agg.x)
    other = engine.WorkerNode(p.resolved, 1, engine.local_problem(p.resolved, engine.load_shard(p.resolved, 1, full), 1))
    for worker in (node, other):
        agg.apply(worker.worker_id, worker.round(0, agg.x)[0])
    agg.finish_round()
    indices, values = agg.change
    delta = codec.fill_round_change(ProtoRound(), 1, agg.x.dtype.name, indices, values, p.dim, engine.digest(agg.x))
    assert np.array_equal(_iterate(session, node, delta, {}), agg.x)
    # A follower that drifted (here: tampered with) gets None: the worker asks for round t densely.
    drifted = _Session(worker_id=0)
    _iterate(drifted, node, dense, {})
    drifted.follower.x[0] += 1.0
    assert _iterate(drifted, node, delta, {}) is None
