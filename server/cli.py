"""The `threepc` command: thin, it parses, loads a config and calls what the tests call too."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from threepc.common import config as config_mod
from threepc.common.errors import ThreePCError
from threepc.common.memory import keep_freed_memory, keep_round_buffers

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
LOST_WORKERS = 3  # exit code: the run finished, but a worker was lost and never came back
EXIT_CODES = """\b
Exit codes: 0 the run finished; 1 an error, in one line on stderr (a run that diverged too: its
rows are kept in metrics.jsonl); 3 the run finished but a worker was lost and never came back,
so the figures of the rounds after are over fewer workers (summary.json: lost_workers);
143 stopped by SIGTERM."""


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Log what the coordinator and workers do.")
def cli(verbose: bool) -> None:
    """threepc: communication-efficient distributed training over gRPC.

    A coordinator broadcasts the iterate; each worker computes a gradient on its own data,
    compresses it with a three point compressor and sends a bit-packed message back; every byte
    that crosses the wire is metered.

    \b
    Start here:
      threepc run examples/ef21_a9a.toml --out runs/demo     # local cluster on loopback
      threepc run CONFIG --in-process --out DIR               # the reference engine, no gRPC
      threepc serve CONFIG --listen 0.0.0.0:50051             # coordinator alone
      threepc worker --coordinator HOST:50051 --data FILE     # one worker, anywhere
      threepc methods                                         # methods and compressors
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def _overrides(workers: int | None, rounds: int | None, seed: int | None) -> dict[str, Any]:
    given = {"workers": workers, "rounds": rounds, "seed": seed}
    return {k: v for k, v in given.items() if v is not None}


_config_options = [
    click.option("--workers", "-n", type=int, help="Override the config's number of workers."),
    click.option("--rounds", "-r", type=int, help="Override the config's number of rounds."),
    click.option("--seed", type=int, help="Override the config's seed."),
]


def config_options(f: Any) -> Any:
    for option in reversed(_config_options):
        f = option(f)
    return f


class Progress:
    """A progress bar with the round, ||grad f||^2 and bits sent (quiet: nothing)."""

    def __init__(self, rounds: int, quiet: bool, workers: int = 0, stand_in: bool = False):
        self.quiet = quiet
        self.workers = workers
        # Every line the bar draws says it, where the data is not the named set (data.fallback).
        self.note = "synthetic stand-in:  " if stand_in else ""  # no [brackets]: rich markup
        if quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(), transient=False,
        )
        self.task = self.bar.add_task("run", total=rounds, figures=f"{self.note}waiting for workers")
        self.bar.start()

    def update(self, row: dict) -> None:
        if self.quiet:
            return
        g = row.get("grad_norm_sq")
        # Workers whose figures the row holds (diagnostic rounds), else those whose update came;
        # first, where a narrow terminal cuts nothing of it.
        present = row.get("diag_workers") if g is not None else self.workers - row.get("absent", 0)
        figures = self.note
        figures += f"{present}/{self.workers} workers  " if present is not None and present < self.workers else ""
        figures += f"||grad f||^2 {g:.3e}" if g is not None else ""
        figures += f"  bits/worker {row['bits_up_per_worker']:.4g}"
        if row.get("wire_bytes_up") is not None:
            figures += f"  wire up {row['wire_bytes_up']:,} B down {row['wire_bytes_down']:,} B"
        self.bar.update(self.task, completed=row["round"] + 1, figures=figures)

    def stop(self) -> None:
        if not self.quiet:
            self.bar.stop()


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/latest", show_default=True,
              help="Folder for metrics.jsonl and summary.json; one that holds a run is refused "
                   "unless --overwrite.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run OUT holds (its files are removed when this run's first round ends).")
@click.option("--in-process", is_flag=True, help="Run the reference engine: no gRPC, no processes.")
@click.option("--dashboard", default="127.0.0.1:8080", show_default=True, envvar="THREEPC_DASHBOARD",
              help="Address:port of the live dashboard and /metrics (or THREEPC_DASHBOARD).")
@click.option("--no-dashboard", is_flag=True, help="Serve no dashboard.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@config_options
def run(
    config_file: str, out: str, overwrite: bool, in_process: bool, dashboard: str, no_dashboard: bool, quiet: bool,
    workers: int | None, rounds: int | None, seed: int | None,
) -> None:
    """Train CONFIG_FILE on a local cluster: a coordinator and n worker processes on loopback.

    Writes OUT/metrics.jsonl (one row per round: round, grad_norm_sq, loss, bits_up_per_worker,
    value_bits_up_per_worker, wire_bytes_up, wire_bytes_down, elapsed_s, ...) and
    OUT/summary.json (config, final figures, per-worker totals as both ends metered them,
    the workers lost mid-run). An OUT that holds a run is refused unless --overwrite.
    """
    from threepc.common.engine import plan, run_in_process
    from threepc.server.launch import Terminated, run_local
    from threepc.server.runlog import RunLog, claim

    config = config_mod.load(config_file, _overrides(workers, rounds, seed))
    claim(Path(out), overwrite=overwrite, resume=f"threepc serve --resume {out}")
    the_plan = plan(config)
    log = RunLog(out, replace=overwrite)
    progress = Progress(config.rounds, quiet, config.workers, the_plan.stand_in)

    def on_round(row: dict) -> None:
        log.write_row(row)
        progress.update(row)

    started = time.perf_counter()
    try:
        if in_process:
            keep_freed_memory()  # as every worker process does (threepc worker)
            result = run_in_process(the_plan, on_round)
            rows, x_final = result.rows, result.x
            extra: dict[str, Any] = {"per_worker": [
                {"worker_id": i, **m, "data": {"shard_hash": the_plan.shard_hashes[i].hex()}}
                for i, m in enumerate(result.per_worker)
            ]}
        else:
            rows_seen: list[dict] = []

            def on_round_distributed(row: dict) -> None:
                rows_seen.append(row)
                on_round(row)

            keep_round_buffers()
            try:
                extra = asyncio.run(
                    run_local(the_plan, Path(out), on_round_distributed, None if no_dashboard else dashboard, _announce)
                )
            except Terminated:
                progress.stop()
                click.echo(f"threepc: ended by SIGTERM after {len(rows_seen)} rounds; workers stopped; "
                           f"the rounds' rows are in {out}/metrics.jsonl", err=True)
                sys.exit(143)
            rows, x_final = rows_seen, extra.pop("x_final")
    finally:
        progress.stop()
    summary = _summary("in-process" if in_process else "distributed", the_plan, rows, started, extra)
    log.close(summary, x_final)
    code = _report(summary, out)
    if code:
        sys.exit(code)


def _announce(port: int) -> None:
    click.echo(f"dashboard: http://127.0.0.1:{port}/ (and /metrics for Prometheus)", err=True)


def _summary(mode: str, the_plan: Any, rows: list[dict], started: float, extra: dict) -> dict:
    """summary.json: the config, what the coordinator resolved, first and final figures, totals."""
    from threepc.server.runlog import plan_summary

    return {
        "mode": mode,
        "config": the_plan.config.model_dump(mode="json"),
        "plan": plan_summary(the_plan),
        "rounds": len(rows),
        "elapsed_s": time.perf_counter() - started,
        "first": rows[0] if rows else None,
        "final": rows[-1] if rows else None,
        # What the run trained on: a stand-in is not the named set, whatever config.data says.
        "data": {
            "source": the_plan.dataset,
            "stand_in": the_plan.stand_in,
            "synthetic": the_plan.synthetic,
            "shard_hashes": [h.hex() for h in the_plan.shard_hashes],
        },
        **extra,
    }


def _report(summary: dict, out: str) -> int:
    """The run's figures in a few lines; the exit code they call for (0, or LOST_WORKERS)."""
    first, final = summary.get("first"), summary.get("final")
    click.echo(f"{summary['mode']} run: {summary['rounds']} rounds in {summary['elapsed_s']:.1f} s -> {out}")
    data = summary.get("data") or {}
    if data.get("stand_in"):
        click.echo(f"data: a synthetic stand-in ({data['source']}), not {summary['config']['data']['dataset']!r}, "
                   "which was not found (data.fallback = 'synthetic'): the figures are not that data set's")
    differ = [w["worker_id"] for w in summary.get("per_worker", [])
              if (w.get("data") or {}).get("matches_coordinator") is False]
    if differ:
        click.echo(f"data: the shards of workers {differ} differ from the coordinator's (summary.json: "
                   "per_worker[].data): they trained on other data than the run planned")
    if first and final and first.get("grad_norm_sq") is not None and final.get("grad_norm_sq") is not None:
        drop = first["grad_norm_sq"] / final["grad_norm_sq"] if final["grad_norm_sq"] > 0 else math.inf
        click.echo(
            f"||grad f||^2 {first['grad_norm_sq']:.3e} -> {final['grad_norm_sq']:.3e} ({drop:.3g}x lower); "
            f"bits/worker {final['bits_up_per_worker']:.6g}"
        )
    if final and final.get("wire_bytes_up") is not None:
        workers = summary.get("per_worker", [])
        if workers and all("meters_agree" in w for w in workers):
            # A worker killed mid-run wrote no meter: nothing to compare, which is not a disagreement.
            silent = [w["worker_id"] for w in workers if w.get("worker_meter") is None]
            verdict = "agree" if all(w["meters_agree"] for w in workers if w["worker_id"] not in silent) else "DISAGREE"
            check = f"; coordinator and worker meters {verdict}"
            if silent:
                check += f" (workers {', '.join(map(str, silent))} left none)"
        else:
            check = " (as the coordinator metered them)"
        click.echo(f"wire bytes up {final['wire_bytes_up']:,}, down {final['wire_bytes_down']:,}{check}")
    return _report_lost(summary)


def _report_lost(summary: dict) -> int:
    """A line per worker lost mid-run (and whose figures the last rows lack); LOST_WORKERS if one
    never came back."""
    last: dict[int, dict] = {}
    times: dict[int, int] = {}
    for loss in summary.get("lost_workers", []):
        last[loss["worker_id"]] = loss
        times[loss["worker_id"]] = times.get(loss["worker_id"], 0) + 1
    n = summary["config"]["workers"]
    final = summary.get("final") or {}
    for worker_id, loss in sorted(last.items()):
        again = f" ({times[worker_id]} times; the last)" if times[worker_id] > 1 else ""
        if loss["rejoined_at_round"] is None:
            code = f" (its process exited with code {loss['exit_code']})" if "exit_code" in loss else ""
            click.echo(f"worker {worker_id} lost at round {loss['lost_at_round']}{again} (never came back): "
                       f"{loss['error']}{code}")
        else:
            click.echo(f"worker {worker_id} lost at round {loss['lost_at_round']}{again}, back at round "
                       f"{loss['rejoined_at_round']} ({loss['absent_rounds']} rounds without it)")
    since = summary.get("figures_partial_since")
    if since is not None and final.get("grad_norm_sq") is not None:
        click.echo(f"figures from round {since} on are over {final['diag_workers']} of {n} workers")
    gone = [i for i, loss in last.items() if loss["rejoined_at_round"] is None]
    return LOST_WORKERS if gone else 0


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("config_file", type=click.Path(dir_okay=False), required=False)
@click.option("--listen", default="0.0.0.0:50051", show_default=True, envvar="THREEPC_LISTEN",
              help="Address:port to serve on (or THREEPC_LISTEN).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Folder for metrics.jsonl, summary.json and checkpoint.npz [default: runs/latest, "
                   "or DIR with --resume]; one that holds a run is refused unless --resume or --overwrite.")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None, metavar="DIR",
              help="Continue the run whose checkpoint.npz is in DIR. CONFIG_FILE, if given, may change "
                   "only rounds, checkpoint_every, round_timeout_s, diagnostics_every and wire.read_ahead, "
                   "chunk_bytes, max_message_bytes.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run OUT holds (its files are removed once this coordinator listens).")
@click.option("--auto-resume", is_flag=True, envvar="THREEPC_AUTO_RESUME",
              help="Continue the run in OUT if it holds a checkpoint, else start CONFIG_FILE there (for a "
                   "restarted container; or THREEPC_AUTO_RESUME).")
@click.option("--token", envvar="THREEPC_TOKEN", default="", help="Join token workers must present (or THREEPC_TOKEN).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), envvar="THREEPC_TLS_CERT",
              help="Serve TLS with this certificate chain (PEM; or THREEPC_TLS_CERT); needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), envvar="THREEPC_TLS_KEY",
              help="Private key of --tls-cert (PEM; or THREEPC_TLS_KEY).")
@click.option("--dashboard", default="127.0.0.1:8080", show_default=True, envvar="THREEPC_DASHBOARD",
              help="Address:port of the live dashboard and /metrics (or THREEPC_DASHBOARD).")
@click.option("--no-dashboard", is_flag=True, help="Serve no dashboard.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--linger", is_flag=True, envvar="THREEPC_LINGER",
              help="After the run, keep serving health and the dashboard until SIGTERM (for Kubernetes).")
@click.option("--health-listen", envvar="THREEPC_HEALTH_LISTEN", metavar="ADDR", default=None,
              help="Also serve grpc.health.v1 alone, in plaintext, on ADDR (or THREEPC_HEALTH_LISTEN): "
                   "for probes that cannot speak TLS (kubelet's).")
@config_options
def serve(
    config_file: str | None, listen: str, out: str | None, resume: str | None, overwrite: bool, auto_resume: bool,
    token: str,
    tls_cert: str | None, tls_key: str | None, dashboard: str, no_dashboard: bool, linger: bool, quiet: bool,
    workers: int | None, rounds: int | None, seed: int | None, health_listen: str | None = None,
) -> None:
    """Run the coordinator of CONFIG_FILE alone; workers join with `threepc worker`.

    The rounds start once every one of the config's n workers has joined and is ready.
    It writes OUT/checkpoint.npz every `checkpoint_every` rounds and on SIGTERM (after the open
    round finishes; then exits with code 143); `threepc serve --resume OUT` continues the run,
    and the workers rejoin. An OUT that holds a run is refused unless --resume continues it or
    --overwrite replaces it; --auto-resume (for containers) continues it when it holds a
    checkpoint and starts CONFIG_FILE there otherwise.
    """
    from threepc.common.engine import plan
    from threepc.common.errors import ConfigError
    from threepc.server import checkpoint
    from threepc.server.launch import coordinator_summary
    from threepc.server.launch import serve as serve_run
    from threepc.server.runlog import METRICS, RunLog, claim, run_files

    overrides = _overrides(workers, rounds, seed)
    if resume is not None and (overwrite or auto_resume):
        raise ConfigError("--resume continues a run; give it without --overwrite and --auto-resume")
    if overwrite and auto_resume:
        raise ConfigError("--auto-resume keeps the run in OUT, --overwrite replaces it: give one of them")
    if auto_resume:
        if config_file is None:
            raise ConfigError("--auto-resume needs CONFIG_FILE: the run to start when OUT holds no checkpoint")
        out = out or "runs/latest"
        if (Path(out) / checkpoint.CHECKPOINT).exists():
            resume = out
        elif run_files(Path(out)) == [METRICS]:
            # Rows of a run that never checkpointed cannot be continued; the same config and
            # seed write the same rows again.
            click.echo(f"threepc: {out} holds rows but no checkpoint; starting the run over (--auto-resume)", err=True)
            overwrite = True
    resumed = None
    if resume is not None:
        saved = checkpoint.load(Path(resume))
        if config_file is not None:
            given, source = config_mod.load(config_file, overrides), config_file
        else:
            given = config_mod.parse({**json.loads(saved.config_json), **overrides}, "the command line")
            source = "the command line"
        config = checkpoint.resume_config(saved, given, source)
        out = out or resume
        rows, kept = checkpoint.resume_rows(Path(resume) / METRICS, saved.round)
        if Path(out).resolve() == Path(resume).resolve():
            claim(Path(out), continuing=True)
            log = RunLog(out, keep_bytes=kept)  # the rows before the checkpoint; later ones are cut
        else:
            claim(Path(out))
            log = RunLog(out, rows=rows)  # a copy of the rows before the checkpoint, in a new folder
        resumed = (saved, rows)
    elif config_file is None:
        raise ConfigError("serve needs CONFIG_FILE, or --resume DIR to continue a run")
    else:
        config = config_mod.load(config_file, overrides)
        out = out or "runs/latest"
        claim(Path(out), overwrite=overwrite, resume=f"--resume {out}")
        log = RunLog(out, replace=overwrite)
    credentials = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        from threepc.common.tls import server_credentials

        credentials = server_credentials(tls_cert, tls_key)
    the_plan = plan(config, stand_in_allowed=False)  # remote workers could not be held to a stand-in
    if resumed is not None:
        checkpoint.check_fits(resumed[0], the_plan.dim)
    progress = Progress(config.rounds, quiet, config.workers)

    def on_round(row: dict) -> None:
        log.write_row(row)
        progress.update(row)

    def on_listening(port: int) -> None:
        log.start()  # the old run's files go (--overwrite) or are cut at the checkpoint (--resume) now
        at = f" from round {resumed[0].round}" if resumed else ""
        click.echo(f"coordinator listening on port {port}; waiting for {config.workers} workers{at}", err=True)

    started = time.perf_counter()
    exit_code = 0

    def on_finished(coordinator: Any) -> None:
        nonlocal exit_code
        progress.stop()
        summary = _summary("distributed", the_plan, coordinator.rows, started, coordinator_summary(coordinator))
        log.close(summary, coordinator.agg.x)
        exit_code = _report(summary, out)
        if linger:
            click.echo("run finished; lingering until SIGTERM (--linger)", err=True)

    keep_round_buffers()
    try:
        asyncio.run(
            serve_run(the_plan, listen, on_round, on_listening, token, None if no_dashboard else dashboard, _announce,
                      out_dir=Path(out), resume=resumed, credentials=credentials, on_finished=on_finished,
                      linger=linger, health_listen=health_listen)
        )
    except checkpoint.Stopped as stop:
        progress.stop()
        click.echo(f"threepc: stopped at round {stop.round}; checkpoint in {stop.path}; "
                   f"continue with: threepc serve --resume {out}", err=True)
        sys.exit(143)
    finally:
        progress.stop()
    if exit_code:
        sys.exit(exit_code)


@cli.command(context_settings=CONTEXT)
@click.option("--coordinator", "-c", required=True, help="HOST:PORT of the coordinator.")
@click.option("--data", "-d", help="Data set (path or name) to take this worker's shard from; default: the run's.")
@click.option("--worker-id", type=int, default=-1, show_default=True, envvar="THREEPC_WORKER_ID",
              help="Worker id to ask for, which picks the shard (-1: any free one; or THREEPC_WORKER_ID).")
@click.option("--token", envvar="THREEPC_TOKEN", default="", help="Join token (or THREEPC_TOKEN).")
@click.option("--connect-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to keep retrying while the coordinator is not up.")
@click.option("--reconnect-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to keep trying to rejoin after the stream breaks mid-run.")
@click.option("--tls-ca", type=click.Path(dir_okay=False), envvar="THREEPC_TLS_CA",
              help="Connect with TLS, trusting the CA in this PEM file (or THREEPC_TLS_CA); the host in "
                   "--coordinator must be named in the coordinator's certificate.")
@click.option("--throttle", type=float, default=0.0, hidden=True, envvar="THREEPC_THROTTLE",
              help="Fault drills: wait this many seconds before each update (a straggler).")
@click.option("--throttle-round", type=int, multiple=True, hidden=True,
              help="Fault drills: throttle only in this round (repeatable).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write this worker's meter (JSON) here at the end.")
@click.option("--linger", is_flag=True, envvar="THREEPC_LINGER",
              help="After the run, stay up until SIGTERM instead of exiting (for a Kubernetes StatefulSet).")
def worker(
    coordinator: str, data: str | None, worker_id: int, token: str, connect_timeout: float,
    reconnect_timeout: float, tls_ca: str | None, throttle: float, throttle_round: tuple[int, ...],
    report: str | None, linger: bool,
) -> None:
    """Join the coordinator at HOST:PORT and train until the run is done.

    Refused because its worker id is taken (or too slow to get ready), it retries with backoff
    for --connect-timeout seconds. Exit codes: 0 the run ended (finished, or ended by the
    coordinator: a run that diverged is reported by `serve`/`run`, and here in one line); 1 an
    error, in one line on stderr."""
    import os

    # gRPC's own log lines (e.g. each failed TLS handshake) would bury the one-line error;
    # GRPC_VERBOSITY set by the user still wins. Read when gRPC starts, so set before it does.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    keep_freed_memory()  # a worker's math allocates d-sized temporaries every round
    from threepc.worker.client import WorkerOptions, run_worker

    options = WorkerOptions(
        coordinator, worker_id, data, token, connect_timeout, Path(report) if report else None,
        reconnect_timeout_s=reconnect_timeout, tls_ca=Path(tls_ca) if tls_ca else None, throttle_s=throttle,
        throttle_rounds=frozenset(throttle_round) if throttle_round else None,
    )
    summary = asyncio.run(run_worker(options))
    if summary.get("finished_before_joining"):
        click.echo("worker: the run had already finished; nothing to do", err=True)
    elif summary.get("ended", "finished") != "finished":
        click.echo(f"worker {summary['worker_id']}: the coordinator ended the run: {summary['ended']}", err=True)
    else:
        click.echo(f"worker {summary['worker_id']}: {summary['rounds']} rounds done", err=True)
    if linger:
        from threepc.server.launch import until_signalled

        click.echo("worker: lingering until SIGTERM (--linger)", err=True)
        asyncio.run(until_signalled())


# Our own --help, not click's eager one: after WHICH it belongs to the benchmark.
@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
             add_help_option=False)
@click.argument("which", type=click.Choice(["wire", "rounds", "index-coding"]), required=False)
@click.option("-h", "--help", "show_help", is_flag=True, help="Show this message and exit.")
@click.pass_context
def bench(ctx: click.Context, which: str | None, show_help: bool) -> None:
    """Run a benchmark and print its figures (never fails on timing).

    \b
      threepc bench wire [--json] [--d 1e6]      payload kinds: bytes vs the information limit
      threepc bench rounds [--json] [--n 8] ...  rounds/s vs a bare gRPC stream and in-process
      threepc bench index-coding                 the sparse index codings alone

    Options after WHICH go to the benchmark (`threepc bench wire --help`).
    """
    import importlib

    if which is None:
        click.echo(ctx.get_help())
        sys.exit(0 if show_help else 2)
    module = {"wire": "bench_wire", "rounds": "bench_rounds", "index-coding": "bench_index_coding"}[which]
    code = importlib.import_module(f"threepc.benchmarks.{module}").main(["--help"] * show_help + list(ctx.args))
    sys.exit(code or 0)


@cli.command(context_settings=CONTEXT)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--grid", "-g", "grid", multiple=True, required=True, metavar="FIELD=V1,V2,...",
              help="A grid axis: a dotted config field and its values (repeat for more axes).")
@click.option("--tolerance", "-t", type=float, default=1e-6, show_default=True,
              help="The ||grad f||^2 a run must reach to count its bits-to-tolerance.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/sweep", show_default=True,
              help="One folder per run (metrics.jsonl) and table.json.")
@click.option("--overwrite", is_flag=True,
              help="Replace the sweep OUT holds (each run's files are removed when its first round ends).")
@click.option("--distributed", is_flag=True, help="Run each point as a local cluster (default: in-process).")
@config_options
def sweep(config_file: str, grid: tuple[str, ...], tolerance: float, out: str, overwrite: bool, distributed: bool,
          workers: int | None, rounds: int | None, seed: int | None) -> None:
    """Run a grid of CONFIG_FILE's variants and print bits-to-tolerance per run.

    \b
      threepc sweep examples/ef21_a9a.toml -g compressor.k=1,2,4 -g stepsize_multiplier=1,2,4,8

    Like the papers' heatmaps: each cell is the bits a worker sent until ||grad f||^2 <= tolerance
    ('-' if never). Stepsizes that diverge show as such; the sweep goes on.
    """
    import tomllib

    from threepc.common.engine import plan, run_in_process
    from threepc.server.launch import run_local
    from threepc.server.runlog import RunLog
    from threepc.server.sweep import parse_axis
    from threepc.server.sweep import sweep as run_sweep

    try:
        base = {**tomllib.loads(Path(config_file).read_text()), **_overrides(workers, rounds, seed)}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ThreePCError(f"cannot read config {config_file}: {err}") from None
    axes = [parse_axis(text) for text in grid]
    if distributed:
        keep_round_buffers()  # this process coordinates every run
    else:
        keep_freed_memory()  # this process runs the engine, as `threepc run --in-process` does

    def run_one(config: config_mod.RunConfig, folder: Path) -> list[dict]:
        log, rows = RunLog(folder, replace=overwrite), []

        def on_round(row: dict) -> None:
            rows.append(row)
            log.write_row(row)

        the_plan = plan(config)
        if the_plan.stand_in:
            click.echo(f"{folder}: data is a synthetic stand-in ({the_plan.dataset}), not {config.data.dataset!r}", err=True)
        try:
            if distributed:
                asyncio.run(run_local(the_plan, folder, on_round))
            else:
                run_in_process(the_plan, on_round)
        finally:
            data = {"source": the_plan.dataset, "stand_in": the_plan.stand_in}
            log.close({"config": config.model_dump(mode="json"), "rounds": len(rows), "data": data})
        return rows

    def on_run(entry: dict) -> None:
        bits = entry["bits_to_tolerance"]
        shown = f"{bits:.6g}" if bits is not None else ("diverged" if entry.get("error") else "-")
        click.echo(f"{entry['run']:50s} bits to {tolerance:g}: {shown}")

    run_sweep(base, axes, Path(out), tolerance, run_one, on_run, overwrite)
    click.echo(f"table: {Path(out) / 'table.json'}")


@cli.command(context_settings=CONTEXT)
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="fig.png", show_default=True,
              help="Figure file: .png (300 dpi), .svg or .pdf.")
@click.option("--x", "x_axis", type=click.Choice(["bits", "value-bits", "wire-bytes", "rounds"]), default="bits",
              show_default=True, help="x-axis: bits per worker (the papers'), or what crossed the wire (log scale).")
def plot(metrics: tuple[str, ...], out: str, x_axis: str) -> None:
    """Draw ||grad f||^2 against bits per worker for METRICS files (one line per run, log scale),
    each labelled from the summary.json beside it."""
    from threepc.server.plot import plot as draw

    path, notes = draw([Path(m) for m in metrics], Path(out), x_axis)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {path}")


@cli.command(context_settings=CONTEXT)
@click.option("--dim", "-d", type=int, default=1000, show_default=True, help="d at which to show compressors' constants.")
@click.option("--workers", "-n", type=int, default=4, show_default=True, help="n, for constants that depend on it.")
def methods(dim: int, workers: int) -> None:
    """List every method and compressor with its parameters and constants."""
    import inspect

    from threepc.common.compressors import COMPRESSORS
    from threepc.common.methods import CONSTANTS, OTHER, THREE_POINT

    click.echo("methods (method = NAME, or a table with name and parameters):")
    for name, params in {**THREE_POINT, **OTHER}.items():
        click.echo(f"  {name:10s} {params or '-':40.40s} {CONSTANTS.get(name, '')}")
    click.echo(f"compressors (compressor = NAME, or a table), constants at d = {dim}, n = {workers} with defaults:")
    for name, factory in COMPRESSORS.items():
        sig = ", ".join(
            f"{p.name}={p.default!r}" for p in inspect.signature(factory).parameters.values() if p.name != "dtype"
        )
        c = factory()
        figures = [f"{label} = {fn(dim):.4g}" for label, fn in
                   (("alpha", c.alpha), ("omega", c.omega), ("Delta^2", c.absolute)) if fn is not None]
        if c.ab is not None:
            figures.append("A, B = " + ", ".join(f"{v:.4g}" for v in c.ab(dim, workers)))
        click.echo(f"  {name:20s} {sig or '-':32s} {'; '.join(figures) or 'no constant stated'}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ThreePCError becomes one line on stderr and exit code 1."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="threepc", standalone_mode=False)
    except ThreePCError as err:
        click.echo(f"threepc: error: {err}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("threepc: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("threepc: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
