"""The papers' figure from metrics files: ||grad f||^2 against bits per worker, log scale."""

from __future__ import annotations

import json
from pathlib import Path

from threepc.common.errors import ConfigError

X_AXES = {
    "bits": ("bits_up_per_worker", "bits sent per worker (payload, indices included)"),
    "value-bits": ("value_bits_up_per_worker", "bits sent per worker (values only, the papers' convention)"),
    "wire-bytes": ("wire_bytes_up", "bytes up the wire, all workers (gRPC frames included)"),
    "rounds": ("round", "round"),
}


def label_of(path: Path) -> str:
    """A run's label: its folder name (runs/NAME/metrics.jsonl)."""
    return path.parent.name if path.name == "metrics.jsonl" else path.stem


def plot(paths: list[Path], out: Path, x: str = "bits", y: str = "grad_norm_sq") -> Path:
    """Draw one line per metrics file and save to `out` (PNG or SVG by its suffix)."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'threepc[plot]'") from None
    key, xlabel = X_AXES[x]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for path in paths:
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read metrics file {path}: {err}") from None
        points = [(r[key], r[y]) for r in rows if r.get(key) is not None and r.get(y) is not None]
        if not points:
            raise ConfigError(f"{path}: no rows with both {key} and {y}")
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label_of(path), linewidth=1.5)
    ax.set_yscale("log")
    if x != "rounds":
        ax.set_xscale("symlog" if x == "wire-bytes" else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$" if y == "grad_norm_sq" else y)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
