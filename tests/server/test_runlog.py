"""A run's files on a full disk: each write that fails is one OutputError, and what was there stays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_tmpfs
from threepc.common.errors import OutputError
from threepc.server import checkpoint
from threepc.server.runlog import RunLog


def fill(disk: Path) -> None:
    """Take every free byte of `disk`."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 512):
                pass
        except OSError:  # ENOSPC: full
            pass
    assert (disk / "filler").stat().st_size > 0


def test_every_write_on_a_full_disk_is_one_error_and_keeps_what_was_there(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "disk", "128k") as disk:
        out = disk / "run"
        log = RunLog(out)
        for t in range(3):
            log.write_row({"round": t})
        x = np.arange(2000.0)
        log.close({"rounds": 3}, x)
        state = {"x": x, "mirrors": np.zeros((1, 2000)), "g_sum": np.zeros(2000), "t": np.array(0),
                 "meters": np.zeros((1, 5), np.int64)}
        checkpoint.save(out, state, [0], [0], json.dumps({"workers": 1}), [None])
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        fill(disk)

        log = RunLog(out, keep_bytes=len(before["metrics.jsonl"]))  # as a resumed run appends
        with pytest.raises(OutputError, match=f"cannot write {out}/metrics.jsonl: No space left on device; the "
                                              "rows before round 3 are kept"):
            log.write_row({"round": 3, "pad": "x" * 10_000})
        rows, _ = checkpoint.resume_rows(out / "metrics.jsonl", 10)
        assert rows == [{"round": t} for t in range(3)]
        with pytest.raises(OutputError, match=f"cannot write {out}/x_final.npy: No space left on device"):
            log.close({"rounds": 4}, np.ones(2000))
        with pytest.raises(OutputError, match=f"cannot write {out}/summary.json: No space left on device"):
            RunLog(out, keep_bytes=len(before["metrics.jsonl"])).close({"pad": "x" * 100_000})
        with pytest.raises(OutputError, match=f"cannot write {out}/checkpoint.npz: No space left on device"):
            checkpoint.save(out, {**state, "x": np.ones(2000)}, [0], [0], json.dumps({"workers": 1}), [None])
        after = {p.name: p.read_bytes() for p in out.iterdir()}
        assert after.keys() == before.keys()  # no half-written .tmp left behind
        assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == {
            k: v for k, v in before.items() if k != "metrics.jsonl"}
        assert after["metrics.jsonl"].startswith(before["metrics.jsonl"])
        assert checkpoint.load(out).round == 0
