"""The papers' figure from metrics files: ||grad f||^2 against bits per worker, log scale.

Each line is labelled from the summary.json beside its metrics.jsonl (method / compressor, and
whatever else differs between the runs drawn, such as the stepsize multiplier), not from its
folder's name; lines are ordered by those labels, numbers compared as numbers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from threepc.common.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Axis:
    key: str  # the row's field
    label: str
    log: bool  # a log axis: points at or below 0 are left out, and said so


X_AXES = {
    "bits": Axis("bits_up_per_worker", "bits sent per worker (payload, indices included)", False),
    "value-bits": Axis(
        "value_bits_up_per_worker",
        "bits sent per worker (values only, the papers' convention)",
        False,
    ),
    # Bytes grow by orders of magnitude over a run (the first rounds carry the dense start).
    "wire-bytes": Axis(
        "wire_bytes_up", "bytes up the wire, all workers (gRPC frames included)", True
    ),
    "rounds": Axis("round", "round", False),
}
FORMATS = (".png", ".svg", ".pdf")
PNG_DPI = 300

# Method names as the papers write them; the rest are upper-cased (ef21 -> EF21).
METHOD_NAMES = {
    "ef21_plus": "EF21+",
    "naive": "naive",
    "3pcv1": "3PCv1",
    "3pcv2": "3PCv2",
    "3pcv3": "3PCv3",
    "3pcv4": "3PCv4",
    "3pcv5": "3PCv5",
}


@dataclass(frozen=True)
class Run:
    """One metrics file and the config of its run (None: no readable summary.json beside it)."""

    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] | None


def label_of(path: Path) -> str:
    """A run's folder name (runs/NAME/metrics.jsonl): the label when its summary is missing."""
    return path.parent.name if path.name == "metrics.jsonl" else path.stem


def describe(component: dict[str, Any]) -> str:
    """`{"name": "top_k", "k": 6}` -> "top_k(k=6)" (nested components alike)."""
    params = [
        f"{k}={describe(v) if isinstance(v, dict) and 'name' in v else v}"
        for k, v in component.items()
        if k != "name"
    ]
    return f"{component['name']}({', '.join(params)})" if params else str(component["name"])


def _method(component: dict[str, Any]) -> str:
    name = str(component["name"])
    return describe({**component, "name": METHOD_NAMES.get(name, name.upper())})


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("method", "compressor"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(key: str, value: Any) -> str:
    if key == "stepsize_multiplier":
        return f"γ × {value:g}" if isinstance(value, int | float) else f"γ × {value}"
    return f"{key}={describe(value) if isinstance(value, dict) else value}"


def labels(runs: list[Run]) -> list[str]:
    """Each run's label: "METHOD / compressor(params)", then every config field in which the
    runs differ; a run without a summary keeps its folder's name, labels still alike get it."""
    flat = [_flat(run.config) if run.config is not None else None for run in runs]
    known = [f for f in flat if f is not None]
    keys = sorted({k for f in known for k in f})
    differ = [
        k
        for k in keys
        if k not in ("method", "compressor")
        and len({json.dumps(f.get(k), sort_keys=True) for f in known}) > 1
    ]
    out = []
    for run, f in zip(runs, flat):
        if f is None:
            out.append(label_of(run.path))
            continue
        text = f"{_method(f['method'])} / {describe(f['compressor'])}"
        extra = [_shown(k, f.get(k)) for k in differ]
        out.append(", ".join([text, *extra]))
    return [
        f"{text} ({label_of(run.path)})" if out.count(text) > 1 else text
        for text, run in zip(out, runs)
    ]


def natural_key(text: str) -> list[tuple[int, float | str]]:
    """Sort key in which numbers compare as numbers: k=6 before k=12, γ × 4 before γ × 16."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return [(1, float(p)) if i % 2 else (0, p) for i, p in enumerate(parts)]


def read_run(path: Path) -> Run:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read metrics file {path}: {err}") from None
    config = None
    summary = path.parent / "summary.json"
    try:
        config = json.loads(summary.read_text()).get("config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass  # an interrupted run has none yet: its folder's name labels it
    if not (isinstance(config, dict) and {"method", "compressor"} <= config.keys()):
        config = None
    return Run(path, rows, config)


def draw(paths: list[Path], x: str = "bits", y: str = "grad_norm_sq") -> tuple[Figure, list[str]]:
    """One line per metrics file; returns the figure and notes for the user (points left out,
    figures over fewer workers than the run had)."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'threepc[plot]'") from None
    axis = X_AXES[x]
    runs = [read_run(path) for path in paths]
    names = labels(runs)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    notes: list[str] = []
    for name, run in sorted(zip(names, runs), key=lambda pair: natural_key(pair[0])):
        rows = [r for r in run.rows if r.get(axis.key) is not None and r.get(y) is not None]
        if not rows:
            why = (
                " (an in-process run sends nothing over the wire: draw it with --x bits)"
                if axis.key.startswith("wire_")
                and run.rows
                and all(r.get(axis.key) is None for r in run.rows)
                else ""
            )
            raise ConfigError(f"{run.path}: no rows with both {axis.key} and {y}{why}")
        # Log axes have no place for 0 or less (nor a diverged run's inf or NaN): such points
        # are left out, and the user told.
        kept = [
            r for r in rows if (not axis.log or 0 < r[axis.key] < math.inf) and 0 < r[y] < math.inf
        ]
        if len(kept) < len(rows):
            dropped = sorted({r["round"] for r in rows} - {r["round"] for r in kept})
            where = f"{axis.key} or {y}" if axis.log else y
            notes.append(
                f"{name}: {len(dropped)} round(s) left out, from round {dropped[0]}: "
                f"{where} at or below 0, or not finite, has no place on a log axis"
            )
        if not kept:
            raise ConfigError(f"{run.path}: no rows with finite {axis.key} and {y} above 0 to draw")
        n = (run.config or {}).get("workers")
        fewer = [r for r in kept if n and 0 < (r.get("diag_workers") or n) < n]
        if fewer and y in ("grad_norm_sq", "loss"):
            notes.append(
                f"{name}: {y} over {fewer[0]['diag_workers']} of {n} workers from round "
                f"{fewer[0]['round']} ({len(fewer)} rounds)"
            )
        ax.plot([r[axis.key] for r in kept], [r[y] for r in kept], label=name, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xscale("log" if axis.log else "linear")
    ax.set_xlabel(axis.label)
    ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$" if y == "grad_norm_sq" else y)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, notes


def plot(
    paths: list[Path], out: Path, x: str = "bits", y: str = "grad_norm_sq"
) -> tuple[Path, list[str]]:
    """Draw and save to `out` (.png at 300 dpi, .svg or .pdf, by its suffix); returns the
    path and draw()'s notes."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"--out {out}: cannot write a {suffix or 'suffix-less'} figure; "
            f"name it .png, .svg or .pdf"
        )
    fig, notes = draw(paths, x, y)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=PNG_DPI, format=suffix[1:])
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write the figure: {err.strerror or err}") from None
    return out, notes
