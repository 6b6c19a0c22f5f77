"""A run's output folder: metrics.jsonl (one row per round), summary.json, x_final.npy, and the
coordinator's checkpoint.npz beside them.

A folder holds at most one run. `claim` is called before anything runs: it refuses a folder that
cannot be written, or that holds a run, unless the command says what to do with it (`--resume`
continues it, `--overwrite` replaces it). `--overwrite` removes the old run's files only when
the new run starts (`RunLog.start`: its first row, or the coordinator listening), so a new run
that fails before that (a bad config, missing data, a busy port) leaves the old one whole.

Every write that fails (a full disk) is one `OutputError` line; what was written before stays:
rows are appended and flushed one at a time, and summary.json, x_final.npy and checkpoint.npz
are each written to a temporary file and renamed over the old one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from threepc.common.engine import Plan
from threepc.common.errors import OutputError

METRICS, SUMMARY, X_FINAL = "metrics.jsonl", "summary.json", "x_final.npy"
CHECKPOINT = "checkpoint.npz"  # written by server/checkpoint.py
RUN_FILES = (METRICS, SUMMARY, CHECKPOINT, X_FINAL)


def run_files(out: Path) -> list[str]:
    """The files of a run that `out` holds (an empty file holds nothing to lose)."""
    found = []
    for name in RUN_FILES:
        with contextlib.suppress(OSError):
            if (out / name).stat().st_size > 0:
                found.append(name)
    return found


def claim(out: Path, *, overwrite: bool = False, continuing: bool = False, resume: str | None = None) -> None:
    """Check that `out` can take a run before it starts: it can be written, and it holds no run
    unless `overwrite` (replace it, at `RunLog.start`) or `continuing` (it is the run resumed).

    `resume`: how this command would continue the run there (e.g. "--resume DIR"), for the
    refusal's line.
    """
    # Folders made for the probe go again: a run refused later (bad config, missing data)
    # leaves no trace; RunLog.start makes them when the run starts.
    made = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".threepc-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    finally:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    found = run_files(out)
    if not found or overwrite or continuing:
        return
    held = f"{out} holds a run ({', '.join(found)})"
    if CHECKPOINT not in found:
        raise OutputError(f"{held} and no checkpoint for --resume to continue from: --overwrite replaces it, or give another --out")
    if resume:
        raise OutputError(f"{held}: {resume} continues it, --overwrite replaces it")
    raise OutputError(f"{held}: --overwrite replaces it, or give another --out")


def remove_run(out: Path) -> None:
    """Remove the run files in `out`: `--overwrite`, as the new run starts. The finished-run
    markers go first, so an interrupted removal still looks like a run to `claim`. (A local
    run's workers/ logs and reports are the new run's by then: its workers rewrite them.)"""
    for name in (SUMMARY, X_FINAL, CHECKPOINT, METRICS):
        for path in (out / name, out / (name + ".tmp")):
            path.unlink(missing_ok=True)


class RunLog:
    """Writes each round's row as it completes (flushed, so a crash loses nothing written).

    Nothing in the folder is touched until `start` (called by the first row at the latest):
    `replace` removes an old run's files there (`--overwrite`); `keep_bytes` continues the
    folder's own metrics.jsonl cut after the rows before the checkpoint (`--resume` into the
    same folder); `rows` are written first (`--resume` into another folder).
    """

    def __init__(
        self, out_dir: str | Path, *, replace: bool = False, keep_bytes: int | None = None,
        rows: Sequence[dict[str, Any]] = (),
    ):
        self.out = Path(out_dir)
        self.path = self.out / METRICS
        self._replace, self._keep_bytes, self._rows = replace, keep_bytes, list(rows)
        self._metrics: IO[str] | None = None
        self._closed = False

    def start(self) -> None:
        """Open metrics.jsonl for this run (once; later calls do nothing)."""
        if self._metrics is not None or self._closed:
            return
        try:
            if self._replace:
                remove_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            if self._keep_bytes is not None and self.path.exists():
                os.truncate(self.path, self._keep_bytes)  # in place: needs no free space
                self._metrics = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            else:
                self._metrics = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None
        for row in self._rows:
            self.write_row(row)

    def write_row(self, row: dict[str, Any]) -> None:
        self.start()
        assert self._metrics is not None
        try:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        except OSError as err:
            self._abandon()
            raise OutputError(
                f"cannot write {self.path}: {err.strerror or err}; the rows before round {row.get('round')} "
                "are kept (and the last checkpoint, if any)"
            ) from None

    def _abandon(self) -> None:
        """Drop what the failed write left buffered (closing would try it again)."""
        self._closed = True
        if self._metrics is not None:
            with contextlib.suppress(OSError):
                self._metrics.close()
            self._metrics = None

    def close(self, summary: dict[str, Any], x_final: np.ndarray | None = None) -> None:
        """Write the final iterate (x_final.npy, for exact comparisons) and summary.json."""
        self.start()
        if self._metrics is not None:
            try:
                self._metrics.close()
            except OSError as err:
                self._abandon()
                raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None
            self._metrics = None
        self._closed = True
        if x_final is not None:
            write_atomic(self.out / X_FINAL, lambda f: np.save(f, x_final, allow_pickle=False))
        write_json_atomic(self.out / SUMMARY, summary)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one; a
    failed write (a full disk) leaves the old one and raises OutputError."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()  # what a full disk left half-written
        raise OutputError(f"cannot write {path}: {err.strerror or err} (what was there is unchanged)") from None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, default=str).encode()))


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What the coordinator resolved before round 0."""
    return {
        "dim": plan.dim,
        "gamma": plan.gamma,
        "L_minus": plan.smoothness.L_minus,
        "L_plus": plan.smoothness.L_plus,
        "L_i": list(plan.smoothness.L_i),
        "L_pm": plan.smoothness.L_pm,
        "data": plan.dataset,
    }
