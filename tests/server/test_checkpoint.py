"""Checkpoints (atomic, pickle-free, complete) and the Restore that carries a worker's state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from threepc.common import codec
from threepc.common import config as config_mod
from threepc.common.engine import Aggregator, WorkerNode, load_data, load_shard, local_problem, plan
from threepc.common.errors import ConfigError, DecodeError
from threepc.common.splice import BULK_MIN, Bulk
from threepc.common.wire import Meter, Reassembler, frames
from threepc.proto.threepc_pb2 import CoordinatorMessage as ProtoCoordinatorMessage
from threepc.proto.threepc_pb2 import Restore as ProtoRestore
from threepc.server import checkpoint
from threepc.server.coordinator import Coordinator

CONFIG = {
    "workers": 3, "rounds": 6, "seed": 4, "method": {"name": "lag", "zeta": 0.5},
    "compressor": {"name": "top_k", "k": 2}, "data": {"dataset": "synthetic", "rows": 120, "dim": 8},
}


def _run(rounds: int) -> tuple[object, list[WorkerNode], Aggregator]:
    the_plan = plan(config_mod.parse(CONFIG))
    config = the_plan.resolved
    full = load_data(config)
    nodes = [WorkerNode(config, i, local_problem(config, load_shard(config, i, full), i)) for i in range(3)]
    agg = Aggregator(the_plan)
    for t in range(rounds):
        for node in nodes:
            message, _ = node.round(t, agg.x)
            agg.apply(node.worker_id, message)
        agg.finish_round()
    return the_plan, nodes, agg


def test_save_then_load_gives_back_every_array_and_counter(tmp_path: Path) -> None:
    the_plan, _, agg = _run(4)
    wire = [{"sent_bytes": {"round": 10}, "received_bytes": {}, "messages_sent": 1, "messages_received": 0}, None, None]
    path = checkpoint.save(tmp_path, agg.state_dict(), [0, 2, 0], [1, 0, 0], "{\"workers\": 3}", wire)
    assert path == tmp_path / "checkpoint.npz" and not (tmp_path / "checkpoint.npz.tmp").exists()
    with np.load(path, allow_pickle=False) as data:  # no pickles anywhere in it
        assert "agg/mirrors" in data.files
    saved = checkpoint.load(tmp_path)
    assert saved.round == 4 and saved.config_json == "{\"workers\": 3}" and saved.wire == wire
    assert list(saved.refused) == [0, 2, 0] and list(saved.late) == [1, 0, 0]
    fresh = Coordinator(the_plan)
    fresh.load_checkpoint(saved, [])
    for key, value in agg.state_dict().items():
        assert np.array_equal(fresh.agg.state_dict()[key], value), key
    assert fresh.refused == [0, 2, 0] and fresh.wire[0].sent == {"round": 10}


def test_a_missing_or_broken_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint.npz there"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(tmp_path)
    np.savez(tmp_path / "checkpoint.npz", x=np.zeros(2))
    with pytest.raises(ConfigError, match="lacks agg/g_sum"):
        checkpoint.load(tmp_path)


def test_resume_rows_keeps_the_rounds_before_the_checkpoint(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"round": t}) for t in range(7)] + ['{"round": 7, "lo']  # cut short by a crash
    metrics.write_text("\n".join(lines))
    assert [r["round"] for r in checkpoint.resume_rows(metrics, 5)] == [0, 1, 2, 3, 4]
    assert [r["round"] for r in checkpoint.resume_rows(metrics, 9)] == list(range(7))
    assert checkpoint.resume_rows(tmp_path / "none.jsonl", 3) == []


def test_a_restore_over_the_wire_rebuilds_the_worker_exactly() -> None:
    """LAG's state (h, y) from the mirror and x^{t-1}, through the proto: the next message is equal."""
    _, nodes, agg = _run(5)
    proto = codec.fill_restore(ProtoRestore(), agg.t, (agg.mirrors[1], agg.x_prev))
    wire = type(proto).FromString(proto.SerializeToString())
    h, x_prev = codec.restore_from_proto(wire, agg.d)
    assert h.dtype == agg.mirrors.dtype and np.array_equal(h, agg.mirrors[1])  # at the mirror's own dtype
    original = nodes[1]
    rebuilt = WorkerNode(original.config, 1, original.problem)
    rebuilt.restore(h, x_prev)
    assert np.array_equal(rebuilt.state.h, original.state.h) and np.array_equal(rebuilt.state.y, original.state.y)
    expected, _ = original.round(agg.t, agg.x)
    got, _ = rebuilt.round(agg.t, agg.x)
    assert np.array_equal(got.apply(agg.mirrors[1]), expected.apply(agg.mirrors[1]))


def test_a_restore_without_state_or_with_bad_fields() -> None:
    assert codec.restore_from_proto(codec.fill_restore(ProtoRestore(), 3, None), 8) is None
    good = codec.fill_restore(ProtoRestore(), 3, (np.ones(8), np.ones(8)))
    short = type(good)()
    short.CopyFrom(good)
    short.mirror = short.mirror[:-8]
    with pytest.raises(DecodeError, match="restore.mirror: 56 bytes, expected 8 float64"):
        codec.restore_from_proto(short, 8)
    zero = type(good)()
    zero.CopyFrom(good)
    zero.round = 0
    with pytest.raises(DecodeError, match="restore.round"):
        codec.restore_from_proto(zero, 8)


@pytest.mark.parametrize("path", ["restore", "welcome.restore"])
def test_a_large_restore_travels_spliced_and_chunked_as_its_own_dtypes(path: str) -> None:
    """Mirror and x^{t-1} large enough to be cut out of their frames, in a Restore or in a
    Welcome, through chunks: equal values back, each at its own dtype, nothing copied by protobuf."""
    d = BULK_MIN
    rng = np.random.default_rng(3)
    mirror, x_prev = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d)
    envelope, bulk = ProtoCoordinatorMessage(), Bulk()
    proto = envelope.restore if path == "restore" else envelope.welcome.restore
    codec.fill_restore(proto, 4, (mirror, x_prev), path, bulk)
    assert sorted(bulk) == [f"{path}.mirror", f"{path}.x_prev"]
    inbound = Reassembler(ProtoCoordinatorMessage, Meter(), 1 << 24)
    sent = frames(envelope, BULK_MIN, bulk)
    assert len(sent) > 1
    received = [inbound.feed(frame) for frame in sent][-1]
    assert received is not None and sorted(received.bulk) == sorted(bulk)
    message = received.message.restore if path == "restore" else received.message.welcome.restore
    h, x = codec.restore_from_proto(message, d, path, received.bulk)
    assert h.dtype == np.float32 and x.dtype == np.float64
    assert np.array_equal(h, mirror) and np.array_equal(x, x_prev)
