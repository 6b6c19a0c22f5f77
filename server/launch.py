"""Runs as a user starts them: a local cluster of worker processes, or a coordinator alone.

`run_local` starts the coordinator in this process on a loopback port and n worker processes
(`python -m threepc.worker`) that connect to it, exactly as remote workers would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from threepc.common.engine import Plan
from threepc.common.errors import ConfigError, ThreePCError, TransportError
from threepc.server.checkpoint import Checkpoint
from threepc.server.coordinator import Coordinator, start_server

log = logging.getLogger("threepc.launch")

RowCallback = Callable[[dict], None]


def coordinator_summary(coordinator: Coordinator) -> dict[str, Any]:
    """Per-worker totals as the coordinator metered them, and the workers lost mid-run."""
    return {
        "lost_workers": lost_workers(coordinator),
        "figures_partial_since": partial_since(coordinator.rows, coordinator.config.workers),
        "per_worker": [
            {
                "worker_id": i,
                "peer": link.peer,
                "rows": link.rows,
                "last_round": link.last_round,
                "bits": coordinator.agg.meters[i].bits,
                "value_bits": coordinator.agg.meters[i].value_bits,
                "skips": coordinator.agg.meters[i].skips,
                "absent": coordinator.agg.meters[i].absent,  # rounds closed without its message
                "late": coordinator.late[i],  # updates refused because their round had closed
                "refused": coordinator.refused[i],  # malformed messages (and resyncs past one a round) refused
                "resyncs": coordinator.resyncs[i],  # dense rounds sent again after a digest mismatch
                "error": str(link.error) if link.error is not None else None,
                "data": link.data,  # its shard's fingerprint (rows, d, hash, source), as its Ready said
                "meter": link.meter.as_dict(),
            }
            for i, link in sorted(coordinator.links.items())
        ]
    }


def lost_workers(coordinator: Coordinator) -> list[dict[str, Any]]:
    """Each time a worker's stream ended mid-run: the round then, why, the round at which it was
    back (None: never), and the rounds closed without it from then until it was lost again (or
    the run's end): those after its rejoin too, until its first update came in time."""
    lost = []
    losses = coordinator.losses
    for k, loss in enumerate(losses):
        later = [other.lost_at_round for other in losses[k + 1 :] if other.worker_id == loss.worker_id]
        end = later[0] if later else coordinator.agg.t
        absent = sum(
            loss.worker_id in row.get("absent_workers", ())
            for row in coordinator.rows
            if loss.lost_at_round <= row["round"] < end
        )
        lost.append({**vars(loss), "absent_rounds": absent})
    return lost


def partial_since(rows: list[dict[str, Any]], n: int) -> int | None:
    """The round from which every row with figures has them over fewer than n workers (None: the
    last such row has all n)."""
    since = None
    for row in reversed(rows):
        if row.get("grad_norm_sq") is None:
            continue  # no figures that round (diagnostics_every)
        if row.get("diag_workers", n) >= n:
            break
        since = row["round"]
    return since


@contextlib.asynccontextmanager
async def dashboard_for(
    coordinator: Coordinator,
    address: str | None,
    on_dashboard: Callable[[int], None] | None,
    required: bool = True,
) -> AsyncIterator[None]:
    """The live dashboard beside the coordinator's gRPC server, if an address is given.

    Not `required` (a local run), a busy port costs the dashboard with a warning, not the run.
    """
    if address is None:
        yield
        return
    from threepc.server.dashboard import start_dashboard, stop_dashboard

    try:
        runner, port = await start_dashboard(coordinator, address)
    except ConfigError as err:
        if required:
            raise
        log.warning("%s; running without a dashboard", err)
        yield
        return
    if on_dashboard:
        on_dashboard(port)
    try:
        yield
    finally:
        await stop_dashboard(runner)


@contextlib.contextmanager
def on_sigterm(handler: Callable[[], None]) -> Any:
    """SIGTERM calls `handler` (in the event loop) while inside."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, handler)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)



async def serve(
    plan: Plan,
    listen: str,
    on_round: RowCallback | None = None,
    on_listening: Callable[[int], None] | None = None,
    token: str = "",
    dashboard: str | None = None,
    on_dashboard: Callable[[int], None] | None = None,
    *,
    out_dir: Path | None = None,
    resume: tuple[Checkpoint, list[dict]] | None = None,
    credentials: grpc.ServerCredentials | None = None,
    on_finished: Callable[[Coordinator], None] | None = None,
    linger: bool = False,
    health_listen: str | None = None,
) -> Coordinator:
    """Listen on `listen`, run the rounds once every worker is ready, stop gracefully.

    `out_dir`: where checkpoints go (every `checkpoint_every` rounds, and on SIGTERM, after
    which `checkpoint.Stopped` is raised). `resume`: a checkpoint and the rows before it.
    `health_listen`: also serve grpc.health.v1 alone, in plaintext, there (`health_server`).
    """
    coordinator = Coordinator(plan, on_round, token, checkpoint_dir=out_dir)
    if resume is not None:
        coordinator.load_checkpoint(*resume)
    server, port = await start_server(coordinator, listen, credentials=credentials)
    if on_listening:
        on_listening(port)
    try:
        async with health_server(health_listen), dashboard_for(coordinator, dashboard, on_dashboard):
            with on_sigterm(coordinator.request_stop):  # checkpoint and stop after the open round
                await coordinator.run()
            if on_finished:
                on_finished(coordinator)
            if linger:
                # Kubernetes restarts a Deployment's process that exits: stay up (health and
                # dashboard answering, joins refused as finished) until told to stop.
                log.info("run finished; lingering until SIGTERM")
                await until_signalled()
    finally:
        await server.stop(5)
    return coordinator


@contextlib.asynccontextmanager
async def health_server(listen: str | None) -> AsyncIterator[int | None]:
    """A plaintext gRPC server of grpc.health.v1 and nothing else on `listen`, SERVING while inside;
    yields its port (None without an address).

    Kubelet's gRPC probes speak plaintext only, so a coordinator serving TLS could never become
    ready on its own port; this port tells a probe that the coordinator's event loop answers and
    carries no training traffic, token or key.
    """
    if listen is None:
        yield None
        return
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise TransportError(f"--health-listen: cannot listen on {listen}")
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    log.info("grpc.health.v1 (plaintext) on port %d", port)
    try:
        yield port
    finally:
        await servicer.enter_graceful_shutdown()  # NOT_SERVING while the coordinator stops
        await server.stop(1)


async def until_signalled() -> None:
    """Wait for SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_local(
    plan: Plan,
    out_dir: Path,
    on_round: RowCallback | None = None,
    dashboard: str | None = None,
    on_dashboard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Coordinator here, n worker processes on loopback; returns the run's summary parts.

    A worker process that dies does not end the run where the method goes on without it
    (the 3PC family always; EF and MARINA under absent_policy = "drop"): it is logged, and the
    rounds close without it. Checkpoints go to `out_dir` every `checkpoint_every` rounds
    (SIGTERM still ends a local run at once, raising `Terminated`: its workers are stopped with it,
    and the rows written so far stay).
    """
    coordinator = Coordinator(plan, on_round, checkpoint_dir=out_dir)
    server, port = await start_server(coordinator, "127.0.0.1:0")
    async with dashboard_for(coordinator, dashboard, on_dashboard, required=False):
        with ending_on_sigterm():
            return await _run_workers(coordinator, server, port, plan, out_dir)


class Terminated(Exception):
    """A local run ended by SIGTERM (its workers stopped)."""


@contextlib.contextmanager
def ending_on_sigterm() -> Any:
    """SIGTERM cancels the current task, so that its `finally` blocks run (a local run's stop its
    worker processes, which the signal's default action would leave behind), and `Terminated`
    is raised in its place."""
    task = asyncio.current_task()
    terminated = False

    def cancel() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    try:
        with on_sigterm(cancel):
            yield
    except asyncio.CancelledError:
        if terminated:
            raise Terminated("ended by SIGTERM") from None
        raise


async def _run_workers(coordinator: Coordinator, server: Any, port: int, plan: Plan, out_dir: Path) -> dict[str, Any]:
    workers_dir = out_dir / "workers"
    workers_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i in range(plan.config.workers):
            # The child gets its own descriptor of the log; ours is closed once it is spawned.
            with open(workers_dir / f"worker-{i}.log", "wb") as log_file:  # noqa: ASYNC230 - a local file, opened once
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "threepc.worker",
                        "--coordinator", f"127.0.0.1:{port}",
                        "--worker-id", str(i),
                        "--report", str(workers_dir / f"worker-{i}.json"),
                        stdout=log_file, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                )
        run = asyncio.ensure_future(coordinator.run())
        waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(procs)}
        pending = set(waits)
        can_continue = not (coordinator.agg.needs_all and plan.config.absent_policy == "wait")
        died: dict[int, int] = {}
        while not run.done():
            done, _ = await asyncio.wait({run, *pending}, return_when=asyncio.FIRST_COMPLETED)
            for task in done & pending:
                pending.discard(task)
                i = waits[task]
                if task.result() == 0 or run.done():
                    continue
                last_words = _last_line(workers_dir / f"worker-{i}.log")
                if not can_continue or not pending or not coordinator.all_ready.is_set():
                    run.cancel()
                    why = "" if pending else " (no worker is left)"
                    if not can_continue and coordinator.all_ready.is_set():
                        why = f" ({plan.config.method.name} needs every worker and absent_policy is 'wait')"
                    raise ThreePCError(f"worker {i} exited with code {task.result()}{why}: {last_words}")
                died[i] = task.result()
                log.warning("worker %d exited with code %d (%s); the run goes on without it", i, task.result(), last_words)
        await run
        codes = await asyncio.gather(*(p.wait() for p in procs))
        for i, code in enumerate(codes):
            if code != 0 and i not in died:
                raise ThreePCError(f"worker {i} exited with code {code}: {_last_line(workers_dir / f'worker-{i}.log')}")
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await server.stop(5)
    summary = coordinator_summary(coordinator)
    summary["x_final"] = coordinator.agg.x
    for entry in summary["lost_workers"]:
        if entry["worker_id"] in died:
            entry["exit_code"] = died[entry["worker_id"]]  # its process's, as the log line said
    for entry in summary["per_worker"]:
        report = workers_dir / f"worker-{entry['worker_id']}.json"
        worker_meter = json.loads(report.read_text())["meter"] if report.exists() else None
        entry["worker_meter"] = worker_meter
        entry["meters_agree"] = worker_meter is not None and _mirror(worker_meter) == entry["meter"]
    return summary


def _mirror(worker_meter: dict[str, Any]) -> dict[str, Any]:
    """A worker's meter seen from the coordinator's side (sent <-> received)."""
    return {
        "sent_bytes": worker_meter["received_bytes"],
        "received_bytes": worker_meter["sent_bytes"],
        "messages_sent": worker_meter["messages_received"],
        "messages_received": worker_meter["messages_sent"],
    }


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
