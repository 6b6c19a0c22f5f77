"""Worker and coordinator faults: stragglers, dead workers, rejoins, SIGTERM and --resume.

Two kinds of test: real gRPC in this process (a Coordinator and `run_worker` tasks on loopback:
exact control of timing, a few seconds each), and real processes through the CLI as a user runs
them. Each checks the run's final iterate against `reference_x`: the in-process engine replaying
the rounds with the same workers absent and the same restores from the mirror. So "the aggregate
stays correct" and "the worker's state stays consistent with the mirror" are checked bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import read_rows, threepc, write_config
from threepc.common import config as config_mod
from threepc.common.engine import (
    Aggregator,
    Plan,
    WorkerNode,
    load_data,
    load_shard,
    local_problem,
    plan,
    run_in_process,
)
from threepc.server.coordinator import Coordinator, start_server
from threepc.worker.client import WorkerOptions, run_worker

pytestmark = pytest.mark.e2e

SYNTHETIC = '[data]\ndataset = "synthetic"\nrows = 200\ndim = 10\n'


# ---------------------------------------------------------------------- helpers


def make_plan(text: str) -> Plan:
    import tomllib

    return plan(config_mod.parse(tomllib.loads(text)))


def reference_x(the_plan: Plan, rows: list[dict[str, Any]]) -> np.ndarray:
    """x after `rows`, replayed in process: each row's absent workers skipped, and a worker that
    missed a round restored from the mirror (WorkerNode.restore) before its next one."""
    config = the_plan.resolved
    full = load_data(config)
    nodes = [WorkerNode(config, i, local_problem(config, load_shard(config, i, full), i)) for i in range(config.workers)]
    agg = Aggregator(the_plan)
    synced = [0] * config.workers
    for row in rows:
        t = row["round"]
        assert t == agg.t
        absent = set(row["absent_workers"])
        for node in nodes:
            i = node.worker_id
            if i in absent:
                continue
            if synced[i] != t:
                if agg.meters[i].messages == 0 or agg.x_prev is None:
                    node.state = None
                else:
                    node.restore(agg.mirrors[i], agg.x_prev)
            message, diagnostics = node.round(t, agg.x)
            agg.apply(i, message, diagnostics)
            synced[i] = t + 1
        agg.finish_round(sorted(absent))
    return agg.x


@contextlib.asynccontextmanager
async def on_loopback(the_plan: Plan, **kwargs: Any) -> AsyncIterator[tuple[Coordinator, str]]:
    """A Coordinator served on a loopback port; yields it and its address."""
    credentials = kwargs.pop("credentials", None)
    host = kwargs.pop("host", "127.0.0.1")
    coordinator = Coordinator(the_plan, **kwargs)
    server, port = await start_server(coordinator, "127.0.0.1:0", credentials=credentials)
    try:
        yield coordinator, f"{host}:{port}"
    finally:
        await server.stop(0.5)


def worker(address: str, worker_id: int, **kwargs: Any) -> WorkerOptions:
    kwargs.setdefault("connect_timeout_s", 30.0)
    kwargs.setdefault("reconnect_timeout_s", 30.0)
    return WorkerOptions(address, worker_id, **kwargs)


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_rows(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"fewer than {count} rows after {timeout} s"
        time.sleep(0.02)


def spawn(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    with open(log or os.devnull, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "threepc.server.cli", *args],
            stdout=out, stderr=out, env={**os.environ, **(env or {})},
        )


# ---------------------------------------------------------------------- stragglers (in process)


def test_a_straggler_does_not_stall_the_round_and_is_resynced_from_the_mirror() -> None:
    the_plan = make_plan(
        f'workers = 2\nrounds = 9\nseed = 3\nmethod = "ef21"\nround_timeout_s = 0.5\n'
        f'compressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC}'
    )

    async def main() -> tuple[Coordinator, list[dict], float]:
        async with on_loopback(the_plan) as (c, address):
            started = time.monotonic()
            _, _, slow = await asyncio.gather(
                c.run(),
                run_worker(worker(address, 0)),
                run_worker(worker(address, 1, throttle_s=1.2, throttle_rounds=frozenset({3}))),
            )
            return c, slow, time.monotonic() - started

    c, slow, elapsed = asyncio.run(main())
    rows = c.rows
    assert [r["round"] for r in rows] == list(range(9))
    # Round 3 closed at its deadline without the straggler; it was named, and its stale update refused.
    assert rows[3]["late_workers"] == [1] and rows[3]["absent_workers"] == [1]
    assert all(r["late_workers"] == [] for r in rows[:3])
    assert rows[-1]["late_workers"] == [] and rows[-1]["absent_workers"] == []
    assert c.late[1] >= 1 and c.late[0] == 0
    assert c.agg.meters[1].absent == sum(1 in r["absent_workers"] for r in rows) >= 1
    assert slow["restores"] >= 1  # it got its state back from the mirror before rejoining the rounds
    assert elapsed < 1.2 * 9  # a slow worker costs a deadline, not its own delay, per round
    # Its state stayed consistent with the mirror: the run equals the replay bit for bit.
    assert np.array_equal(c.agg.x, reference_x(the_plan, rows))


@pytest.mark.parametrize(("read_ahead", "read_early"), [(None, {1, 2, 3}), (2, {1})])
def test_updates_are_applied_in_worker_id_order_and_read_ahead_bounds_those_read(
    read_ahead: int | None, read_early: set[int]
) -> None:
    """Worker 0 answers last every round. By default 1-3 are read and wait for it; under
    read_ahead = 2 only worker 1's is read, 2 and 3 wait at their workers (flow control).
    Either way the sum is the in-process one, bit for bit."""
    the_plan = make_plan(
        f'workers = 4\nrounds = 8\nseed = 4\nmethod = "gd"\ncompressor = "identity"\n{SYNTHETIC}'
        '[wire]\niterate_dtype = "float64"\nvalue_dtype = "float64"\n'  # another order would round differently
        + (f"read_ahead = {read_ahead}\n" if read_ahead else "")
    )
    seen: set[int] = set()  # ids whose update was in hand while worker 0's was awaited

    async def main() -> Coordinator:
        async with on_loopback(the_plan) as (c, address):
            async def watch() -> None:
                while not c.finished.is_set():
                    if c._collecting is not None and c._cursor == 0:
                        seen.update(c._held)
                    await asyncio.sleep(0.002)

            await asyncio.gather(
                c.run(), watch(),
                run_worker(worker(address, 0, throttle_s=0.05)),
                *(run_worker(worker(address, i)) for i in range(1, 4)),
            )
            return c

    c = asyncio.run(main())
    assert seen == read_early
    assert all(r["absent_workers"] == [] for r in c.rows)
    assert np.array_equal(c.agg.x, reference_x(the_plan, c.rows))
    # The figures too: worker 0's diagnostics come last but are summed first, as in process.
    in_process = run_in_process(the_plan).rows
    for key in ("grad_norm_sq", "loss"):
        assert [r[key] for r in c.rows] == [r[key] for r in in_process]
    assert all(r["diag_workers"] == 4 for r in c.rows)


def test_a_straggler_before_unread_updates_is_passed_and_they_are_read() -> None:
    """read_ahead = 1 and worker 0 late in round 3: at the deadline the order goes past it and
    reads 1-3, whose updates waited at their workers; only worker 0 is absent."""
    the_plan = make_plan(
        f'workers = 4\nrounds = 6\nseed = 8\nmethod = "ef21"\nround_timeout_s = 0.4\n'
        f'compressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC}[wire]\nread_ahead = 1\n'
    )

    async def main() -> Coordinator:
        async with on_loopback(the_plan) as (c, address):
            await asyncio.gather(
                c.run(),
                run_worker(worker(address, 0, throttle_s=1.0, throttle_rounds=frozenset({3}))),
                *(run_worker(worker(address, i)) for i in range(1, 4)),
            )
            return c

    c = asyncio.run(main())
    assert [r["absent_workers"] for r in c.rows[:4]] == [[], [], [], [0]]
    assert all(r["absent_workers"] in ([], [0]) for r in c.rows)  # 1-3 were read every round
    assert c.rows[3]["late_workers"] == [0] and c.late[0] >= 1
    assert np.array_equal(c.agg.x, reference_x(the_plan, c.rows))


@pytest.mark.parametrize("applied", [True, False])
def test_sigterm_mid_round_finishes_it_or_abandons_it_whole(applied: bool) -> None:
    """Stop asked while round 3 is open: with worker 0's update applied the round finishes (its
    state cannot be taken back); with nothing applied it is abandoned. Either way the state is
    that of a round boundary, equal to the replay."""
    from threepc.server.checkpoint import Stopped

    the_plan = make_plan(
        f'workers = 2\nrounds = 20\nseed = 6\nmethod = "ef21"\n'
        f'compressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC}'
    )
    slow = 1 if applied else 0  # the worker whose round-3 update comes 0.5 s late

    async def main() -> Coordinator:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            workers = [
                asyncio.ensure_future(run_worker(worker(
                    address, i, reconnect_timeout_s=0.5,
                    **({"throttle_s": 0.5, "throttle_rounds": frozenset({3})} if i == slow else {}),
                )))
                for i in range(2)
            ]
            await wait_until(lambda: c._collecting == 3 and (c._applied == [0] or not applied and 1 in c._held))
            c.request_stop()
            with pytest.raises(Stopped) as stopped:
                await run
            assert stopped.value.round == (4 if applied else 3)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            return c

    c = asyncio.run(main())
    assert len(c.rows) == c.agg.t == (4 if applied else 3)
    assert all(r["absent_workers"] == [] for r in c.rows)
    assert np.array_equal(c.agg.x, reference_x(the_plan, c.rows))


# ---------------------------------------------------------------------- absent policies (in process)


@pytest.mark.parametrize("policy", ["drop", "wait"])
def test_marina_with_a_worker_gone_follows_the_absent_policy(policy: str) -> None:
    the_plan = make_plan(
        f'workers = 2\nrounds = 30\nseed = 5\nmethod = "marina"\nabsent_policy = "{policy}"\n'
        f'round_timeout_s = 0.3\ncompressor = {{ name = "rand_k", k = 3 }}\n{SYNTHETIC}'
    )

    async def main() -> tuple[Coordinator, dict]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            w0 = asyncio.ensure_future(run_worker(worker(address, 0, throttle_s=0.03)))
            w1 = asyncio.ensure_future(run_worker(worker(address, 1, throttle_s=0.03)))
            await wait_until(lambda: c.agg.t >= 3)
            t_cancel = c.agg.t
            w1.cancel()  # its stream breaks, as if its process died
            with contextlib.suppress(asyncio.CancelledError):
                await w1
            if policy == "drop":
                await wait_until(lambda: c.agg.t >= t_cancel + 3)  # rounds close without it
            else:
                await asyncio.sleep(0.8)  # more than two deadlines pass without it
                assert c.agg.t <= t_cancel + 1  # "wait" closed no round without it
            rejoined = await asyncio.gather(run, w0, run_worker(worker(address, 1, throttle_s=0.03)))
            return c, rejoined[2]

    c, rejoined = asyncio.run(main())
    rows = c.rows
    absent_rows = [r["round"] for r in rows if r["absent_workers"]]
    if policy == "drop":
        assert absent_rows and all(r["absent_workers"] == [1] for r in rows if r["absent_workers"])
    else:
        assert absent_rows == []  # every round waited for worker 1 to come back
    assert rejoined["restores"] >= 1  # MARINA's (h, y) rebuilt from the mirror on rejoining
    assert np.array_equal(c.agg.x, reference_x(the_plan, rows))


# ---------------------------------------------------------------------- dead workers (processes)


@pytest.mark.parametrize("dim", [10, 10_000], ids=["small", "state-cut-out-of-its-frames"])
def test_a_worker_killed_mid_run_is_absent_then_rejoins_with_its_state(tmp_path: Path, dim: int) -> None:
    """At dim = 10_000 the Welcome's mirror and x^{t-1} (80 KB each) travel beside the protobuf."""
    config = write_config(
        tmp_path / "c.toml",
        f'workers = 3\nrounds = 200\nseed = 11\nmethod = {{ name = "clag", zeta = 1.0 }}\n'
        f'round_timeout_s = 10\ncompressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC.replace("dim = 10", f"dim = {dim}")}',
    )
    out, port = tmp_path / "out", free_port()
    server = spawn("serve", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(out), "-q",
                   "--no-dashboard", log=tmp_path / "serve.log")
    address = f"127.0.0.1:{port}"
    workers = [spawn("worker", "-c", address, "--worker-id", str(i), "--throttle", "0.04",
                     "--report", str(tmp_path / f"w{i}.json")) for i in range(3)]
    try:
        wait_for_rows(out, 8, server)
        workers[2].send_signal(signal.SIGKILL)
        workers[2].wait(10)
        wait_for_rows(out, 16, server)
        again = spawn("worker", "-c", address, "--worker-id", "2", "--throttle", "0.04",
                      "--report", str(tmp_path / "w2.json"))
        assert server.wait(120) == 0, (tmp_path / "serve.log").read_text()
        assert again.wait(30) == 0 and workers[0].wait(30) == 0 and workers[1].wait(30) == 0
    finally:
        for p in [server, *workers]:
            p.kill()
    rows = read_rows(out)
    gone = [r["round"] for r in rows if r["absent_workers"]]
    assert gone and all(r["absent_workers"] == [2] for r in rows if r["absent_workers"])
    assert rows[-1]["absent_workers"] == []  # it rejoined before the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_worker"][2]["absent"] == len(gone)
    # One restore with its Welcome; another if its first update came after that round closed
    # (its state then moved past the mirror's), which a loaded machine sometimes makes happen.
    assert json.loads((tmp_path / "w2.json").read_text())["restores"] >= 1
    # Lost once and back: said in the summary; not for good, so serve exited 0 (above).
    [lost] = summary["lost_workers"]
    assert lost["worker_id"] == 2 and 8 <= lost["lost_at_round"] <= 16 < lost["rejoined_at_round"]
    assert lost["absent_rounds"] == len(gone)
    # CLAG's state (h, y) came back from the mirror exactly: the run equals the replay.
    the_plan = plan(config_mod.load(config))
    assert np.array_equal(np.load(out / "x_final.npy"), reference_x(the_plan, rows))


def test_threepc_run_goes_on_when_a_worker_dies_and_says_so_at_the_end(tmp_path: Path) -> None:
    """A worker killed for good: the run goes on, its rows hold figures over the 2 workers left,
    and the end says which worker was lost and when (report, summary.json, progress line), with
    exit code 3, not 0: the figures after the loss are partial."""
    import psutil

    config = write_config(
        tmp_path / "c.toml",
        f'workers = 3\nrounds = 60\nmethod = "ef21"\ncompressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC}',
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "threepc.server.cli", "run", str(config), "--out", str(out), "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "THREEPC_THROTTLE": "0.03", "COLUMNS": "200"},
    )
    try:
        wait_for_rows(out, 10, proc)
        victim = next(c for c in psutil.Process(proc.pid).children() if "1" == c.cmdline()[c.cmdline().index("--worker-id") + 1])
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    assert "worker 1 exited with code -9" in stderr and "the run goes on without it" in stderr
    rows = read_rows(out)
    assert len(rows) == 60 and rows[-1]["absent_workers"] == [1]
    summary = json.loads((out / "summary.json").read_text())
    absent = sum(1 in r["absent_workers"] for r in rows)
    assert summary["per_worker"][1]["absent"] == absent > 0
    [lost] = summary["lost_workers"]
    since = next(r["round"] for r in rows if 1 in r["absent_workers"])
    assert lost["worker_id"] == 1 and lost["rejoined_at_round"] is None and lost["exit_code"] == -9
    assert lost["lost_at_round"] in (since - 1, since) and lost["absent_rounds"] == absent
    assert summary["figures_partial_since"] == since and summary["final"]["diag_workers"] == 2
    assert f"worker 1 lost at round {lost['lost_at_round']} (never came back): " in stdout
    assert f"figures from round {since} on are over 2 of 3 workers" in stdout
    assert "round 60/60" in stdout and "2/3 workers  ||grad f||^2" in stdout  # the progress line
    assert "coordinator and worker meters agree (workers 1 left none)" in stdout  # it was killed


# ---------------------------------------------------------------------- a diverging run (processes)

DIVERGING = (
    'workers = 3\nrounds = 300\nseed = 1\nmethod = "ef21"\nstepsize = 1000.0\nproblem = "least_squares"\n'
    'compressor = {{ name = "top_k", k = 3 }}\ndiagnostics_every = {every}\n'
    '[data]\ndataset = "synthetic"\nrows = 300\ndim = 20\n[wire]\nvalue_dtype = "float64"\n'
)


@pytest.mark.parametrize(("every", "what", "at"), [(1000, "gradient", 123), (1, "loss", 62)])
def test_a_diverging_run_ends_with_the_same_line_and_rows_in_process_and_over_grpc(
    tmp_path: Path, every: int, what: str, at: int
) -> None:
    """A stepsize far too large: a worker's gradient (or, on diagnostic rounds, its loss) stops
    being finite while x^t still is. In process and over gRPC alike the run ends at once with one
    line naming the round and the worker, exit code 1, the rows before it kept. Over gRPC the
    workers' non-finite gradients were refused as malformed, and the run looped for good."""
    config = write_config(tmp_path / "c.toml", DIVERGING.format(every=every))
    line = f"threepc: error: the run diverged at round {at}: worker 0's {what} is not finite"
    runs = {}
    for mode in ("in-process", "distributed"):
        out = tmp_path / mode
        r = threepc("run", str(config), "--out", str(out), "-q", "--no-dashboard",
                    *(["--in-process"] if mode == "in-process" else []), timeout=90)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [line], r.stderr
        runs[mode] = read_rows(out)
    assert len(runs["in-process"]) == at
    for key in ("round", "grad_norm_sq", "loss", "diag_workers", "bits_up_per_worker"):
        assert [row[key] for row in runs["distributed"]] == [row[key] for row in runs["in-process"]]


def test_serve_and_its_workers_end_a_diverging_run(tmp_path: Path) -> None:
    """`serve` with worker processes: the coordinator ends with the line and exit code 1; each
    worker is told why the run ended (Done) and exits 0 with that reason in one line."""
    config = write_config(tmp_path / "c.toml", DIVERGING.format(every=1000))
    out, port = tmp_path / "out", free_port()
    address = f"127.0.0.1:{port}"
    server = spawn("serve", str(config), "--listen", address, "--out", str(out), "-q", "--no-dashboard",
                   log=tmp_path / "serve.log")
    workers = [spawn("worker", "-c", address, "--worker-id", str(i), log=tmp_path / f"w{i}.log") for i in range(3)]
    try:
        assert server.wait(90) == 1
        codes = [w.wait(60) for w in workers]
    finally:
        for p in [server, *workers]:
            p.kill()
    line = "the run diverged at round 123: worker 0's gradient is not finite"
    assert (tmp_path / "serve.log").read_text().strip().splitlines()[-1] == f"threepc: error: {line}"
    assert codes == [0, 0, 0]
    for i in range(3):
        said = (tmp_path / f"w{i}.log").read_text().strip().splitlines()
        assert said[-1] == f"worker {i}: the coordinator ended the run: {line}"
    assert len(read_rows(out)) == 123


# ---------------------------------------------------------------------- coordinator faults (processes)


def _processes_naming(text: str) -> list[int]:
    """The pids whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def test_sigterm_ends_a_local_run_with_its_workers_and_keeps_its_rows(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", f'workers = 3\nrounds = 100000\nmethod = "gd"\n{SYNTHETIC}')
    out = tmp_path / "out"
    run = spawn("run", str(config), "--out", str(out), "-q", "--no-dashboard", log=tmp_path / "run.log")
    try:
        wait_for_rows(out, 20, run)
        assert len(_processes_naming(str(out / "workers"))) == 3  # the workers' --report paths
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 143
    finally:
        run.kill()
    assert "ended by SIGTERM" in (tmp_path / "run.log").read_text()
    assert _processes_naming(str(out / "workers")) == []  # stopped with it, not left retrying
    rows = read_rows(out)
    assert len(rows) >= 20 and [r["round"] for r in rows] == list(range(len(rows)))


def test_sigterm_then_resume_reaches_the_uninterrupted_iterate(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        f'workers = 2\nrounds = 40\nseed = 2\nmethod = "ef21"\ncheckpoint_every = 5\n'
        f'compressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC}',
    )
    out, port = tmp_path / "out", free_port()
    address = f"127.0.0.1:{port}"
    serve = ["--listen", address, "-q", "--no-dashboard"]
    server = spawn("serve", str(config), "--out", str(out), *serve, log=tmp_path / "serve1.log")
    workers = [spawn("-v", "worker", "-c", address, "--worker-id", str(i), "--throttle", "0.03",
                     "--reconnect-timeout", "60", "--report", str(tmp_path / f"w{i}.json"),
                     log=tmp_path / f"w{i}.log") for i in range(2)]
    try:
        wait_for_rows(out, 12, server)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 143
        said = (tmp_path / "serve1.log").read_text()
        assert f"continue with: threepc serve --resume {out}" in said
        assert (out / "checkpoint.npz").exists() and not (out / "checkpoint.npz.tmp").exists()
        stopped_at = len(read_rows(out))
        assert 12 <= stopped_at < 40
        resumed = spawn("serve", "--resume", str(out), *serve, log=tmp_path / "serve2.log")
        assert resumed.wait(60) == 0, (tmp_path / "serve2.log").read_text()
        assert all(w.wait(30) == 0 for w in workers)
    finally:
        for p in [server, *workers]:
            p.kill()
    rows = read_rows(out)
    assert [r["round"] for r in rows] == list(range(40))  # rows after the checkpoint replaced, none twice
    assert all(r["absent_workers"] == [] for r in rows)
    for i in range(2):
        report = json.loads((tmp_path / f"w{i}.json").read_text())
        assert report["streams"] >= 2 and report["restores"] >= 1  # rejoined, state from the mirror
    reference = tmp_path / "ref"
    r = threepc("run", str(config), "--in-process", "--out", str(reference), "-q")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out / "x_final.npy"), np.load(reference / "x_final.npy"))


# ---------------------------------------------------------------------- load (processes)


def fork_workers(address: str, n: int, reports: str) -> int:
    """Fork n worker processes, each running `run_worker` on its own stream; how many failed.

    The parent imports numpy, scipy and grpc once and creates no channel before forking, so
    each child is a fresh gRPC client; 100 interpreters importing them take ~100 s on 2 cores.
    """
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                options = worker(address, i, connect_timeout_s=120, report=Path(reports) / f"{i}.json")
                asyncio.run(run_worker(options))
                code = 0
            except BaseException as err:  # noqa: BLE001 - a forked child reports and exits
                print(f"worker {i}: {err!r}", file=sys.stderr, flush=True)
            os._exit(code)
        pids.append(pid)
    return sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in pids)


def test_a_hundred_worker_processes_are_all_received_and_metered(tmp_path: Path) -> None:
    """100 worker processes against one `threepc serve`; every message metered on both ends.

    About 10 s on 2 cores (the workers are forked from one interpreter: `fork_workers`).
    """
    from tests.conftest import ROOT

    n, rounds = 100, 3
    config = write_config(
        tmp_path / "c.toml",
        f'workers = {n}\nrounds = {rounds}\nmethod = "ef21"\ndiagnostics_every = 1000\nround_timeout_s = 120\n'
        f'compressor = {{ name = "top_k", k = 2 }}\n[data]\ndataset = "synthetic"\nrows = {2 * n}\ndim = 10\n',
    )
    out, port = tmp_path / "out", free_port()
    server = spawn("serve", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(out), "-q",
                   "--no-dashboard", log=tmp_path / "serve.log")
    reports = tmp_path / "reports"
    script = f"import sys; from tests.e2e.test_faults import fork_workers; " \
             f"sys.exit(fork_workers('127.0.0.1:{port}', {n}, {str(reports)!r}))"
    workers = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    try:
        assert workers.returncode == 0, workers.stderr[-3000:]
        assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        server.kill()
    rows = read_rows(out)
    assert len(rows) == rounds and all(r["absent_workers"] == [] and r["refused"] == 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["per_worker"]) == n
    for entry in summary["per_worker"]:
        report = json.loads((reports / f"{entry['worker_id']}.json").read_text())
        mine, theirs = entry["meter"], report["meter"]
        # Join + ready + 3 updates + the diagnostics of round 0 and of the last round up;
        # welcome + 3 rounds + done down.
        assert theirs["messages_sent"] == mine["messages_received"] == 2 + rounds + 2
        assert theirs["messages_received"] == mine["messages_sent"] == 1 + rounds + 1
        assert theirs["sent_bytes"] == mine["received_bytes"] and theirs["received_bytes"] == mine["sent_bytes"]
        assert entry["absent"] == 0 and report["rounds"] == rounds
    assert rows[-1]["wire_bytes_up"] == sum(e["meter"]["received_bytes"]["round"] for e in summary["per_worker"])
