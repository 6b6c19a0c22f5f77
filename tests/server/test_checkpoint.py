"""Checkpoints (atomic, pickle-free, complete) and the Restore that carries a worker's state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import threepc
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
    rows, kept = checkpoint.resume_rows(metrics, 5)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert metrics.read_bytes()[:kept] == "".join(line + "\n" for line in lines[:5]).encode()
    assert [r["round"] for r in checkpoint.resume_rows(metrics, 9)[0]] == list(range(7))
    assert checkpoint.resume_rows(tmp_path / "none.jsonl", 3) == ([], 0)


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


# ---------------------------------------------------------------------- damaged checkpoints, through the CLI


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _crafted(**changes: object) -> Callable[[Path], None]:
    """Rewrite the checkpoint with some arrays changed (a value, or a function of the old one)."""
    def damage(path: Path) -> None:
        arrays = _arrays(path)
        for key, change in changes.items():
            key = key.replace("__", "/")
            arrays[key] = change(arrays[key]) if callable(change) else np.asarray(change)
        with open(path, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
    return damage


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(edit(path.read_bytes()))


def _flip_middle_bit(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    return bytes(flipped)


def _nan_first(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[0] = np.nan
    return x


def _config_with(**fields: object) -> Callable[[np.ndarray], str]:
    return lambda text: json.dumps({**json.loads(str(text)), **fields})


DAMAGED = {
    "truncated": (_bytes(lambda b: b[: len(b) // 2]), "cannot be read"),
    "one bit flipped": (_bytes(_flip_middle_bit), "cannot be read"),
    "empty": (_bytes(lambda b: b""), "cannot be read"),
    "short x": (_crafted(agg__x=lambda x: x[:-1]), "agg/mirrors is float64 (3, 8), expected float64 (3, 7)"),
    "NaN in x": (_crafted(agg__x=_nan_first), "agg/x holds 1 values that are not finite"),
    "t = -1": (_crafted(agg__t=-1), "t = -1, expected a round in [0, 6]"),
    "t > rounds": (_crafted(agg__t=7), "t = 7, expected a round in [0, 6]"),
    "bad JSON": (_crafted(config_json="{\"workers\": 3,"), "the config it was written for does not parse"),
    "a config that is not one": (_crafted(config_json=_config_with(workers=0)), "config_json: workers"),
    "wrong n": (_crafted(config_json=_config_with(workers=4)), "agg/mirrors is float64 (3, 8), expected float64 (4, 8)"),
    "negative counter": (_crafted(coord__refused=[0, -1, 0]), "coord/refused holds a negative count"),
    "t without x_prev": (None, "t = 4 but no agg/x_prev"),
    "bad wire meters": (_crafted(wire_json="[1, 2]"), "wire_json is not a list of n = 3 wire meters"),
    "x of another d": (_crafted(agg__x=lambda x: np.zeros(9), agg__mirrors=lambda m: np.zeros((3, 9)),
                                agg__g_sum=lambda g: np.zeros(9), agg__x_prev=lambda x: np.zeros(9)),
                       "x has d = 9, this run's data has d = 8"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_checkpoint_is_one_line_through_serve_resume_and_nothing_changes(tmp_path: Path, case: str) -> None:
    the_plan, _, agg = _run(4)
    run = tmp_path / "run"
    checkpoint.save(run, agg.state_dict(), [0, 0, 0], [0, 0, 0], config_mod.to_json(the_plan.config), [None] * 3)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": t}) + "\n" for t in range(6)))
    checkpoint.load(run)  # undamaged, it is a checkpoint serve resumes from
    damage, said = DAMAGED[case]
    (damage or _without("agg/x_prev"))(run / "checkpoint.npz")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = threepc("serve", "--resume", str(run), "--listen", "127.0.0.1:0", "--no-dashboard", "-q", timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith(f"threepc: error: checkpoint {run / 'checkpoint.npz'}: ")
    assert said in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing overwritten, nothing added


def _without(key: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        arrays = _arrays(path)
        del arrays[key]
        with open(path, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
    return damage


def test_a_resumed_run_may_change_its_cadences_and_length_but_not_its_math(tmp_path: Path) -> None:
    the_plan, _, agg = _run(4)
    checkpoint.save(tmp_path, agg.state_dict(), [0] * 3, [0] * 3, config_mod.to_json(the_plan.config), [None] * 3)
    saved = checkpoint.load(tmp_path)

    def edited(**fields: object) -> config_mod.RunConfig:
        return config_mod.parse({**the_plan.config.model_dump(mode="json"), **fields})

    allowed = edited(rounds=60, checkpoint_every=3, round_timeout_s=5.0, diagnostics_every=10,
                     wire={"read_ahead": 1, "chunk_bytes": 4096, "max_message_bytes": 1 << 20})
    assert checkpoint.resume_config(saved, allowed, "run.toml") is allowed
    math = edited(seed=5, stepsize_multiplier=2.0, compressor={"name": "top_k", "k": 3}, wire={"value_dtype": "float64"})
    with pytest.raises(ConfigError, match=f"run.toml differs from the run in {tmp_path} in compressor.k, seed, "
                                          "stepsize_multiplier, wire.value_dtype: a resumed run keeps its math"):
        checkpoint.resume_config(saved, math, "run.toml")
    with pytest.raises(ConfigError, match=f"run.toml: rounds = 3, but the run in {tmp_path} is at round 4"):
        checkpoint.resume_config(saved, edited(rounds=3), "run.toml")
