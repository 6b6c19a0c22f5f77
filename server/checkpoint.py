"""The coordinator's state that must survive: on disk (checkpoints) and on the wire (Restore).

A checkpoint is one `checkpoint.npz` in the run's out dir, written atomically (write, fsync,
rename, fsync the folder: `runlog.write_atomic`) with `np.savez` and read with `allow_pickle=False`:

    agg/*        Aggregator.state_dict(): x^t, x^{t-1}, every mirror g_i^t, their sum, t, bit meters
    coord/*      the coordinator's own counters per worker: refused, late (int64 [n])
    config_json  the run's config as the user gave it (RunConfig JSON, a 0-d str array)
    wire_json    the per-worker wire meters (JSON, a 0-d str array)

`load` validates all of it (readable, every array's shape, dtype and finiteness, 0 <= t <= rounds,
counters >= 0, the config parses and fits the arrays) and says in one `CheckpointError` line
what is wrong: a damaged or crafted file never reaches the coordinator.

A resumed run may change only what leaves its math and data alone (`RESUMABLE`: rounds, the
checkpoint, timeout and diagnostics cadences, the transport's sizes); `resume_config` refuses
any other difference in one line naming the fields.

The metrics rows of rounds < t are already in metrics.jsonl; a resumed run keeps those and
drops any written after the checkpoint (`resume_rows`).

`codec.fill_restore` / `codec.restore_from_proto` carry one worker's state (its mirror and x^{t-1}) to a
rejoining worker, which rebuilds its mechanism state with `WorkerNode.restore`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from threepc.common import config as config_mod
from threepc.common.errors import CheckpointError, ConfigError
from threepc.server.runlog import CHECKPOINT, write_atomic

# Config fields a resumed run may change: none of them changes an iterate, a bit count or the
# data (the rounds still to run, cadences, how long a round waits, how bytes are cut up).
RESUMABLE = (
    "rounds", "checkpoint_every", "round_timeout_s", "diagnostics_every",
    "wire.read_ahead", "wire.chunk_bytes", "wire.max_message_bytes",
)


class Stopped(Exception):
    """The coordinator stopped on request (SIGTERM) after writing a checkpoint; not a failure."""

    def __init__(self, round_: int, path: Path):
        super().__init__(f"stopped at round {round_}; checkpoint in {path}")
        self.round = round_
        self.path = path


@dataclass
class Checkpoint:
    """What `load` reads back, validated: the Aggregator's arrays, the coordinator's counters,
    the config it was written for."""

    path: Path
    agg: dict[str, np.ndarray]
    refused: np.ndarray
    late: np.ndarray
    config_json: str
    config: config_mod.RunConfig
    wire: list[dict[str, Any] | None]

    @property
    def round(self) -> int:
        return int(self.agg["t"])


def save(
    out_dir: Path,
    agg_state: dict[str, np.ndarray],
    refused: list[int],
    late: list[int],
    config_json: str,
    wire: list[dict[str, Any] | None],
) -> Path:
    """Write out_dir/checkpoint.npz atomically: a reader sees the old one or the new one, and a
    failed write (a full disk) leaves the old one and raises OutputError."""
    arrays = {f"agg/{k}": np.asarray(v) for k, v in agg_state.items()}
    arrays["coord/refused"] = np.asarray(refused, np.int64)
    arrays["coord/late"] = np.asarray(late, np.int64)
    arrays["config_json"] = np.array(config_json)
    arrays["wire_json"] = np.array(json.dumps(wire))
    path = out_dir / CHECKPOINT
    write_atomic(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    return path


def load(out_dir: Path) -> Checkpoint:
    """The checkpoint in out_dir, validated, or a CheckpointError saying what is missing or wrong."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume {out_dir}: no {CHECKPOINT} there (the run wrote none)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    # A damaged zip fails in any of zipfile's and numpy's header parser's ways (BadZipFile,
    # EOFError, a CRC mismatch, TokenError, NotImplementedError, ...): all mean "damaged".
    except Exception as err:  # noqa: BLE001
        why = " ".join(str(err).split())  # one line, whatever the parser said
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {why})") from None
    return _validated(path, arrays)


def _validated(path: Path, arrays: dict[str, np.ndarray]) -> Checkpoint:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {what}")

    needed = {"agg/x", "agg/mirrors", "agg/g_sum", "agg/t", "agg/meters", "coord/refused", "coord/late",
              "config_json", "wire_json"}
    missing = sorted(needed - set(arrays))
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    config_json = _text(arrays["config_json"], "config_json", bad)
    try:
        config = config_mod.parse(json.loads(config_json), "config_json")
    except (json.JSONDecodeError, ConfigError) as err:
        raise bad(f"the config it was written for does not parse: {err}") from None
    n, dtype = config.workers, np.dtype(config.wire.iterate_dtype)

    t = arrays["agg/t"]
    if t.shape != () or t.dtype.kind not in "iu":
        raise bad(f"agg/t is {t.dtype} {t.shape}, expected one integer")
    if not 0 <= int(t) <= config.rounds:
        raise bad(f"t = {int(t)}, expected a round in [0, {config.rounds}] (its config's rounds)")
    x = arrays["agg/x"]
    if x.ndim != 1 or x.size == 0:
        raise bad(f"agg/x has shape {x.shape}, expected a vector of d > 0")
    d = x.size
    expected = {"agg/x": ((d,), dtype), "agg/mirrors": ((n, d), dtype), "agg/g_sum": ((d,), np.dtype(np.float64))}
    if "agg/x_prev" in arrays:
        expected["agg/x_prev"] = ((d,), dtype)
    elif int(t) > 0:
        raise bad(f"t = {int(t)} but no agg/x_prev (every round after 0 writes one)")
    for key, (shape, want) in expected.items():
        value = arrays[key]
        if value.shape != shape or value.dtype != want:
            raise bad(f"{key} is {value.dtype} {value.shape}, expected {want} {shape} (n = {n}, d = {d})")
        if not np.isfinite(value).all():
            raise bad(f"{key} holds {np.count_nonzero(~np.isfinite(value))} values that are not finite")
    for key, shape in (("agg/meters", (n, 5)), ("coord/refused", (n,)), ("coord/late", (n,))):
        value = arrays[key]
        if value.shape != shape or value.dtype.kind not in "iu":
            raise bad(f"{key} is {value.dtype} {value.shape}, expected integers {shape} (n = {n})")
        if (value < 0).any():
            raise bad(f"{key} holds a negative count")
    try:
        wire = json.loads(_text(arrays["wire_json"], "wire_json", bad))
    except json.JSONDecodeError as err:
        raise bad(f"wire_json is not JSON: {err}") from None
    if not isinstance(wire, list) or len(wire) != n or not all(e is None or _is_meter(e) for e in wire):
        raise bad(f"wire_json is not a list of n = {n} wire meters (or nulls)")
    return Checkpoint(
        path=path,
        agg={k.removeprefix("agg/"): v for k, v in arrays.items() if k.startswith("agg/")},
        refused=arrays["coord/refused"],
        late=arrays["coord/late"],
        config_json=config_json,
        config=config,
        wire=wire,
    )


def _text(value: np.ndarray, key: str, bad: Any) -> str:
    if value.shape != () or value.dtype.kind != "U":
        raise bad(f"{key} is {value.dtype} {value.shape}, expected one string")
    return str(value)


def _is_meter(entry: Any) -> bool:
    """A wire meter as `Meter.as_dict` writes it: byte counts by category, message counts."""
    def counts(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(b, int) and b >= 0 for b in v.values())

    return (
        isinstance(entry, dict)
        and counts(entry.get("sent_bytes")) and counts(entry.get("received_bytes"))
        and all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("messages_sent", "messages_received"))
    )


def resume_config(saved: Checkpoint, given: config_mod.RunConfig, source: str) -> config_mod.RunConfig:
    """`given` (CONFIG_FILE and the command line's overrides) if it differs from the config the
    checkpoint was written for only in `RESUMABLE` fields and still has the checkpoint's rounds
    to run; else a ConfigError naming the fields."""
    was, now = _flat(saved.config.model_dump(mode="json")), _flat(given.model_dump(mode="json"))
    differ = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k) and k not in RESUMABLE)
    where = saved.path.parent
    if differ:
        raise ConfigError(
            f"{source} differs from the run in {where} in {', '.join(differ)}: a resumed run keeps its math "
            f"and data (only {', '.join(RESUMABLE)} may change)"
        )
    if given.rounds < saved.round:
        raise ConfigError(f"{source}: rounds = {given.rounds}, but the run in {where} is at round {saved.round}")
    return given


def check_fits(saved: Checkpoint, d: int) -> None:
    """The checkpoint's vectors have the run's dimension d (its data, loaded now)."""
    if saved.agg["x"].size != d:
        raise CheckpointError(f"checkpoint {saved.path}: x has d = {saved.agg['x'].size}, this run's data has d = {d}")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'wire': {'read_ahead': 2}} -> {'wire.read_ahead': 2}: the dotted names users write."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_rows(metrics: Path, rounds_done: int) -> tuple[list[dict[str, Any]], int]:
    """The rows of rounds < rounds_done from metrics.jsonl (later ones were after the checkpoint),
    and the byte length of the file's part that holds them (a resumed run cuts it there)."""
    if not metrics.is_file():
        return [], 0
    rows, kept = [], 0
    with open(metrics, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a row cut short by a crash or a full disk: everything from here is after
            if not line.strip():
                kept += len(line)
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(row, dict) or row.get("round", rounds_done) >= rounds_done:
                break
            rows.append(row)
            kept += len(line)
    return rows, kept
