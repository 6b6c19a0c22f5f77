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

    # The same sweep again: refused in one line, nothing run or written; --overwrite replaces it.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = threepc("sweep", str(config), "-g", "compressor.k=1", "--out", str(out))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"threepc: error: {out} holds a sweep (table.json): --overwrite replaces it, or give another --out"
    ]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    r = threepc("sweep", str(config), "-g", "compressor.k=1", "-g", "stepsize_multiplier=1", "--out", str(out),
                "--overwrite", "--rounds", "5")
    assert r.returncode == 0, r.stderr
    assert [e["rounds"] for e in json.loads((out / "table.json").read_text())["runs"]] == [5]
    assert len((out / "compressor-k=1_stepsize_multiplier=1" / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_sweep_refuses_a_run_folder_that_holds_a_run_before_running_any(tmp_path: Path) -> None:
    config = write_config(tmp_path / "s.toml", 'workers = 2\nrounds = 5\n[data]\ndataset = "synthetic"\nrows = 50\ndim = 4\n')
    out = tmp_path / "sweep"
    (out / "seed=2").mkdir(parents=True)
    (out / "seed=2" / "metrics.jsonl").write_text('{"round": 0}\n')
    r = threepc("sweep", str(config), "-g", "seed=1,2", "--out", str(out))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"threepc: error: {out / 'seed=2'} holds a run (metrics.jsonl) and no checkpoint for --resume to continue from: "
        + "--overwrite replaces it, or give another --out"
    ]
    assert not (out / "seed=1" / "metrics.jsonl").exists()  # checked before the first run
    assert (out / "seed=2" / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_plot_draws_a_png(tmp_path: Path) -> None:
    config = write_config(tmp_path / "p.toml", '[data]\ndataset = "synthetic"\nrows = 100\ndim = 8\n')
    r = threepc("run", str(config), "--in-process", "--rounds", "20", "--out", str(tmp_path / "a"), "-q")
    assert r.returncode == 0, r.stderr
    fig = tmp_path / "fig.png"
    r = threepc("plot", str(tmp_path / "a" / "metrics.jsonl"), "--out", str(fig))
    assert r.returncode == 0, r.stderr
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000
