"""The coordinator's live dashboard, served from the coordinator's own asyncio loop.

    /            the page: static/index.html, dashboard.js and a vendored uPlot (no CDN)
    /api/state   a JSON snapshot: config, plan, workers, finished flag, and the rows of rounds
                 >= `?since=N` (default 0), so that the page fetches increments
    /events      Server-Sent Events: every `interval_s`, the rows since the last event and the
                 workers' state; the stream ends with the event that says the run has finished
    /metrics     Prometheus text exposition from this dashboard's own CollectorRegistry: per
                 worker, threepc_{payload_bits,payload_value_bits,updates,skips,absent,late,
                 refused,resyncs}_total and threepc_wire_{received,sent}_bytes_total{category};
                 the run's round, figures, workers connected and gone; threepc_run_info; and the
                 process's own process_* and python_info
    /healthz     "ok"

Nothing here writes to the coordinator. Every handler runs in the loop that owns the
coordinator, so each snapshot is consistent: no round closes in the middle of one.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from threepc.common.errors import ConfigError
from threepc.common.wire import CONTROL, DIAGNOSTICS, ROUND
from threepc.server.coordinator import Coordinator
from threepc.server.plot import describe

STATIC = Path(__file__).parent / "static"
CATEGORIES = (ROUND, DIAGNOSTICS, CONTROL)
HEARTBEAT_S = 15.0  # an SSE comment this often keeps idle proxies from closing the stream

_COORDINATOR = web.AppKey("coordinator", Coordinator)
_STOPPING = web.AppKey("stopping", asyncio.Event)
_INTERVAL = web.AppKey("interval_s", float)
_REGISTRY = web.AppKey("registry", CollectorRegistry)


# ---------------------------------------------------------------------- what the page sees


def worker_state(coordinator: Coordinator, worker_id: int) -> dict[str, Any]:
    """One worker as the coordinator sees it; `up` is what it received, `down` what it sent.

    state: "waiting" (no stream yet), "joining" (joined, not ready), "connected",
    "gone" (its stream failed: `error` says why), "done" (the run finished with it).
    lag: rounds the coordinator has closed since this worker's last update was applied.
    absent: rounds closed without its update; late and refused: its updates refused (too late
    for their round; malformed or a duplicate); resyncs: dense iterates sent on its Resync.
    """
    link = coordinator.links.get(worker_id)
    meter = coordinator.agg.meters[worker_id]
    entry: dict[str, Any] = {
        "worker_id": worker_id,
        "state": "waiting",
        "peer": None,
        "rows": None,
        "last_round": None,
        "lag": None,
        "error": None,
        "bits": meter.bits,
        "value_bits": meter.value_bits,
        "messages": meter.messages,
        "skips": meter.skips,
        "absent": meter.absent,
        "late": coordinator.late[worker_id],
        "refused": coordinator.refused[worker_id],
        "resyncs": coordinator.resyncs[worker_id],
        "up_bytes": dict.fromkeys(CATEGORIES, 0),
        "down_bytes": dict.fromkeys(CATEGORIES, 0),
    }
    if link is None:
        return entry
    if link.error is not None:
        state = "gone"
    elif coordinator.finished.is_set():
        state = "done"
    else:
        state = "connected" if link.ready else "joining"
    entry.update(
        state=state,
        peer=link.peer,
        rows=link.rows,
        last_round=link.last_round if link.last_round >= 0 else None,
        lag=max(0, coordinator.agg.t - 1 - link.last_round),
        error=str(link.error) if link.error is not None else None,
        up_bytes={c: link.meter.received.get(c, 0) for c in CATEGORIES},
        down_bytes={c: link.meter.sent.get(c, 0) for c in CATEGORIES},
    )
    return entry


def snapshot(
    coordinator: Coordinator, since: int = 0, *, with_config: bool = True
) -> dict[str, Any]:
    """The run now: its workers, and its rows of rounds >= `since`; `next` is the next `since`."""
    rows = coordinator.rows
    start = bisect.bisect_left(rows, since, key=lambda row: row["round"])
    started = coordinator.started_at
    if coordinator.finished.is_set() and rows:
        elapsed: float | None = rows[-1]["elapsed_s"]  # the run's, not the dashboard's lifetime
    else:
        elapsed = time.perf_counter() - started if started is not None else None
    state: dict[str, Any] = {
        "round": coordinator.agg.t,  # rounds closed so far
        "rounds_planned": coordinator.config.rounds,
        "workers_expected": coordinator.config.workers,
        "started": started is not None,
        "elapsed_s": elapsed,
        "finished": coordinator.finished.is_set(),
        "workers": [worker_state(coordinator, i) for i in range(coordinator.config.workers)],
        "since": since,
        "next": rows[-1]["round"] + 1 if rows else since,
        "rows": rows[start:],
    }
    if with_config:
        plan = coordinator.plan
        state["config"] = coordinator.config.model_dump(mode="json")
        state["plan"] = {
            "dim": plan.dim,
            "gamma": plan.gamma,
            "dataset": plan.dataset,
            "stand_in": plan.stand_in,  # the page says "synthetic stand-in" in a banner
            "downlink": plan.downlink,
        }
    return state


# ---------------------------------------------------------------------- Prometheus


class CoordinatorCollector(Collector):
    """Reads the coordinator's meters at scrape time; every per-worker series exists from the start."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        c = self.coordinator
        workers = [worker_state(c, i) for i in range(c.config.workers)]
        latest = next(
            (row for row in reversed(c.rows) if row.get("grad_norm_sq") is not None), None
        )

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge(
            "threepc_round", "Rounds the coordinator has closed (the round now collected).", c.agg.t
        )
        yield gauge("threepc_rounds_planned", "Rounds the run's config asks for.", c.config.rounds)
        yield gauge(
            "threepc_finished",
            "1 once the run has ended (finished or stopped).",
            c.finished.is_set(),
        )
        yield gauge("threepc_workers_expected", "Workers the run needs (n).", c.config.workers)
        yield gauge(
            "threepc_workers_connected",
            "Workers ready and streaming.",
            sum(w["state"] == "connected" for w in workers),
        )
        if c.started_at is not None:
            yield gauge(
                "threepc_elapsed_seconds",
                "Seconds since round 0 started.",
                time.perf_counter() - c.started_at,
            )
        yield gauge(
            "threepc_workers_gone",
            "Workers whose stream failed and who have not rejoined.",
            sum(w["state"] == "gone" for w in workers),
        )
        if latest is not None:
            yield gauge(
                "threepc_grad_norm_sq",
                "||grad f(x^t)||^2 at the latest round with diagnostics.",
                latest["grad_norm_sq"],
            )
            yield gauge(
                "threepc_loss", "f(x^t) at the latest round with diagnostics.", latest["loss"]
            )
            if latest.get("diag_workers") is not None:
                yield gauge(
                    "threepc_diagnostics_workers",
                    "Workers whose figures grad_norm_sq and loss are over (n when none is missing).",
                    latest["diag_workers"],
                )
        plan = c.plan
        yield InfoMetricFamily(
            "threepc_run",
            "The run: method, compressor, n, d, downlink, the data trained on, and whether that "
            "is a synthetic stand-in for a named data set that was not found.",
            value={
                "method": describe(c.config.method.model_dump(mode="json")),
                "compressor": describe(c.config.compressor.model_dump(mode="json")),
                "n": str(c.config.workers),
                "d": str(plan.dim),
                "downlink": plan.downlink,
                "data": plan.dataset,
                "stand_in": str(plan.stand_in).lower(),
            },
        )

        per_worker: list[tuple[str, str, str]] = [
            (
                "threepc_payload_bits",
                "Bits of the method's messages, indices and flags included.",
                "bits",
            ),
            (
                "threepc_payload_value_bits",
                "Bits of the values alone (the papers' convention).",
                "value_bits",
            ),
            ("threepc_updates", "Update messages applied.", "messages"),
            ("threepc_skips", "Updates that were skips (lazy methods).", "skips"),
            (
                "threepc_absent",
                "Rounds closed without the worker's update (it was late or gone).",
                "absent",
            ),
            ("threepc_late", "Updates refused because their round had closed.", "late"),
            (
                "threepc_refused",
                "Messages refused as malformed (or a second update for a round), never applied.",
                "refused",
            ),
            ("threepc_resyncs", "Dense iterates sent on the worker's Resync.", "resyncs"),
        ]
        for name, doc, key in per_worker:
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for w in workers:
                family.add_metric([str(w["worker_id"])], w[key])
            yield family

        for name, doc, key in [
            (
                "threepc_wire_received_bytes",
                "Bytes the coordinator received from a worker (gRPC frame included).",
                "up_bytes",
            ),
            (
                "threepc_wire_sent_bytes",
                "Bytes the coordinator sent to a worker (gRPC frame included).",
                "down_bytes",
            ),
        ]:
            family = CounterMetricFamily(name, doc, labels=["worker", "category"])
            for w in workers:
                for category in CATEGORIES:
                    family.add_metric([str(w["worker_id"]), category], w[key][category])
            yield family

        last_round = GaugeMetricFamily(
            "threepc_worker_last_round",
            "Latest round of a worker's applied update.",
            labels=["worker"],
        )
        lag = GaugeMetricFamily(
            "threepc_worker_lag_rounds",
            "Rounds closed since a worker's latest applied update.",
            labels=["worker"],
        )
        for w in workers:
            if w["last_round"] is not None:
                last_round.add_metric([str(w["worker_id"])], w["last_round"])
            if w["lag"] is not None:
                lag.add_metric([str(w["worker_id"])], w["lag"])
        yield last_round
        yield lag


# ---------------------------------------------------------------------- handlers


def _since(request: web.Request) -> int:
    """Where to start: an EventSource's Last-Event-ID on reconnect, else `?since=`, else 0."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("since", "0")
    try:
        since = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"since: expected a round number, got {raw!r}") from None
    if since < 0:
        raise web.HTTPBadRequest(text=f"since: expected a round number >= 0, got {since}")
    return since


async def _json(payload: dict[str, Any]) -> bytes:
    # A long run's first fetch can be large; encode it off the loop the rounds run in.
    if len(payload.get("rows", ())) > 2000:
        return await asyncio.to_thread(lambda: json.dumps(payload).encode())
    return json.dumps(payload).encode()


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _state(request: web.Request) -> web.Response:
    body = await _json(snapshot(request.app[_COORDINATOR], _since(request)))
    return web.Response(
        body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def _events(request: web.Request) -> web.StreamResponse:
    coordinator, stopping = request.app[_COORDINATOR], request.app[_STOPPING]
    since = _since(request)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    last_workers: list[dict[str, Any]] | None = None
    last_write = time.monotonic()
    try:
        await response.write(b"retry: 2000\n\n")
        while True:
            last_look = stopping.is_set()  # a stopping dashboard still sends what changed
            state = snapshot(coordinator, since, with_config=False)
            if state["rows"] or state["workers"] != last_workers or state["finished"]:
                since, last_workers = state["next"], state["workers"]
                data = (await _json(state)).decode()
                await response.write(f"id: {since}\nevent: state\ndata: {data}\n\n".encode())
                last_write = time.monotonic()
            elif time.monotonic() - last_write > HEARTBEAT_S:
                await response.write(b": heartbeat\n\n")
                last_write = time.monotonic()
            if state["finished"] or last_look:
                break
            try:
                await asyncio.wait_for(stopping.wait(), request.app[_INTERVAL])
            except TimeoutError:
                pass
    except ConnectionError:
        pass  # the page went away
    return response


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(coordinator: Coordinator, *, interval_s: float = 0.25) -> web.Application:
    """The dashboard's aiohttp application, for `coordinator` (tests may serve it themselves)."""
    app = web.Application()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(CoordinatorCollector(coordinator))
    # The coordinator process itself (CPU, memory, open files; Python's version), in this
    # registry: the global one would mix in whatever else the process imported.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    app[_COORDINATOR] = coordinator
    app[_REGISTRY] = registry
    app[_STOPPING] = asyncio.Event()
    app[_INTERVAL] = interval_s
    app.router.add_get("/", _page)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/events", _events)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_static("/static/", STATIC)
    return app


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) -> (host, port); port 0 asks the OS for a free one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"dashboard address: expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def start_dashboard(
    coordinator: Coordinator, address: str = "127.0.0.1:8080", *, interval_s: float = 0.25
) -> tuple[web.AppRunner, int]:
    """Serve the dashboard of `coordinator` on `address` in the running loop; returns the bound port."""
    host, port = parse_address(address)
    runner = web.AppRunner(
        make_app(coordinator, interval_s=interval_s), access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(f"dashboard: cannot listen on {address}: {err.strerror or err}") from None
    return runner, runner.addresses[0][1]


async def stop_dashboard(runner: web.AppRunner) -> None:
    """End the event streams (each sends what changed last), then close the listener."""
    runner.app[_STOPPING].set()
    await runner.cleanup()
