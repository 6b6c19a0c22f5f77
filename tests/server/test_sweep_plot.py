"""threepc sweep and threepc plot, through the CLI as a user runs them."""

import json
from pathlib import Path

from tests.conftest import threepc, write_config


def test_sweep_runs_the_grid_and_tabulates_bits_to_tolerance(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "s.toml",
        'workers = 2\nrounds = 150\nmethod = "ef21"\ncompressor = "top_k"\n'
        '[data]\ndataset = "synthetic"\nrows = 200\ndim = 12\n',
    )
    out = tmp_path / "sweep"
    r = threepc("sweep", str(config), "-g", "compressor.k=1,12", "-g", "stepsize_multiplier=1,4", "-t", "1e-6",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    table = json.loads((out / "table.json").read_text())["runs"]
    assert [(e["compressor.k"], e["stepsize_multiplier"]) for e in table] == [(1, 1), (1, 4), (12, 1), (12, 4)]
    for entry in table:
        rows = [json.loads(line) for line in (out / entry["run"] / "metrics.jsonl").read_text().splitlines()]
        first = next((row for row in rows if row["grad_norm_sq"] <= 1e-6), None)
        assert entry["bits_to_tolerance"] == (first["bits_up_per_worker"] if first else None)
    assert any(e["bits_to_tolerance"] is not None for e in table)


def test_plot_draws_a_png(tmp_path: Path) -> None:
    config = write_config(tmp_path / "p.toml", '[data]\ndataset = "synthetic"\nrows = 100\ndim = 8\n')
    r = threepc("run", str(config), "--in-process", "--rounds", "20", "--out", str(tmp_path / "a"), "-q")
    assert r.returncode == 0, r.stderr
    fig = tmp_path / "fig.png"
    r = threepc("plot", str(tmp_path / "a" / "metrics.jsonl"), "--out", str(fig))
    assert r.returncode == 0, r.stderr
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000
