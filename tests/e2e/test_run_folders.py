"""A run's folder as users meet it through the CLI: a folder that holds a run is never overwritten
unless asked, a restarted `serve --auto-resume` continues its run, a full or unwritable disk is
one line and what was written stays resumable."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import read_rows, threepc, tiny_tmpfs, write_config
from tests.e2e.test_faults import free_port, spawn, wait_for_rows
from threepc.server import checkpoint

pytestmark = pytest.mark.e2e

SYNTHETIC = '[data]\ndataset = "synthetic"\nrows = 200\ndim = 10\n'


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.kill()
        p.wait()


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("threepc: error: "), r.stderr
    return lines[0]


def test_run_refuses_a_folder_that_holds_a_run_and_overwrite_replaces_it_only_when_it_starts(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", f'workers = 2\nrounds = 10\n{SYNTHETIC}')
    out = tmp_path / "out"
    assert threepc("run", str(config), "--in-process", "--out", str(out), "-q").returncode == 0
    before = files_of(out)
    assert sorted(before) == ["metrics.jsonl", "summary.json", "x_final.npy"]

    line = one_error_line(threepc("run", str(config), "--in-process", "--out", str(out), "-q", "--rounds", "4"))
    assert f"{out} holds a run (metrics.jsonl, summary.json, x_final.npy)" in line and "--overwrite" in line
    assert files_of(out) == before
    # --overwrite, but the new run fails before it starts (more workers than rows): the old run stays.
    line = one_error_line(threepc("run", str(config), "--in-process", "--out", str(out), "-q", "--overwrite",
                                  "--workers", "500"))
    assert "500 workers" in line and files_of(out) == before
    # A local cluster this time: its workers' logs and reports in out/workers are the new run's.
    r = threepc("run", str(config), "--out", str(out), "-q", "--no-dashboard", "--overwrite", "--rounds", "4")
    assert r.returncode == 0, r.stderr
    assert [row["round"] for row in read_rows(out)] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["mode"] == "distributed"
    assert all(w["meters_agree"] for w in summary["per_worker"])


def test_an_out_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", f'workers = 2\nrounds = 3\n{SYNTHETIC}')
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command in (["run", str(config), "--in-process", "-q"], ["serve", str(config), "--listen", "127.0.0.1:0", "-q"],
                    ["sweep", str(config), "-g", "seed=1,2"]):
        line = one_error_line(threepc(*command, "--out", str(a_file / "out")))
        assert line.startswith(f"threepc: error: --out {a_file / 'out'}") and "cannot write there" in line, line
    assert a_file.read_text() == "not a folder"
    with tiny_tmpfs(tmp_path / "ro", "64k") as read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
        line = one_error_line(threepc("run", str(config), "--in-process", "-q", "--out", str(read_only / "out")))
        assert line == f"threepc: error: --out {read_only / 'out'}: cannot write there (Read-only file system)"


def test_auto_resume_without_a_checkpoint(tmp_path: Path) -> None:
    """A finished run that wrote no checkpoint is refused (nothing to continue, everything to lose);
    rows of a run killed before its first checkpoint are started over (the same config writes
    the same rows)."""
    config = write_config(tmp_path / "c.toml", f'workers = 2\nrounds = 5\n{SYNTHETIC}')
    out = tmp_path / "out"
    assert threepc("run", str(config), "--in-process", "--out", str(out), "-q").returncode == 0
    finished = files_of(out)
    line = one_error_line(threepc("serve", str(config), "--out", str(out), "--listen", "127.0.0.1:0", "-q",
                                  "--auto-resume"))
    assert line == (f"threepc: error: {out} holds a run (metrics.jsonl, summary.json, x_final.npy) and no "
                    "checkpoint for --resume to continue from: --overwrite replaces it, or give another --out")
    assert files_of(out) == finished

    (out / "summary.json").unlink()
    (out / "x_final.npy").unlink()
    server = spawn("serve", str(config), "--out", str(out), "--listen", "127.0.0.1:0", "-q", "--no-dashboard",
                   env={"THREEPC_AUTO_RESUME": "1"}, log=tmp_path / "serve.log")  # as the deploy files set it
    try:
        deadline = time.monotonic() + 120
        while "coordinator listening" not in (tmp_path / "serve.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
    finally:
        stop(server)
    said = (tmp_path / "serve.log").read_text()
    assert f"{out} holds rows but no checkpoint; starting the run over (--auto-resume)" in said
    assert (out / "metrics.jsonl").read_text() == ""  # the new run's, waiting for its workers


def _serve_cluster(config: Path, out: Path, tmp_path: Path, tag: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = spawn("serve", str(config), "--listen", address, "--out", str(out), "-q", "--no-dashboard", *extra,
                   log=tmp_path / f"serve-{tag}.log")
    return server, address


def _workers(address: str, tmp_path: Path, n: int, *extra: str) -> list[subprocess.Popen]:
    return [spawn("worker", "-c", address, "--worker-id", str(i), "--reconnect-timeout", "90",
                  "--connect-timeout", "90", *extra, log=tmp_path / f"w{i}.log") for i in range(n)]


def test_serve_auto_resume_sigtermed_and_restarted_continues_to_the_uninterrupted_iterate(tmp_path: Path) -> None:
    text = ('workers = 2\nrounds = 40\nseed = 2\nmethod = "ef21"\ncheckpoint_every = 5\n'
            'compressor = {{ name = "top_k", k = {k} }}\n' + SYNTHETIC)
    config = write_config(tmp_path / "run.toml", text.format(k=2))
    out = tmp_path / "out"
    server, address = _serve_cluster(config, out, tmp_path, "1", "--auto-resume")  # a fresh folder: a new run
    workers = _workers(address, tmp_path, 2, "--throttle", "0.03")
    try:
        wait_for_rows(out, 12, server)
        server.send_signal(signal.SIGTERM)  # the pod is evicted
        assert server.wait(60) == 143
        stopped = files_of(out)
        saved = checkpoint.load(out)
        assert 12 <= saved.round < 40

        # Without --auto-resume or --resume, the interrupted run's folder is refused, untouched.
        line = one_error_line(threepc("serve", str(config), "--out", str(out), "--listen", "127.0.0.1:0", "-q"))
        assert f"--resume {out} continues it, --overwrite replaces it" in line
        assert files_of(out) == stopped
        # An edit that changes the math is refused naming the field; the folder is untouched.
        config.write_text(text.format(k=3))
        line = one_error_line(threepc("serve", str(config), "--out", str(out), "--listen", "127.0.0.1:0", "-q",
                                      "--auto-resume"))
        assert f"{config} differs from the run in {out} in compressor.k" in line
        assert files_of(out) == stopped
        # An edit that does not (the cadence of checkpoints) is taken; the same command line continues.
        config.write_text(text.format(k=2).replace("checkpoint_every = 5", "checkpoint_every = 7"))
        server = spawn("serve", str(config), "--listen", address, "--out", str(out), "-q", "--no-dashboard",
                       "--auto-resume", log=tmp_path / "serve-2.log")
        assert server.wait(120) == 0, (tmp_path / "serve-2.log").read_text()
        assert all(w.wait(60) == 0 for w in workers)
    finally:
        stop(server, *workers)
    assert f"from round {saved.round}" in (tmp_path / "serve-2.log").read_text()
    rows = read_rows(out)
    assert [r["round"] for r in rows] == list(range(40))  # the rows before the checkpoint kept, none twice
    reference = tmp_path / "reference"
    r = threepc("run", str(config), "--in-process", "--out", str(reference), "-q")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out / "x_final.npy"), np.load(reference / "x_final.npy"))
    assert [r["grad_norm_sq"] for r in rows] == [r["grad_norm_sq"] for r in read_rows(reference)]


def test_a_full_disk_is_one_line_and_what_was_written_resumes_to_the_uninterrupted_iterate(tmp_path: Path) -> None:
    # d = 2000, n = 2: a checkpoint is ~80 kB and two of them (the old and the new being written)
    # fill most of 200 kB, so the disk fills within the run's first hundred rounds.
    text = ('workers = 2\nrounds = 160\nseed = 5\nmethod = "ef21"\ncheckpoint_every = 4\ndiagnostics_every = 1\n'
            'compressor = { name = "top_k", k = 20 }\n[data]\ndataset = "synthetic"\nrows = 100\ndim = 2000\n')
    config = write_config(tmp_path / "run.toml", text)
    with tiny_tmpfs(tmp_path / "disk", "200k") as disk:
        out = disk / "out"
        server, address = _serve_cluster(config, out, tmp_path, "1")
        workers = _workers(address, tmp_path, 2)
        try:
            assert server.wait(240) == 1
        finally:
            stop(server, *workers)
        said = (tmp_path / "serve-1.log").read_text().strip().splitlines()
        assert len(said) == 2 and said[0].startswith("coordinator listening"), said  # and one line of error
        assert said[1].startswith(f"threepc: error: cannot write {out}/") and "No space left on device" in said[1]
        saved = checkpoint.load(out)  # the last checkpoint that was written whole
        assert 0 < saved.round < 160 and not (out / "checkpoint.npz.tmp").exists()
        kept, _ = checkpoint.resume_rows(out / "metrics.jsonl", saved.round)
        assert [r["round"] for r in kept] == list(range(saved.round))

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # room again
        server, address = _serve_cluster(config, out, tmp_path, "2", "--auto-resume")
        workers = _workers(address, tmp_path, 2)
        try:
            assert server.wait(240) == 0, (tmp_path / "serve-2.log").read_text()
        finally:
            stop(server, *workers)
        rows, x_final = read_rows(out), np.load(out / "x_final.npy")
    assert [r["round"] for r in rows] == list(range(160))
    reference = tmp_path / "reference"
    r = threepc("run", str(config), "--in-process", "--out", str(reference), "-q")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(x_final, np.load(reference / "x_final.npy"))
