"""The dashboard's routes against a Coordinator whose state the test sets by hand (no workers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from threepc.common import config as config_mod
from threepc.common.engine import plan
from threepc.common.errors import ConfigError, TransportError
from threepc.common.wire import CONTROL, DIAGNOSTICS, ROUND, Meter
from threepc.server.coordinator import Coordinator, WorkerLink
from threepc.server.dashboard import parse_address, snapshot, start_dashboard, stop_dashboard

CONFIG = {"workers": 3, "rounds": 10, "data": {"dataset": "synthetic", "rows": 60, "dim": 5}}


def _row(t: int) -> dict[str, Any]:
    return {
        "round": t,
        "grad_norm_sq": 1.0 / (t + 1),
        "loss": 0.5,
        "bits_up_per_worker": 40.0 * (t + 1),
        "value_bits_up_per_worker": 32.0 * (t + 1),
        "skips": t % 2,
        "wire_bytes_up": 100 * (t + 1),
        "wire_bytes_down": 300 * (t + 1),
        "diag_bytes_up": 50 * (t + 1),
        "control_bytes": 90,
        "elapsed_s": 0.01 * t,
    }


def _coordinator() -> Coordinator:
    """Worker 0 streaming, worker 1 gone, worker 2 not joined; rounds 0..4 closed."""
    c = Coordinator(plan(config_mod.parse(CONFIG)))
    for i, peer in [(0, "ipv4:10.0.0.1:5000"), (1, "ipv4:10.0.0.2:5000")]:
        meter = Meter()
        meter.count_received(CONTROL, 10 + i)
        meter.count_received(ROUND, 1000 + i)
        meter.count_received(DIAGNOSTICS, 500 + i)
        meter.count_sent(ROUND, 2000 + i)
        c.links[i] = WorkerLink(i, peer, meter=meter, rows=20, ready=True)
        c.agg.meters[i].bits, c.agg.meters[i].messages, c.agg.meters[i].skips = 200 + i, 5, i
    c.links[0].last_round, c.links[1].last_round = 4, 1
    c.refused[1], c.late[0] = 2, 1
    c.agg.meters[1].absent, c.agg.meters[2].absent = 3, 5
    c.links[1].error = TransportError("worker 1 closed its stream")
    c.rows.extend(_row(t) for t in range(5))
    c.agg.t = 5
    c.started_at = 0.0
    return c


def _serve(
    test: Callable[[Coordinator, str, aiohttp.ClientSession], Awaitable[None]], **kwargs: Any
) -> None:
    async def main() -> None:
        coordinator = _coordinator()
        runner, port = await start_dashboard(coordinator, "127.0.0.1:0", **kwargs)
        try:
            async with aiohttp.ClientSession() as session:
                await test(coordinator, f"http://127.0.0.1:{port}", session)
        finally:
            await stop_dashboard(runner)

    asyncio.run(main())


def test_snapshot_has_the_rows_since_and_each_workers_state() -> None:
    c = _coordinator()
    state = snapshot(c, 3)
    assert [row["round"] for row in state["rows"]] == [3, 4] and state["next"] == 5
    assert snapshot(c, 5, with_config=False)["rows"] == [] and "config" not in snapshot(
        c, 5, with_config=False
    )
    assert snapshot(c, 0)["config"]["workers"] == 3
    workers = state["workers"]
    assert [w["state"] for w in workers] == ["connected", "gone", "waiting"]
    assert [w["lag"] for w in workers] == [0, 3, None]
    assert workers[1]["error"] == "worker 1 closed its stream"
    assert workers[0]["up_bytes"] == {ROUND: 1005, DIAGNOSTICS: 505, CONTROL: 15}
    assert workers[0]["down_bytes"] == {ROUND: 2005, DIAGNOSTICS: 0, CONTROL: 0}
    assert [(w["absent"], w["late"], w["refused"]) for w in workers] == [
        (0, 1, 0),
        (3, 0, 2),
        (5, 0, 0),
    ]
    assert state["plan"]["stand_in"] is False and state["plan"]["downlink"] == c.plan.downlink
    c.finished.set()
    assert [w["state"] for w in snapshot(c)["workers"]] == ["done", "gone", "waiting"]
    assert snapshot(c)["elapsed_s"] == pytest.approx(0.04)  # the run's, frozen once it has ended


def test_routes_serve_page_state_health_and_static_files() -> None:
    async def test(c: Coordinator, base: str, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{base}/") as r:
            page = await r.text()
            assert (
                r.status == 200
                and "static/dashboard.js" in page
                and "static/uPlot.iife.min.js" in page
            )
        for name in [
            "dashboard.js",
            "dashboard.css",
            "uPlot.iife.min.js",
            "uPlot.min.css",
            "uPlot.LICENSE",
        ]:
            async with session.get(f"{base}/static/{name}") as r:
                assert r.status == 200 and len(await r.read()) > 100, name
        async with session.get(f"{base}/healthz") as r:
            assert r.status == 200 and (await r.text()).strip() == "ok"
        async with session.get(f"{base}/api/state?since=2") as r:
            state = await r.json()
            assert [row["round"] for row in state["rows"]] == [2, 3, 4] and state["plan"][
                "dim"
            ] == 5
        for bad in ["-1", "x"]:
            async with session.get(f"{base}/api/state?since={bad}") as r:
                assert r.status == 400 and "since" in await r.text()

    _serve(test)


def test_metrics_are_the_coordinators_meters_in_a_registry_of_its_own() -> None:
    async def test(c: Coordinator, base: str, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{base}/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=")
            text = await r.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        for i, link in c.links.items():
            for category in (ROUND, DIAGNOSTICS, CONTROL):
                labels = (("category", category), ("worker", str(i)))
                assert samples[
                    ("threepc_wire_received_bytes_total", labels)
                ] == link.meter.received.get(category, 0)
                assert samples[("threepc_wire_sent_bytes_total", labels)] == link.meter.sent.get(
                    category, 0
                )
        assert (
            samples[("threepc_wire_received_bytes_total", (("category", ROUND), ("worker", "2")))]
            == 0
        )
        assert samples[("threepc_payload_bits_total", (("worker", "1"),))] == 201
        assert samples[("threepc_skips_total", (("worker", "1"),))] == 1
        assert samples[("threepc_round", ())] == 5
        assert samples[("threepc_grad_norm_sq", ())] == pytest.approx(1 / 5)
        assert samples[("threepc_workers_connected", ())] == 1
        assert samples[("threepc_worker_lag_rounds", (("worker", "1"),))] == 3
        for name, values in [
            ("threepc_refused_total", [0, 2, 0]),
            ("threepc_late_total", [1, 0, 0]),
            ("threepc_absent_total", [0, 3, 5]),
        ]:
            assert [samples[(name, (("worker", str(i)),))] for i in range(3)] == values, name
        assert samples[("threepc_workers_gone", ())] == 1
        info = {
            "compressor": "top_k(k=1)",
            "d": "5",
            "data": c.plan.dataset,
            "downlink": c.plan.downlink,
            "method": "ef21",
            "n": "3",
            "stand_in": "false",
        }
        assert samples[("threepc_run_info", tuple(sorted(info.items())))] == 1
        assert samples[("process_cpu_seconds_total", ())] > 0
        assert (
            REGISTRY.get_sample_value("threepc_round") is None
        )  # the global registry is untouched

    _serve(test)


def test_resyncs_are_exported_per_worker() -> None:
    async def test(c: Coordinator, base: str, session: aiohttp.ClientSession) -> None:
        c.resyncs = [0, 4, 1]
        async with session.get(f"{base}/metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        assert families["threepc_resyncs"].type == "counter"
        assert [s.value for s in families["threepc_resyncs"].samples] == [0, 4, 1]
        async with session.get(f"{base}/api/state") as r:
            assert [w["resyncs"] for w in (await r.json())["workers"]] == [0, 4, 1]

    _serve(test)


async def _events(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """Every event of the stream at `url`, until the server ends it."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async with session.get(url, headers=headers or {}) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                current[key] = value
    return events


def test_events_push_increments_and_end_when_the_run_finishes() -> None:
    async def test(c: Coordinator, base: str, session: aiohttp.ClientSession) -> None:
        async def run_on() -> None:
            await asyncio.sleep(0.1)
            c.rows.append(_row(5))
            c.agg.t = 6
            await asyncio.sleep(0.1)
            c.finished.set()

        stream = asyncio.ensure_future(_events(session, f"{base}/events?since=3"))
        await run_on()
        events = await asyncio.wait_for(stream, 5)
        payloads = [json.loads(e["data"]) for e in events]
        rows = [row["round"] for p in payloads for row in p["rows"]]
        assert rows == [3, 4, 5]  # each row once, in order
        assert [e["id"] for e in events][:2] == ["5", "6"] and all(
            e["event"] == "state" for e in events
        )
        assert payloads[-1]["finished"] and not any(p["finished"] for p in payloads[:-1])

        # A reconnecting EventSource sends Last-Event-ID: the stream resumes there.
        again = await asyncio.wait_for(
            _events(session, f"{base}/events?since=0", {"Last-Event-ID": "5"}), 5
        )
        assert [[row["round"] for row in json.loads(e["data"])["rows"]] for e in again] == [[5]]

    _serve(test, interval_s=0.02)


def test_stopping_sends_the_last_change_then_ends_open_streams() -> None:
    async def main() -> None:
        coordinator = _coordinator()
        # A long interval: the stream is asleep when the dashboard stops, and must wake up.
        runner, port = await start_dashboard(coordinator, "127.0.0.1:0", interval_s=60)
        assert port > 0
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start_dashboard(coordinator, f"127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session:
            stream = asyncio.ensure_future(_events(session, f"http://127.0.0.1:{port}/events"))
            await asyncio.sleep(0.2)
            coordinator.rows.append(_row(5))
            coordinator.agg.t = 6
            await asyncio.wait_for(stop_dashboard(runner), 3)
            events = await asyncio.wait_for(stream, 3)
        rows = [[row["round"] for row in json.loads(e["data"])["rows"]] for e in events]
        assert rows == [[0, 1, 2, 3, 4], [5]]
        assert not json.loads(events[-1]["data"])["finished"]

    asyncio.run(main())


def test_addresses() -> None:
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address(":9000") == ("0.0.0.0", 9000)
    for bad in ["localhost", "host:port", "host:70000"]:
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_address(bad)
