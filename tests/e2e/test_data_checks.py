"""Missing or different data, as a user meets it: a run, a coordinator and workers as real
processes on loopback (issue 19, item 1: a worker without its data trained on made-up data, and
the run reported the real file)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import read_rows, threepc, write_config

pytestmark = pytest.mark.e2e


def libsvm(path: Path, rows: int, shift: int = 0) -> Path:
    """A small two-class LibSVM file, features 1..10 (read at a9a's width, d = 123)."""
    path.write_text("".join(f"{1 + i % 2} {1 + (i + shift) % 3}:1 {4 + (i * 7 + shift) % 7}:0.5\n" for i in range(rows)))
    return path


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("threepc: error: "), r.stderr
    return lines[0]


def test_a_run_whose_data_is_missing_stops_and_says_where_it_looked(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", f'workers = 2\nrounds = 3\n[data]\ndataset = "{tmp_path}/gone/a9a"\n')
    for mode in ([], ["--in-process"]):
        r = threepc("run", str(config), "--out", str(tmp_path / "o"), "-q", "--no-dashboard", *mode)
        line = one_error_line(r)
        assert line == (f"threepc: error: data set '{tmp_path}/gone/a9a' not found; looked for "
                        f"{tmp_path}/gone/a9a, {tmp_path}/gone/a9a.bz2")
        assert not (tmp_path / "o").exists()  # no run folder that looks like a run


def test_a_stand_in_asked_for_by_name_says_so_in_the_summary_the_progress_and_the_report(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        f'workers = 2\nrounds = 3\n[data]\ndataset = "{tmp_path}/gone/a9a"\nfallback = "synthetic"\n',
    )
    for mode in (["-q"], ["--in-process"]):  # the progress bar shows in the second
        out = tmp_path / mode[0].strip("-")
        r = threepc("run", str(config), "--out", str(out), "--no-dashboard", *mode, env={"COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert "data: a synthetic stand-in (synthetic(rows=32561, dim=123, seed=0)), not " in r.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["data"]["stand_in"] is True and summary["data"]["synthetic"] is True
        assert summary["data"]["source"] == "synthetic(rows=32561, dim=123, seed=0)"
        assert len(read_rows(out)) == 3
    assert "synthetic stand-in:  ||grad f||^2" in r.stdout  # the progress line (rich draws on stdout)
    # The local cluster's workers fell back to the very same stand-in, and said so at join.
    workers = json.loads((tmp_path / "q" / "summary.json").read_text())["per_worker"]
    assert [w["data"]["synthetic"] for w in workers] == [True, True]
    assert [w["data"]["shard_hash"] for w in workers] == summary["data"]["shard_hashes"]
    assert all(w["data"]["matches_coordinator"] for w in workers)
    # A sweep's runs say it too, each in its summary and in a line as it starts.
    r = threepc("sweep", str(config), "-g", "stepsize_multiplier=1", "--out", str(tmp_path / "sweep"))
    assert r.returncode == 0, r.stderr
    assert "stepsize_multiplier=1: data is a synthetic stand-in (synthetic(rows=32561, dim=123, seed=0))" in r.stderr
    run = json.loads((tmp_path / "sweep" / "stepsize_multiplier=1" / "summary.json").read_text())
    assert run["data"]["stand_in"] is True


def test_a_coordinator_never_trains_on_a_stand_in(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        f'workers = 1\nrounds = 3\n[data]\ndataset = "{tmp_path}/gone/a9a"\nfallback = "synthetic"\n',
    )
    r = threepc("serve", str(config), "--listen", "127.0.0.1:0", "--out", str(tmp_path / "o"), "-q", "--no-dashboard")
    line = one_error_line(r)
    assert f"data set '{tmp_path}/gone/a9a' not found; looked for {tmp_path}/gone/a9a, " in line
    assert line.endswith("a coordinator never uses a stand-in)")


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`threepc serve` of one worker on a9a-named data of 40 rows (d = 123), on a port of its own."""
    data = libsvm(tmp_path / "a9a", 40)
    config = write_config(tmp_path / "c.toml", f'workers = 1\nrounds = 4\n[data]\ndataset = "{data}"\ndim = 123\n')
    server = subprocess.Popen(
        [sys.executable, "-m", "threepc.server.cli", "serve", str(config), "--listen", "127.0.0.1:0",
         "--out", str(tmp_path / "o"), "-q", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stderr is not None
        first = server.stderr.readline()
        port = re.search(r"listening on port (\d+)", first)
        assert port, first
        yield f"127.0.0.1:{port.group(1)}", server
    finally:
        server.kill()
        server.wait()


def test_a_workers_data_is_checked_when_it_joins(tmp_path: Path, coordinator: tuple[str, subprocess.Popen]) -> None:
    address, server = coordinator
    # Its data is missing: it says where it looked, and trains on nothing (it had a stand-in).
    r = threepc("worker", "--coordinator", address, "--data", str(tmp_path / "gone" / "a9a"), timeout=120)
    assert one_error_line(r) == (f"threepc: error: data set '{tmp_path}/gone/a9a' not found; looked for "
                                 f"{tmp_path}/gone/a9a, {tmp_path}/gone/a9a.bz2")
    # Synthetic data of the run's d, in a run on a file: refused, in one line at both ends.
    r = threepc("worker", "--coordinator", address, "--data", "synthetic", timeout=120)
    refusal = "worker 0 has synthetic data (synthetic(rows=1000, dim=123, seed=0)), the run's data is the file "
    assert one_error_line(r).startswith(f"threepc: error: coordinator refused: MismatchError: {refusal}")
    # Other rows of the same d: they train, and the run's summary and report say so.
    other = libsvm(tmp_path / "other.svm", 40, shift=1)
    r = threepc("worker", "--coordinator", address, "--data", str(other), timeout=120)
    assert r.returncode == 0, r.stderr
    stdout, stderr = server.communicate(timeout=120)
    assert server.returncode == 0, stderr
    assert f"worker 0 refused: {refusal}" in stderr
    assert "data: the shards of workers [0] differ from the coordinator's" in stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    (worker,) = summary["per_worker"]
    assert worker["data"]["source"] == str(other) and worker["data"]["synthetic"] is False
    assert worker["data"]["matches_coordinator"] is False
    assert worker["data"]["shard_hash"] != summary["data"]["shard_hashes"][0]
    assert (worker["data"]["rows"], worker["data"]["dimension"]) == (40, 123)


def test_breast_cancer_trains_by_name_with_no_file(tmp_path: Path) -> None:
    """`dataset = "breast_cancer"` is scikit-learn's copy (no data folder, no download), and the
    summary says so."""
    config = write_config(
        tmp_path / "bc.toml",
        """
workers = 4
rounds = 30
x0 = "zeros"
[compressor]
name = "top_k"
k = 3
[data]
dataset = "breast_cancer"
data_dir = "/nonexistent"
""",
    )
    out = tmp_path / "out"
    r = threepc("run", str(config), "--out", str(out), "--in-process", "-q", env={"THREEPC_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert len(rows) == 30 and rows[-1]["grad_norm_sq"] < rows[0]["grad_norm_sq"] / 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["dim"] == 30
    assert summary["plan"]["data"].startswith("sklearn.datasets.load_breast_cancer (scikit-learn ")
