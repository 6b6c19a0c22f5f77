"""Rounds per second of a real local cluster, beside the in-process engine and bare gRPC.

For each row (n worker processes on loopback, dimension d, method) it runs, `--repeats` times:

- threepc: `python -m threepc.server.cli run CONFIG --out DIR -q`, the coordinator as that
  process and n worker processes as its children, exactly as a user starts a local cluster;
- raw: `threepc.benchmarks.raw_grpc`, bare grpc.aio moving the bytes per round the threepc run
  metered (one d-vector-sized blob down to each worker, one update-sized blob back);
- in-process: the same CONFIG with `--in-process` (the reference engine, no transport);

and reports the medians over repeats of: rounds/s in steady state (rounds `--warmup` onward,
from the coordinator's `elapsed_s` in metrics.jsonl, so start-up and round 0's diagnostics are
left out), the coordinator's CPU seconds per round over the same rounds, wire bytes per round
(method traffic, gRPC frames included), and the peak RSS (VmHWM) of the coordinator and of the
largest worker. Each row also gives the coordinator's state (iterate, aggregate and n mirrors at
the state dtype) and one worker's data, the figures the memory targets are stated against, and
the CPU seconds per round of all workers together (on a machine with fewer cores than n + 1,
(coordinator + workers) CPU / cores bounds the round time from below), and `ideal_rounds_per_s`:
the in-process engine's work spread over the cores plus the raw stream's round, what a system
with no overhead of its own would reach on this machine (`vs_ideal` is threepc's share of it).

The job: least squares on a sparse LibSVM set of 2n rows written once per (n, d) into
`--data-dir` (each row has d/100 ones at random coordinates, so a worker's gradient has about
2d/100 nonzeros and TopK at k = d/100 picks scattered coordinates); iterate and values travel
as float32; diagnostics only at round 0. GD is `method = "gd"`, `compressor = "identity"`;
EF21 is `method = "ef21"` with `top_k(k = d/100)`.

    .venv/bin/python -m threepc.benchmarks.bench_rounds --n 8 --d 1e6 --method ef21 --repeats 1
    .venv/bin/python -m threepc.benchmarks.bench_rounds --json                    # the full grid

`--n 1 2` gives every process a core of its own on a 2-core machine: there the in-process work
cannot hide behind other workers' and a round is the bare stream's plus that work in sequence
(worker, then coordinator), which `ideal_rounds_per_s` accounts for.

On a shared 2-core VM the first line takes under a minute. The full grid (n in 8, 32, 100; d in
1e4, 1e6; d = 1e7 at n = 8; GD and EF21, both downlinks) took 25 minutes there, in parts: with
the default 3 repeats 6 minutes for n in 8, 32 at d = 1e6, 4 at d = 1e4 and 5 for d = 1e7; at
`--repeats 1`, 2 minutes for n = 100 at d = 1e4 and 8 at d = 1e6 (100 worker processes of
185-250 MB RSS each, the shared libraries counted in every one; the VM has 24 GB).
Worker processes keep freed memory in their heap and the coordinator keeps a bounded amount
(threepc.common.memory, mallopt at start); `--allocator both` also runs each row with glibc left
as it is (THREEPC_ALLOCATOR=glibc in every process's environment), to show what that is worth.
Linux only (/proc). Prints figures; it never fails on timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from threepc.benchmarks.raw_grpc import _vm_hwm_mb

CLI = [sys.executable, "-m", "threepc.server.cli"]
RAW = [sys.executable, "-m", "threepc.benchmarks.raw_grpc"]
FRAME_BYTES = 5  # gRPC's length prefix, which threepc's meters count (threepc.common.wire)
ALLOCATOR_ENV = {
    "tuned": {},  # threepc's own setting: every free()d block stays in the heap for reuse
    "glibc": {"THREEPC_ALLOCATOR": "glibc"},  # glibc's defaults: large blocks mmap'd and returned
}
DEFAULT_N = (8, 32, 100)
DEFAULT_D = (10**4, 10**6, 10**7)
METHODS = ("gd", "ef21")


# ----------------------------------------------------------------------------- processes


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


@dataclass
class Watch:
    """Samples a coordinator process while it runs: CPU against rounds written, peak RSS."""

    pid: int
    metrics: Path
    interval_s: float = 0.05
    # (rounds written, coordinator CPU s, all workers' CPU s) at each sample
    marks: list[tuple[int, float, float]] = field(default_factory=list)
    coordinator_hwm: float = 0.0
    worker_hwm: dict[int, float] = field(default_factory=dict)
    worker_cpu: dict[int, float] = field(default_factory=dict)  # last CPU s seen, kept after exit
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _rounds_written(self) -> int:
        try:
            with open(self.metrics, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            cpu = _cpu_s(self.pid)
            if cpu is None:
                break
            rounds = self._rounds_written()
            self.coordinator_hwm = max(self.coordinator_hwm, _vm_hwm_mb(self.pid) or 0.0)
            for child in _children(self.pid):
                hwm, child_cpu = _vm_hwm_mb(child), _cpu_s(child)
                if hwm is not None:
                    self.worker_hwm[child] = max(self.worker_hwm.get(child, 0.0), hwm)
                if child_cpu is not None:
                    self.worker_cpu[child] = child_cpu
            self.marks.append((rounds, cpu, sum(self.worker_cpu.values())))
            self._stop.wait(self.interval_s)

    def cpu_per_round(self, first: int, last: int) -> tuple[float | None, float | None]:
        """(coordinator, all workers) CPU seconds per round between the samples nearest to
        `first` and `last` rounds written."""
        inside = [m for m in self.marks if first <= m[0] <= last]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return None, None
        (r0, c0, w0), (r1, c1, w1) = inside[0], inside[-1]
        return (c1 - c0) / (r1 - r0), (w1 - w0) / (r1 - r0)


# ----------------------------------------------------------------------------- the job


def write_data(path: Path, rows: int, d: int, seed: int = 0) -> None:
    """A LibSVM file of `rows` rows, each with d/100 ones at random coordinates, labels +1, -1
    in turn (both occur whenever rows >= 2: the loader refuses a single label)."""
    rng = np.random.default_rng([seed, rows, d])
    per_row = max(1, d // 100)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in range(rows):
            cols = np.sort(rng.choice(d, size=per_row, replace=False)) + 1  # LibSVM is 1-based
            label = "+1" if r % 2 == 0 else "-1"
            f.write(label + " " + ":1 ".join(map(str, cols.tolist())) + ":1\n")
    os.replace(tmp, path)


def data_file(data_dir: Path, n: int, d: int) -> Path:
    path = data_dir / f"bench_rounds_rows{2 * n}_d{d}.svm"
    if not path.exists():
        write_data(path, 2 * n, d)
    return path


def write_config(path: Path, n: int, d: int, method: str, rounds: int, data: Path, downlink: str = "dense") -> None:
    compressor = '"identity"' if method == "gd" else f'{{ name = "top_k", k = {max(1, d // 100)} }}'
    path.write_text(
        f"workers = {n}\n"
        f"rounds = {rounds}\n"
        f'method = "{method}"\n'
        f"compressor = {compressor}\n"
        'problem = "least_squares"\n'
        "diagnostics_every = 0\n"
        f'data = {{ dataset = "{data}", dim = {d} }}\n'
        f'wire = {{ iterate_dtype = "float32", value_dtype = "float32", downlink = "{downlink}" }}\n'
    )


@functools.cache
def _quiet_flags() -> tuple[str, ...]:
    """`--no-dashboard` where `threepc run` has a dashboard: it would cost CPU and bind a port."""
    usage = subprocess.run(
        [*CLI, "run", "--help"], check=False, capture_output=True, text=True
    ).stdout
    return ("--no-dashboard",) if "--no-dashboard" in usage else ()


def _rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _steady_rate(rows: list[dict], warmup: int) -> float | None:
    """Rounds per second from the end of round `warmup - 1` to the end of the last round."""
    a, b = rows[max(warmup - 1, 0)], rows[-1]
    span = b["elapsed_s"] - a["elapsed_s"]
    return (b["round"] - a["round"]) / span if span > 0 else None


def run_threepc(
    config: Path, out: Path, warmup: int, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """A local cluster run of `config`; its steady-state figures."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    with open(out / "coordinator.log", "wb") as log:
        proc = subprocess.Popen(
            [*CLI, "run", str(config), "--out", str(out), "-q", *_quiet_flags()],
            stdout=log,
            stderr=log,
            env=env,
        )
        watch = Watch(proc.pid, metrics).start()
        try:
            code = proc.wait(timeout)
        finally:
            watch.stop()
            if proc.poll() is None:
                # SIGTERM first: `threepc run` then stops its workers (a SIGKILL would orphan them).
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if code != 0:
        tail = (out / "coordinator.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"threepc run exited with {code}: {tail[0] if tail else '(no output)'}")
    rows = _rows(metrics)
    a, b = rows[max(warmup - 1, 0)], rows[-1]
    timed = b["round"] - a["round"]
    coordinator_cpu, workers_cpu = watch.cpu_per_round(a["round"] + 1, b["round"] + 1)
    return {
        "rounds_per_s": _steady_rate(rows, warmup),
        "coordinator_cpu_s_per_round": coordinator_cpu,
        "workers_cpu_s_per_round": workers_cpu,
        "bytes_up": (b["wire_bytes_up"] - a["wire_bytes_up"]) / timed,
        "bytes_down": (b["wire_bytes_down"] - a["wire_bytes_down"]) / timed,
        "coordinator_rss_mb": watch.coordinator_hwm,
        "worker_rss_mb": max(watch.worker_hwm.values(), default=None),
    }


def run_in_process(
    config: Path, out: Path, warmup: int, env: dict[str, str], timeout: float
) -> float | None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [*CLI, "run", str(config), "--in-process", "--out", str(out), "-q", *_quiet_flags()],
        check=True,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    return _steady_rate(_rows(out / "metrics.jsonl"), warmup)


def run_raw(
    n: int, down: int, up: int, rounds: int, warmup: int, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    done = subprocess.run(
        [
            *RAW,
            "--n",
            str(n),
            "--down",
            str(down),
            "--up",
            str(up),
            "--rounds",
            str(rounds),
            "--warmup",
            str(warmup),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- a row


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure_row(
    n: int, d: int, method: str, allocator: str, args: argparse.Namespace, work: Path, downlink: str = "dense"
) -> dict[str, Any]:
    """Repeats of threepc, raw and in-process runs, interleaved so that noise hits all three."""
    env = {**os.environ, **ALLOCATOR_ENV[allocator]}
    rounds, warmup = rounds_for(d, args)
    data = data_file(args.data_dir, n, d)
    config = work / f"n{n}_d{d}_{method}_{downlink}.toml"
    write_config(config, n, d, method, rounds, data, downlink)
    samples: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        tag = f"n{n}_d{d}_{method}_{downlink}_{allocator}_{rep}"
        sample = run_threepc(config, work / tag, warmup, env, args.timeout)
        if not args.no_raw:
            down = round(sample["bytes_down"] / n) - FRAME_BYTES
            up = round(sample["bytes_up"] / n) - FRAME_BYTES
            raw = run_raw(n, down, up, rounds, warmup, env, args.timeout)
            sample["raw_rounds_per_s"] = raw["rounds_per_s"]
            sample["raw_cpu_s_per_round"] = raw["server_cpu_s_per_round"]
            sample["raw_workers_cpu_s_per_round"] = raw.get("workers_cpu_s_per_round")
        if not args.no_in_process:
            sample["inprocess_rounds_per_s"] = run_in_process(
                config, work / f"{tag}_inproc", warmup, env, args.timeout
            )
        samples.append(sample)
    keys = sorted({k for s in samples for k in s})
    compressor = "identity" if method == "gd" else f"top_k(k={max(1, d // 100)})"
    row: dict[str, Any] = {
        "n": n,
        "d": d,
        "method": method,
        "compressor": compressor,
        "downlink": downlink,
        "allocator": allocator,
    }
    for key in keys:
        row[key] = _median([s.get(key) for s in samples])
    for key in ("rounds_per_s", "raw_rounds_per_s", "inprocess_rounds_per_s"):
        row.setdefault(key, None)
        row[f"{key}_all"] = [s.get(key) for s in samples]
    row["vs_raw"] = _ratio(row["rounds_per_s"], row["raw_rounds_per_s"])
    row["vs_inprocess"] = _ratio(row["rounds_per_s"], row["inprocess_rounds_per_s"])
    row["ideal_rounds_per_s"] = ideal_rounds_per_s(row["inprocess_rounds_per_s"], row["raw_rounds_per_s"], n)
    row["vs_ideal"] = _ratio(row["rounds_per_s"], row["ideal_rounds_per_s"])
    # What the memory targets are stated against: the coordinator's iterate, aggregate and n
    # mirrors at the state dtype (float32 here), and one worker's data (the full set it loads).
    row["coordinator_state_mb"] = (n + 2) * d * 4 / 2**20
    row["data_mb"] = data_mb(data, d)
    row["worker_base_rss_mb"] = worker_base_rss_mb()
    row["repeats"] = args.repeats
    row["rounds"] = rounds
    row["warmup"] = warmup
    return row


def ideal_rounds_per_s(inprocess: float | None, raw: float | None, n: int) -> float | None:
    """The round a perfect system would run here: the in-process engine's work (all n workers'
    math and the coordinator's) spread over the machine's cores, then the bytes moved at the
    bare stream's speed. On fewer cores than n + 1 the raw stream alone is no floor: the raw
    benchmark computes nothing, and every worker's gradient and compressor compete for the
    same cores. (The delta downlink adds a follower step per worker, which the in-process
    engine does once: its rows are held to a slightly higher bar.)"""
    if not inprocess or not raw:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1.0 / (1.0 / inprocess / min(cores, n) + 1.0 / raw)


@functools.cache
def worker_base_rss_mb() -> float | None:
    """RSS of a worker process once its modules are imported, before any data or round: the
    interpreter, numpy, scipy, gRPC and protobuf (the memory target's "fixed" part)."""
    probe = (
        "import threepc.server.cli, threepc.worker.client, threepc.common.engine;"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    return int(done.stdout) / 1024 if done.returncode == 0 and done.stdout.strip().isdigit() else None


def data_mb(path: Path, d: int) -> float:
    """Size of the data set as a CSR float64 matrix (values, int32 indices, row pointers)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    nnz = sum(line.count(b":") for line in lines)
    return (nnz * 12 + (len(lines) + 1) * 4) / 2**20


# ----------------------------------------------------------------------------- output

COLUMNS = [
    ("n", "n", "{:d}"),
    ("d", "d", "{:.0e}"),
    ("method", "method", "{}"),
    ("alloc", "allocator", "{}"),
    ("rounds/s", "rounds_per_s", "{:.2f}"),
    ("raw r/s", "raw_rounds_per_s", "{:.2f}"),
    ("vs raw", "vs_raw", "{:.2f}x"),
    ("inproc r/s", "inprocess_rounds_per_s", "{:.2f}"),
    ("vs inproc", "vs_inprocess", "{:.2f}x"),
    ("ideal r/s", "ideal_rounds_per_s", "{:.2f}"),
    ("vs ideal", "vs_ideal", "{:.2f}x"),
    ("coord CPU s/rnd", "coordinator_cpu_s_per_round", "{:.3f}"),
    ("raw", "raw_cpu_s_per_round", "{:.3f}"),
    ("workers CPU s/rnd", "workers_cpu_s_per_round", "{:.3f}"),
    ("raw", "raw_workers_cpu_s_per_round", "{:.3f}"),
    ("up B/rnd", "bytes_up", "{:,.0f}"),
    ("down B/rnd", "bytes_down", "{:,.0f}"),
    ("coord RSS MB", "coordinator_rss_mb", "{:.0f}"),
    ("state MB", "coordinator_state_mb", "{:.0f}"),
    ("worker RSS MB", "worker_rss_mb", "{:.0f}"),
    ("base", "worker_base_rss_mb", "{:.0f}"),
    ("data MB", "data_mb", "{:.2f}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(int(value) if fmt == "{:d}" else value)


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
        for i, (h, _, _) in enumerate(COLUMNS)
    ]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def _dims(text: str) -> int:
    return int(float(text))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="threepc bench rounds", description=__doc__.splitlines()[0])
    p.add_argument(
        "--n",
        type=int,
        nargs="+",
        help=f"worker processes (default {' '.join(map(str, DEFAULT_N))})",
    )
    p.add_argument(
        "--d",
        type=_dims,
        nargs="+",
        help="dimensions, e.g. 1e6 (default 1e4 1e6, and 1e7 at n = 8)",
    )
    p.add_argument("--method", choices=METHODS, nargs="+", default=list(METHODS))
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds per run, warm-up included (default: 200 at d <= 1e5, "
        "30 at d <= 1e6, 12 above)",
    )
    p.add_argument(
        "--warmup", type=int, help="rounds left out of every rate (default: rounds / 6, at least 2)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per row; figures are medians")
    p.add_argument(
        "--allocator",
        choices=("tuned", "glibc", "both"),
        default="tuned",
        help="tuned: threepc's own malloc setting (freed memory kept); glibc: glibc's defaults",
    )
    p.add_argument(
        "--downlink", nargs="+", choices=["dense", "delta"], default=["dense", "delta"],
        help="broadcast x, or the aggregate's change (EF21 rows; GD is always dense)",
    )
    p.add_argument("--no-raw", action="store_true", help="skip the bare gRPC baseline")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process engine")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "threepc-bench-data",
        help="where the generated data sets are cached",
    )
    p.add_argument(
        "--keep", type=Path, help="keep every run's folder here (default: a temporary folder)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds any one run may take")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < (args.warmup or 2) + 2:
        p.error("--rounds must be at least --warmup + 2")
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1 (round 0 carries diagnostics)")
    return args


def rounds_for(d: int, args: argparse.Namespace) -> tuple[int, int]:
    """(rounds, warm-up rounds) of a run at dimension d: enough timed rounds for a steady rate."""
    rounds = args.rounds or (200 if d <= 10**5 else 30 if d <= 10**6 else 12)
    warmup = args.warmup or max(2, rounds // 6)
    return rounds, min(warmup, rounds - 2)


def grid(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """The rows to run: every asked (n, d, method); d = 1e7 only at n = 8 unless both are asked."""
    ns = args.n or list(DEFAULT_N)
    ds = args.d or list(DEFAULT_D)
    explicit = args.n is not None and args.d is not None
    return [
        (n, d, m) for n in ns for d in ds for m in args.method if explicit or d < 10**7 or n == 8
    ]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the row's `finally` stops the cluster it started


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    allocators = ["glibc", "tuned"] if args.allocator == "both" else [args.allocator]
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="threepc-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n, d, method in grid(args):
            # GD's aggregate changes everywhere each round: only EF21 has a delta downlink to show.
            downlinks = ["dense"] if method == "gd" else args.downlink
            for allocator, downlink in ((a, dl) for a in allocators for dl in downlinks):
                try:
                    row = measure_row(n, d, method, allocator, args, work, downlink)
                except (
                    subprocess.SubprocessError,
                    RuntimeError,
                    OSError,
                    ValueError,
                    KeyError,
                    IndexError,
                ) as err:
                    row = {
                        "n": n,
                        "d": d,
                        "method": method,
                        "downlink": downlink,
                        "allocator": allocator,
                        "rounds_per_s": None,
                        "raw_rounds_per_s": None,
                        "inprocess_rounds_per_s": None,
                        "error": f"{type(err).__name__}: {err}",
                    }
                    print(f"bench rounds: n={n} d={d} {method}: {row['error']}", file=sys.stderr)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows)
    print(
        f"bench rounds: {len(rows)} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr
    )


if __name__ == "__main__":
    main()
