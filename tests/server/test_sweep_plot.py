"""threepc sweep and threepc plot, through the CLI as a user runs them."""

import json
from pathlib import Path

import pytest

from tests.conftest import read_rows, threepc, write_config
from threepc.server.plot import draw


def test_sweep_runs_the_grid_and_tabulates_bits_to_tolerance(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "s.toml",
        'workers = 2\nrounds = 150\nmethod = "ef21"\ncompressor = "top_k"\n'
        '[data]\ndataset = "synthetic"\nrows = 200\ndim = 12\n',
    )
    out = tmp_path / "sweep"
    r = threepc(
        "sweep",
        str(config),
        "-g",
        "compressor.k=1,12",
        "-g",
        "stepsize_multiplier=1,4",
        "-t",
        "1e-6",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    table = json.loads((out / "table.json").read_text())["runs"]
    assert [(e["compressor.k"], e["stepsize_multiplier"]) for e in table] == [
        (1, 1),
        (1, 4),
        (12, 1),
        (12, 4),
    ]
    for entry in table:
        rows = [
            json.loads(line)
            for line in (out / entry["run"] / "metrics.jsonl").read_text().splitlines()
        ]
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


@pytest.fixture(scope="module")
def distributed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real local clusters, top_k with k = 2 and k = 12: folder names sort 12 before 2."""
    tmp = tmp_path_factory.mktemp("plot")
    config = write_config(tmp / "p.toml", PLOT_CONFIG)
    r = threepc(
        "sweep",
        str(config),
        "--distributed",
        "-g",
        "compressor.k=2,12",
        "-t",
        "1e-6",
        "--out",
        str(tmp / "sweep"),
    )
    assert r.returncode == 0, r.stderr
    return tmp / "sweep"


PLOT_CONFIG = (
    'workers = 2\nrounds = 20\nmethod = "ef21"\ncompressor = "top_k"\n'
    '[data]\ndataset = "synthetic"\nrows = 100\ndim = 12\n'
)


def test_plot_of_wire_bytes_is_on_a_log_axis_labelled_by_method_and_compressor(
    distributed_sweep: Path,
) -> None:
    paths = sorted(distributed_sweep.glob("*/metrics.jsonl"))  # as a shell glob gives them
    assert [p.parent.name for p in paths] == ["compressor-k=12", "compressor-k=2"]
    fig, notes = draw(paths, "wire-bytes")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    xs = [float(v) for line in ax.get_lines() for v in line.get_xdata()]
    lo, hi = ax.get_xlim()
    # The data spans the axis: it starts near the first point, not at -1e4 on a symlog axis.
    assert min(xs) / 2 < lo <= min(xs) and max(xs) <= hi < 2 * max(xs)
    assert min(xs) == min(read_rows(p.parent)[0]["wire_bytes_up"] for p in paths)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["EF21 / top_k(k=2)", "EF21 / top_k(k=12)"]
    assert notes == []


def test_plot_writes_png_at_300_dpi_svg_and_pdf_and_refuses_other_suffixes(
    distributed_sweep: Path, tmp_path: Path
) -> None:
    from PIL import Image

    metrics = [str(p) for p in sorted(distributed_sweep.glob("*/metrics.jsonl"))]
    for name, head in [
        ("fig.png", b"\x89PNG\r\n\x1a\n"),
        ("fig.svg", b"<?xml"),
        ("fig.pdf", b"%PDF-"),
    ]:
        r = threepc("plot", *metrics, "--x", "wire-bytes", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / name).read_bytes().startswith(head), name
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()
    with Image.open(tmp_path / "fig.png") as image:
        assert [round(v) for v in image.info["dpi"]] == [300, 300]
        assert image.size == (2100, 1350)  # 7 x 4.5 inches
    r = threepc("plot", *metrics, "--out", str(tmp_path / "fig.jpeg"))
    assert r.returncode != 0 and not (tmp_path / "fig.jpeg").exists()
    assert r.stderr.strip().splitlines() == [
        f"threepc: error: --out {tmp_path / 'fig.jpeg'}: cannot write a .jpeg figure;"
        + " name it .png, .svg or .pdf"
    ]


def test_plot_labels_runs_that_differ_by_the_stepsize_multiplier(tmp_path: Path) -> None:
    config = write_config(tmp_path / "p.toml", PLOT_CONFIG)
    r = threepc(
        "sweep",
        str(config),
        "-g",
        "stepsize_multiplier=16,4,1",
        "-t",
        "1e-6",
        "--out",
        str(tmp_path / "sweep"),
    )
    assert r.returncode == 0, r.stderr
    fig, _ = draw(sorted((tmp_path / "sweep").glob("*/metrics.jsonl")))
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"  # bits per worker, as in the papers
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "EF21 / top_k, γ × 1",
        "EF21 / top_k, γ × 4",
        "EF21 / top_k, γ × 16",
    ]
    # An interrupted run has no summary.json yet: its folder's name labels it.
    (tmp_path / "sweep" / "stepsize_multiplier=4" / "summary.json").unlink()
    fig, _ = draw(sorted((tmp_path / "sweep").glob("*/metrics.jsonl")))
    assert "stepsize_multiplier=4" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_plot_leaves_out_points_a_log_axis_cannot_hold_and_says_so(
    distributed_sweep: Path, tmp_path: Path
) -> None:
    rows = read_rows(distributed_sweep / "compressor-k=2")
    rows[0]["wire_bytes_up"] = 0  # a file whose first row metered nothing
    rows[-1]["grad_norm_sq"] = float("inf")  # and whose last round diverged
    run = tmp_path / "zero"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "summary.json").write_bytes(
        (distributed_sweep / "compressor-k=2" / "summary.json").read_bytes()
    )
    fig, notes = draw([run / "metrics.jsonl"], "wire-bytes")
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [row["wire_bytes_up"] for row in rows[1:-1]]
    assert notes == [
        "EF21 / top_k(k=2): 2 round(s) left out, from round 0: wire_bytes_up or grad_norm_sq"
        + " at or below 0, or not finite, has no place on a log axis"
    ]
    r = threepc(
        "plot", str(run / "metrics.jsonl"), "--x", "wire-bytes", "--out", str(tmp_path / "f.png")
    )
    assert r.returncode == 0 and "note: EF21 / top_k(k=2): 2 round(s) left out" in r.stderr


def test_plot_of_wire_bytes_says_why_an_in_process_run_has_none(tmp_path: Path) -> None:
    config = write_config(tmp_path / "p.toml", PLOT_CONFIG)
    r = threepc("run", str(config), "--in-process", "--out", str(tmp_path / "a"), "-q")
    assert r.returncode == 0, r.stderr
    r = threepc(
        "plot",
        str(tmp_path / "a" / "metrics.jsonl"),
        "--x",
        "wire-bytes",
        "--out",
        str(tmp_path / "f.png"),
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "an in-process run sends nothing over the wire: draw it with --x bits" in r.stderr


def test_plot_says_where_the_figures_are_over_fewer_workers(
    distributed_sweep: Path, tmp_path: Path
) -> None:
    rows = read_rows(distributed_sweep / "compressor-k=2")
    for row in rows[5:]:
        row["diag_workers"] = 1  # as a run writes them once worker 1 is lost in round 5
    run = tmp_path / "lost"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "summary.json").write_bytes(
        (distributed_sweep / "compressor-k=2" / "summary.json").read_bytes()
    )
    _, notes = draw([run / "metrics.jsonl"])
    assert notes == [
        f"EF21 / top_k(k=2): grad_norm_sq over 1 of 2 workers from round 5 ({len(rows) - 5} rounds)"
    ]
