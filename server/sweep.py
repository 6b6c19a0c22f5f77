"""Sweeps: a grid of runs (method x compressor parameter x stepsize multiplier, or any fields),
one metrics file per run, and a table of bits-to-tolerance like the papers' heatmaps.

    threepc sweep CONFIG --grid compressor.k=1,2,4 --grid stepsize_multiplier=1,2,4,8 --out DIR

A grid axis is a dotted config field and comma-separated TOML values; every combination runs
(in-process by default: identical figures to a distributed run by design, and much cheaper).
"""

from __future__ import annotations

import copy
import itertools
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threepc.common import config as config_mod
from threepc.common.errors import ConfigError, OutputError
from threepc.server.runlog import claim, write_json_atomic

TABLE = "table.json"


@dataclass(frozen=True)
class Axis:
    field: str  # dotted path, e.g. "compressor.k"
    values: tuple[Any, ...]


def parse_axis(text: str) -> Axis:
    """'compressor.k=1,2,4' -> Axis('compressor.k', (1, 2, 4)); values are TOML literals or bare words."""
    field, sep, values = text.partition("=")
    if not sep or not field.strip() or not values.strip():
        raise ConfigError(f"grid axis {text!r}: expected FIELD=V1,V2,...")
    return Axis(field.strip(), tuple(_literal(v.strip()) for v in values.split(",")))


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def with_field(data: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """A copy of config data with a dotted field set; a component given as a string becomes a table."""
    out = copy.deepcopy(data)
    node = out
    keys = field.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if isinstance(child, str):
            child = {"name": child}
        node[key] = child if isinstance(child, dict) else {}
        node = node[key]
    node[keys[-1]] = value
    return out


def run_name(point: dict[str, Any]) -> str:
    return "_".join(f"{field.replace('.', '-')}={value}" for field, value in point.items()) or "base"


def bits_to_tolerance(rows: list[dict], tolerance: float, x: str = "bits_up_per_worker") -> float | None:
    """The first `x` at which ||grad f||^2 <= tolerance; None if the run never got there."""
    for row in rows:
        g = row.get("grad_norm_sq")
        if g is not None and g <= tolerance:
            return float(row[x])
    return None


def sweep(
    base: dict[str, Any],
    axes: list[Axis],
    out: Path,
    tolerance: float,
    run: Callable[[config_mod.RunConfig, Path], list[dict]],
    on_run: Callable[[dict], None] | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Run every grid point with `run(config, out_dir) -> rows`; write table.json and return it.

    Every point's config is parsed and every folder claimed before the first run: a bad value or
    a folder that holds a run (unless `overwrite`) is refused with nothing run or written.
    """
    points = []
    for values in itertools.product(*(axis.values for axis in axes)):
        point = {axis.field: value for axis, value in zip(axes, values)}
        data = base
        for field, value in point.items():
            data = with_field(data, field, value)
        name = run_name(point)
        points.append((name, point, config_mod.parse(data, f"sweep point {name}")))
    if (out / TABLE).exists() and not overwrite:
        raise OutputError(f"{out} holds a sweep ({TABLE}): --overwrite replaces it, or give another --out")
    for name, _, _ in points:
        claim(out / name, overwrite=overwrite)
    table = []
    for name, point, config in points:
        entry: dict[str, Any] = {"run": name, **point}
        try:
            rows = run(config, out / name)
        except ArithmeticError as err:  # a diverging stepsize is a result, not a failure
            rows, entry["error"] = [], str(err)
        last = rows[-1] if rows else {}
        entry.update(
            rounds=len(rows),
            final_grad_norm_sq=last.get("grad_norm_sq"),
            bits_to_tolerance=bits_to_tolerance(rows, tolerance),
            value_bits_to_tolerance=bits_to_tolerance(rows, tolerance, "value_bits_up_per_worker"),
            diverged=bool(rows) and not all(
                r.get("grad_norm_sq") is None or math.isfinite(r["grad_norm_sq"]) for r in rows
            ),
        )
        table.append(entry)
        if on_run:
            on_run(entry)
    write_json_atomic(out / TABLE, {"tolerance": tolerance, "runs": table})
    return table
