"""`threepc run` as a user runs it: real worker processes over gRPC on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, figures, read_rows, threepc, write_config

pytestmark = pytest.mark.e2e


def run_both(config: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    dist, local = tmp_path / "dist", tmp_path / "inproc"
    r = threepc("run", str(config), "--out", str(dist), "-q", *extra)
    assert r.returncode == 0, r.stderr
    r = threepc("run", str(config), "--out", str(local), "--in-process", "-q", *extra)
    assert r.returncode == 0, r.stderr
    return dist, local


def test_distributed_run_equals_in_process_and_both_meters_agree(small_config: Path, tmp_path: Path) -> None:
    dist, local = run_both(small_config, tmp_path)
    d_rows, l_rows = read_rows(dist), read_rows(local)
    assert len(d_rows) == len(l_rows) == 40
    for a, b in zip(d_rows, l_rows):
        assert a["round"] == b["round"]
        assert figures([a]) == [b["grad_norm_sq"]]
        assert a["bits_up_per_worker"] == b["bits_up_per_worker"]
    assert np.array_equal(np.load(dist / "x_final.npy"), np.load(local / "x_final.npy"))

    summary = json.loads((dist / "summary.json").read_text())
    workers = summary["per_worker"]
    assert len(workers) == 3
    for w in workers:
        # The worker's own count, mirrored, equals the coordinator's count of that stream.
        mine, theirs = w["meter"], w["worker_meter"]
        assert mine["received_bytes"] == theirs["sent_bytes"]
        assert mine["sent_bytes"] == theirs["received_bytes"]
        assert mine["messages_received"] == theirs["messages_sent"]
        assert w["meters_agree"] is True
        # 40 updates + 40 diagnostics + join + ready; 40 rounds + welcome + done.
        assert theirs["messages_sent"] == 82 and theirs["messages_received"] == 42
    last = d_rows[-1]
    assert last["wire_bytes_up"] == sum(w["worker_meter"]["sent_bytes"]["round"] for w in workers)
    assert last["wire_bytes_down"] == sum(w["worker_meter"]["received_bytes"]["round"] for w in workers)
    # Diagnostics are metered apart: never in the method's bytes.
    assert last["diag_bytes_up"] == sum(w["worker_meter"]["sent_bytes"]["diagnostics"] for w in workers)


def test_3pcv5_with_a_shared_coin_over_grpc_equals_in_process(tmp_path: Path) -> None:
    """The shared coin comes from the round's shared seed, which each worker process derives
    alike: the distributed run is the in-process one, bit for bit."""
    text = """
workers = 3
rounds = 25
seed = 3
method = { name = "3pcv5", p = 0.3, shared_coin = true }
[compressor]
name = "top_k"
k = 2
[data]
dataset = "synthetic"
rows = 150
dim = 20
"""
    dist, local = run_both(write_config(tmp_path / "v5.toml", text), tmp_path)
    d_rows, l_rows = read_rows(dist), read_rows(local)
    assert len(d_rows) == len(l_rows) == 25
    assert figures(d_rows) == [r["grad_norm_sq"] for r in l_rows]
    assert [r["bits_up_per_worker"] for r in d_rows] == [r["bits_up_per_worker"] for r in l_rows]
    x_shared = np.load(dist / "x_final.npy")
    assert np.array_equal(x_shared, np.load(local / "x_final.npy"))
    # ... and the key is not ignored: a coin per worker is another run.
    own = tmp_path / "own"
    config = write_config(tmp_path / "v5_own.toml", text.replace(", shared_coin = true", ""))
    r = threepc("run", str(config), "--out", str(own), "--in-process", "-q")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(x_shared, np.load(own / "x_final.npy"))


def test_messages_larger_than_a_chunk_travel_in_chunks(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "gd.toml",
        """
workers = 2
rounds = 5
method = "gd"
[compressor]
name = "identity"
[data]
dataset = "synthetic"
rows = 100
dim = 3000
[wire]
chunk_bytes = 4096
""",
    )
    dist, local = run_both(config, tmp_path)
    assert figures(read_rows(dist)) == [r["grad_norm_sq"] for r in read_rows(local)]
    summary = json.loads((dist / "summary.json").read_text())
    # 3000 float64 = 24 kB per broadcast: at least 6 chunks per round, each a gRPC message.
    assert summary["per_worker"][0]["meter"]["messages_sent"] >= 5 * 6
    assert all(w["meters_agree"] for w in summary["per_worker"])


@pytest.mark.skipif(not (SHARED_DATA / "a9a.bz2").exists(), reason="a9a.bz2 not in shared/data")
def test_the_demo_config_drops_the_gradient_100x(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = threepc("run", "examples/ef21_a9a.toml", "--out", str(out), "-q", "--rounds", "400")
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert rows[-1]["grad_norm_sq"] < rows[0]["grad_norm_sq"] / 100
    assert "meters agree" in r.stdout


def test_unknown_config_field_is_one_clear_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.toml", "wrokers = 3\n")
    r = threepc("run", str(config), "--out", str(tmp_path / "o"), "-q")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"threepc: error: {config}: wrokers: unknown field"]


def test_more_workers_than_rows_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", '[data]\ndataset = "synthetic"\nrows = 3\ndim = 4\n')
    r = threepc("run", str(config), "--workers", "5", "--out", str(tmp_path / "o"), "-q")
    assert r.returncode == 1
    assert "5 workers but only 3 data rows" in r.stderr


def test_worker_with_nobody_listening_retries_then_says_so() -> None:
    r = threepc("worker", "--coordinator", "127.0.0.1:9", "--connect-timeout", "1.5", timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "threepc: error: no coordinator answered at 127.0.0.1:9 within 1.5 s"


def test_worker_with_the_wrong_dimension_is_refused(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    run_data = tmp_path / "run.svm"
    run_data.write_text("".join(f"{1 + i % 2} 1:1 {2 + i % 9}:1\n" for i in range(20)))  # d = 10
    other = tmp_path / "other.svm"
    other.write_text("".join(f"{1 + i % 2} 1:1 {20 + i}:1\n" for i in range(20)))  # d = 39
    config = write_config(tmp_path / "c.toml", f'workers = 1\nrounds = 3\n[data]\ndataset = "{run_data}"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "threepc.server.cli", "serve", str(config), "--listen", f"127.0.0.1:{port}",
         "--out", str(tmp_path / "o"), "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        r = threepc("worker", "--coordinator", f"127.0.0.1:{port}", "--data", str(other), timeout=60)
        assert r.returncode == 1
        assert "dimension 39, the run's is 10" in r.stderr.strip().splitlines()[-1]
        # The slot stays free: a worker with the right data can still join and finish the run.
        ok = threepc("worker", "--coordinator", f"127.0.0.1:{port}", timeout=60)
        assert ok.returncode == 0, ok.stderr
        _, stderr = server.communicate(timeout=60)
        assert server.returncode == 0
        # The coordinator says it too, in one line of its own.
        refusals = [line for line in stderr.splitlines() if "refused" in line]
        assert len(refusals) == 1 and refusals[0].endswith("worker 0 refused: worker 0 has dimension 39, the run's is 10")
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize(
    "method",
    [
        'method = { name = "clag", zeta = 2.0 }',  # skips travel as a flag
        'method = "marina"\ncompressor = { name = "rand_k", k = 4 }',  # shared coin, seeded indices
        'method = { name = "3pcv2", q = { name = "rand_k", k = 4 } }\ncompressor = { name = "top_k", k = 2 }',
        'method = { name = "marina", iscc = true, p = 0.2 }\nstepsize = 0.5\ncompressor = { name = "rand_k", k = 4 }',
        # float32 state: h, the mirrors and x in float32, values rounded once into them
        (
            'method = { name = "3pcv2", q = { name = "qsgd", s = 4 } }\ncompressor = { name = "top_k", k = 2 }\n'
            'wire = { iterate_dtype = "float32" }'
        ),
    ],
    ids=["clag", "marina", "3pcv2", "marina-iscc", "3pcv2-float32"],
)
def test_other_methods_are_identical_over_the_wire(method: str, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "m.toml",
        f'workers = 2\nrounds = 25\n{method}\n[data]\ndataset = "synthetic"\nrows = 200\ndim = 16\n',
    )
    dist, local = run_both(config, tmp_path)
    assert read_rows(dist) and figures(read_rows(dist)) == [r["grad_norm_sq"] for r in read_rows(local)]
    assert [(r["bits_up_per_worker"], r["skips"]) for r in read_rows(dist)] == [
        (r["bits_up_per_worker"], r["skips"]) for r in read_rows(local)
    ]
    assert np.array_equal(np.load(dist / "x_final.npy"), np.load(local / "x_final.npy"))


def test_delta_downlink_sends_fewer_bytes_and_the_same_iterates(tmp_path: Path) -> None:
    base = "workers = 3\nrounds = 30\nseed = 7\n[compressor]\nname = \"top_k\"\nk = 3\n" \
           "[data]\ndataset = \"synthetic\"\nrows = 600\ndim = 400\n"
    outs = {}
    for downlink in ("delta", "dense"):
        config = write_config(tmp_path / f"{downlink}.toml", base + f'[wire]\ndownlink = "{downlink}"\n')
        outs[downlink] = tmp_path / downlink
        r = threepc("run", str(config), "--out", str(outs[downlink]), "-q", "--no-dashboard")
        assert r.returncode == 0, r.stderr
    delta, dense = read_rows(outs["delta"]), read_rows(outs["dense"])
    assert figures(delta) == [r["grad_norm_sq"] for r in dense]
    assert np.array_equal(np.load(outs["delta"] / "x_final.npy"), np.load(outs["dense"] / "x_final.npy"))
    assert delta[-1]["wire_bytes_up"] == dense[-1]["wire_bytes_up"]
    # Round 0 is dense (x and g_sum); later rounds carry at most n k = 9 changed coordinates.
    assert delta[-1]["wire_bytes_down"] < dense[-1]["wire_bytes_down"] / 4
    summary = json.loads((outs["delta"] / "summary.json").read_text())
    assert all(w["meters_agree"] for w in summary["per_worker"])


@pytest.mark.parametrize(("every", "figured"), [(4, [0, 4, 8, 9]), (0, [])])
def test_the_last_round_has_figures_whatever_the_cadence(tmp_path: Path, every: int, figured: list[int]) -> None:
    """Figures every `diagnostics_every` rounds and at the last one, so the final row and the
    summary are never blank (0: none at all); both transports expect the same rounds."""
    config = write_config(
        tmp_path / "cadence.toml",
        f'workers = 2\nrounds = 10\nmethod = "ef21"\ndiagnostics_every = {every}\n'
        '[compressor]\nname = "top_k"\nk = 2\n[data]\ndataset = "synthetic"\nrows = 60\ndim = 12\n',
    )
    dist, local = run_both(config, tmp_path)
    for out in (dist, local):
        rows = read_rows(out)
        assert [r["round"] for r in rows if r["grad_norm_sq"] is not None] == figured
        final = json.loads((out / "summary.json").read_text())["final"]
        assert (final["grad_norm_sq"] is not None) == bool(figured)
    assert figures(read_rows(dist)) == figures(read_rows(local))
