"""The coordinator's state that must survive: on disk (checkpoints) and on the wire (Restore).

A checkpoint is one `checkpoint.npz` in the run's out dir, written atomically (write, fsync,
rename, fsync the folder) with `np.savez` and read with `allow_pickle=False`:

    agg/*        Aggregator.state_dict(): x^t, x^{t-1}, every mirror g_i^t, their sum, t, bit meters
    coord/*      the coordinator's own counters per worker: refused, late (int64 [n])
    config_json  the run's config as the user gave it (RunConfig JSON, a 0-d str array)
    wire_json    the per-worker wire meters (JSON, a 0-d str array)

The metrics rows of rounds < t are already in metrics.jsonl; a resumed run keeps those and
drops any written after the checkpoint (`resume_rows`).

`codec.fill_restore` / `codec.restore_from_proto` carry one worker's state (its mirror and x^{t-1}) to a
rejoining worker, which rebuilds its mechanism state with `WorkerNode.restore`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from threepc.common.errors import ConfigError

CHECKPOINT = "checkpoint.npz"


class Stopped(Exception):
    """The coordinator stopped on request (SIGTERM) after writing a checkpoint; not a failure."""

    def __init__(self, round_: int, path: Path):
        super().__init__(f"stopped at round {round_}; checkpoint in {path}")
        self.round = round_
        self.path = path


@dataclass
class Checkpoint:
    """What `load` reads back: the Aggregator's arrays, the coordinator's counters, the config."""

    agg: dict[str, np.ndarray]
    refused: np.ndarray
    late: np.ndarray
    config_json: str
    wire: list[dict[str, Any]]

    @property
    def round(self) -> int:
        return int(self.agg["t"])


def save(
    out_dir: Path,
    agg_state: dict[str, np.ndarray],
    refused: list[int],
    late: list[int],
    config_json: str,
    wire: list[dict[str, Any]],
) -> Path:
    """Write out_dir/checkpoint.npz atomically; a reader sees the old one or the new one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT
    tmp = out_dir / (CHECKPOINT + ".tmp")
    arrays = {f"agg/{k}": np.asarray(v) for k, v in agg_state.items()}
    arrays["coord/refused"] = np.asarray(refused, np.int64)
    arrays["coord/late"] = np.asarray(late, np.int64)
    arrays["config_json"] = np.array(config_json)
    arrays["wire_json"] = np.array(json.dumps(wire))
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return path


def load(out_dir: Path) -> Checkpoint:
    """The checkpoint in out_dir, or a ConfigError saying what is missing or broken."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"--resume {out_dir}: no {CHECKPOINT} there (the run wrote none)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume {out_dir}: {CHECKPOINT} cannot be read: {err}") from None
    needed = {"agg/x", "agg/mirrors", "agg/g_sum", "agg/t", "agg/meters", "coord/refused", "coord/late",
              "config_json", "wire_json"}
    missing = sorted(needed - set(arrays))
    if missing:
        raise ConfigError(f"--resume {out_dir}: {CHECKPOINT} lacks {', '.join(missing)}")
    return Checkpoint(
        agg={k.removeprefix("agg/"): v for k, v in arrays.items() if k.startswith("agg/")},
        refused=arrays["coord/refused"],
        late=arrays["coord/late"],
        config_json=str(arrays["config_json"]),
        wire=json.loads(str(arrays["wire_json"])),
    )


def resume_rows(metrics: Path, rounds_done: int) -> list[dict[str, Any]]:
    """The rows of rounds < rounds_done from metrics.jsonl (later ones were after the checkpoint)."""
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a row cut short by the crash: everything from here is after the checkpoint
        if row.get("round", rounds_done) < rounds_done:
            rows.append(row)
    return rows


# ---------------------------------------------------------------------- one worker's state


