"""A run's output folder: metrics.jsonl (one row per round) and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from threepc.common.engine import Plan


class RunLog:
    """Writes each round's row as it completes (flushed, so a crash loses nothing written)."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - open for the run, closed by close()

    def write_row(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def close(self, summary: dict[str, Any], x_final: np.ndarray | None = None) -> None:
        """Write summary.json and the final iterate (x_final.npy, for exact comparisons)."""
        self._metrics.close()
        if x_final is not None:
            np.save(self.out / "x_final.npy", x_final, allow_pickle=False)
        write_json_atomic(self.out / "summary.json", summary)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
