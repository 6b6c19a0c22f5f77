"""The dashboard of a real run: a coordinator and two worker processes on loopback, the page in
headless Chromium, and /metrics against the coordinator's own meters.

Needs chromium, chromedriver (Debian: `apt-get install chromium chromium-driver`) and selenium;
skips with that reason when one is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from threepc.common import config as config_mod
from threepc.common.engine import plan
from threepc.common.wire import CONTROL, DIAGNOSTICS, ROUND
from threepc.server.coordinator import Coordinator, start_server
from threepc.server.dashboard import start_dashboard, stop_dashboard

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SCREENSHOT_FOR_LEAD = Path("/tmp/threepc-dashboard.png")
CONFIG: dict[str, Any] = {
    "workers": 2,
    "rounds": 400,
    "data": {"dataset": "synthetic", "rows": 400, "dim": 20},
    "compressor": {"name": "top_k", "k": 2},
}
T = TypeVar("T")


class LiveRun:
    """A Coordinator, its gRPC server and its dashboard in an event loop on a background thread."""

    def __init__(self, config: dict[str, Any], *, stand_in: bool = False):
        # stand_in: the plan of a run whose named data set was not found (the data loader marks
        # it so); here the synthetic set is marked by hand, as the page only reads the flag.
        self.plan = dataclasses.replace(plan(config_mod.parse(config)), stand_in=stand_in)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="coordinator", daemon=True
        )
        self.thread.start()
        self.call(self._start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.coordinator = Coordinator(self.plan)
        self.server, self.grpc_port = await start_server(self.coordinator, "127.0.0.1:0")
        self.runner, self.port = await start_dashboard(self.coordinator, "127.0.0.1:0")
        self.run = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self.coordinator.run()
        finally:
            await self.server.stop(5)

    async def wait_done(self) -> None:
        """The rounds are over and the gRPC server has stopped: the meters are final."""
        await asyncio.shield(self.run)

    async def meters(self) -> dict[str, Any]:
        """The coordinator's meters, read in its own loop."""
        c = self.coordinator
        return {
            str(i): {
                "sent": dict(link.meter.sent),
                "received": dict(link.meter.received),
                "bits": c.agg.meters[i].bits,
                "skips": c.agg.meters[i].skips,
                "absent": c.agg.meters[i].absent,
                "refused": c.refused[i],
                "late": c.late[i],
            }
            for i, link in c.links.items()
        }

    async def _stop(self) -> None:
        await stop_dashboard(self.runner)
        if not self.run.done():
            self.run.cancel()
        await asyncio.gather(self.run, return_exceptions=True)

    def close(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def _chrome(profile: Path) -> Any:
    """Headless Chromium under selenium, or skip saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    browser = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's own errors
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,1560",
        f"--user-data-dir={profile}",
    ]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


def _start_workers(
    run: LiveRun, logs: Path, ids: list[int] | None = None, *extra: str
) -> list[subprocess.Popen]:
    procs = []
    for i in range(run.plan.config.workers) if ids is None else ids:
        with open(logs / f"worker-{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "threepc.worker",
                        "--coordinator",
                        f"127.0.0.1:{run.grpc_port}",
                        "--worker-id",
                        str(i),
                        *extra,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            )
    return procs


def _worker_logs(logs: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted(logs.glob("worker-*.log"))
    )


def test_dashboard_follows_a_real_run(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome(tmp_path / "chromium-profile")
    run = LiveRun(CONFIG)
    procs: list[subprocess.Popen] = []
    rounds = CONFIG["rounds"]
    try:
        base = f"http://127.0.0.1:{run.port}"
        assert _get(f"{base}/healthz")[1].strip() == "ok"

        # The page's first fetch sees no rounds: every round it shows later came as an event.
        browser.get(f"{base}/")
        wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        wait.until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "waiting"
        )
        body = browser.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-first-round") == "-1"
        assert "top_k(k=2)" in browser.find_element(By.ID, "summary").text

        procs = _start_workers(run, tmp_path)
        round_el = browser.find_element(By.ID, "round")
        seen: set[int] = set()

        def latest_round(_: Any) -> bool:
            seen.add(int(round_el.get_attribute("data-round")))
            return max(seen) > 0

        wait.until(
            latest_round, message=f"the page never showed a round > 0\n{_worker_logs(tmp_path)}"
        )
        wait.until(
            lambda b: latest_round(b) and body.get_attribute("data-state") == "finished",
            message=f"the page never showed the run finished\n{_worker_logs(tmp_path)}",
        )
        assert int(round_el.get_attribute("data-round")) == rounds - 1
        assert int(round_el.text.replace(",", "")) == rounds  # rounds closed
        assert int(body.get_attribute("data-events")) >= 2  # increments, not one reload
        for chart in ["chart-grad", "chart-cumulative", "chart-per-round", "chart-skips"]:
            assert browser.find_elements(By.CSS_SELECTOR, f"#{chart} canvas"), (
                f"{chart} has no canvas"
            )
        states = [
            tr.get_attribute("data-state")
            for tr in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr[data-worker]")
        ]
        assert states == ["done", "done"]
        # A healthy run on the data it names: no stand-in banner, no figures over fewer workers.
        assert not browser.find_element(By.ID, "stand-in").is_displayed()
        assert not browser.find_element(By.ID, "figures-note").is_displayed()
        assert browser.find_element(By.ID, "diag-share").text.endswith("%")

        assert _page_errors(browser) == []
        screenshot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(screenshot))
        shutil.copyfile(screenshot, SCREENSHOT_FOR_LEAD)

        for p in procs:
            assert p.wait(30) == 0, _worker_logs(tmp_path)
        run.call(run.wait_done())
        meters = run.call(run.meters())

        # /metrics: per-worker byte counters equal the coordinator's meters.
        from prometheus_client.parser import text_string_to_metric_families

        content_type, text = _get(f"{base}/metrics")
        assert content_type.startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        for worker, m in meters.items():
            assert m["received"][ROUND] > 0 and m["sent"][ROUND] > 0
            for category in (ROUND, DIAGNOSTICS, CONTROL):
                labels = (("category", category), ("worker", worker))
                assert samples[("threepc_wire_received_bytes_total", labels)] == m["received"].get(
                    category, 0
                )
                assert samples[("threepc_wire_sent_bytes_total", labels)] == m["sent"].get(
                    category, 0
                )
            assert samples[("threepc_payload_bits_total", (("worker", worker),))] == m["bits"]
            assert samples[("threepc_skips_total", (("worker", worker),))] == m["skips"]
        assert samples[("threepc_round", ())] == rounds
        assert samples[("threepc_workers_connected", ())] == 0  # the run is over
        assert samples[("threepc_finished", ())] == 1

        # /api/state?since=N returns the increment only.
        state = json.loads(_get(f"{base}/api/state?since={rounds - 10}")[1])
        assert [row["round"] for row in state["rows"]] == list(range(rounds - 10, rounds))
        assert state["finished"] and state["config"]["compressor"] == {"name": "top_k", "k": 2}
    finally:
        browser.quit()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        run.close()


def _page_errors(browser: Any) -> list[str]:
    """What the page logged as an error (a script that threw leaves part of the page stale)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _column(browser: Any, worker: int, header: str) -> str:
    """The text of the workers table's cell of `worker` under `header`."""
    from selenium.webdriver.common.by import By

    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#workers thead th")]
    cells = browser.find_elements(By.CSS_SELECTOR, f'#workers tr[data-worker="{worker}"] td')
    return cells[headers.index(header)].text


def test_a_stand_in_a_refused_worker_and_a_late_one_are_on_the_page_and_in_metrics(
    tmp_path: Path,
) -> None:
    """Worker 1 sends a malformed update in round 0 and is gone for good; worker 0 is late in
    round 5; the data is marked a synthetic stand-in. The page and /metrics say each of these."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.e2e.test_security import RawClient, dense_update
    from threepc.proto.threepc_pb2 import Join, Ready, WorkerMessage

    config = {**CONFIG, "rounds": 200, "round_timeout_s": 0.5}
    browser = _chrome(tmp_path / "chromium-profile")
    run = LiveRun(config, stand_in=True)
    procs: list[subprocess.Popen] = []
    try:
        base = f"http://127.0.0.1:{run.port}"
        browser.get(f"{base}/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        body = browser.find_element(By.TAG_NAME, "body")
        wait.until(lambda b: body.get_attribute("data-state") == "waiting")
        banner = browser.find_element(By.ID, "stand-in")
        assert banner.is_displayed() and banner.text.startswith("Synthetic stand-in:")
        assert run.plan.dataset in banner.text
        assert "(synthetic stand-in)" in browser.find_element(By.ID, "summary").text

        procs = _start_workers(run, tmp_path, [0], "--throttle", "1.0", "--throttle-round", "5")

        async def hostile() -> None:
            raw = RawClient(f"127.0.0.1:{run.grpc_port}")
            await raw.send(WorkerMessage(join=Join(requested_id=1)))
            assert (await raw.receive()).WhichOneof("kind") == "welcome"
            # Its shard described as the run's own (synthetic): only its update is malformed.
            ready = Ready(rows=200, dimension=run.plan.dim, synthetic=True, data_source="synthetic")
            await raw.send(WorkerMessage(ready=ready))
            first = await raw.receive()
            assert first.WhichOneof("kind") == "round" and first.round.round == 0
            await raw.send(dense_update(0, 1, b"\x00" * 12))  # not d values: malformed
            await raw.status()
            await raw.close()

        asyncio.run(hostile())
        wait.until(
            lambda b: body.get_attribute("data-state") == "finished",
            message=f"the page never showed the run finished\n{_worker_logs(tmp_path)}",
        )
        assert procs[0].wait(30) == 0, _worker_logs(tmp_path)
        run.call(run.wait_done())
        meters = run.call(run.meters())
        rows = run.coordinator.rows

        # The figures are over worker 0 alone from round 0, and the page says so.
        assert all(r["diag_workers"] <= 1 for r in rows)
        note = browser.find_element(By.ID, "figures-note")
        assert note.is_displayed() and note.text.startswith(
            "Figures over 1 of 2 workers from round 0:"
        ), note.text
        states = [
            tr.get_attribute("data-state")
            for tr in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr[data-worker]")
        ]
        assert states == ["done", "gone"]
        error = browser.find_element(By.CSS_SELECTOR, "#workers td.error").text
        assert error.startswith("worker #1 is gone, absent from round 0:")
        absent_0 = sum(0 in r["absent_workers"] for r in rows)
        assert absent_0 >= 1 and meters["0"]["late"] >= 1  # its round-5 update came too late
        assert [_column(browser, 1, h) for h in ("Refused", "Absent")] == ["1", f"{len(rows):,}"]
        assert [_column(browser, 0, h) for h in ("Late", "Absent")] == [
            f"{meters['0']['late']:,}",
            f"{absent_0:,}",
        ]
        # What diagnostics cost, beside the totals: the share of all bytes up.
        last = rows[-1]
        diag, up = last["diag_bytes_up"], last["wire_bytes_up"]
        assert browser.find_element(By.ID, "diag-share").text == f"{100 * diag / (diag + up):.1f} %"
        tile = browser.find_element(By.ID, "diag-share").find_element(By.XPATH, "..")
        assert ("warn" in tile.get_attribute("class").split()) == (diag > up)
        assert _page_errors(browser) == []
        screenshot = tmp_path / "dashboard-lost.png"
        assert browser.save_screenshot(str(screenshot))
        shutil.copyfile(screenshot, SCREENSHOT_FOR_LEAD.with_name("threepc-dashboard-lost.png"))

        # /metrics counts the same, per worker, and names the run.
        samples = _samples(_get(f"{base}/metrics")[1])
        for worker in ("0", "1"):
            labels = (("worker", worker),)
            for name, key in [
                ("threepc_refused_total", "refused"),
                ("threepc_late_total", "late"),
                ("threepc_absent_total", "absent"),
            ]:
                assert samples[(name, labels)] == meters[worker][key], (name, worker)
        assert samples[("threepc_refused_total", (("worker", "1"),))] == 1
        assert samples[("threepc_absent_total", (("worker", "1"),))] == len(rows)
        resyncs = getattr(run.coordinator, "resyncs", None)
        if resyncs is not None:  # counted by coordinators that rate-limit Resync
            assert samples[("threepc_resyncs_total", (("worker", "0"),))] == resyncs[0]
        info = [labels for (name, labels) in samples if name == "threepc_run_info"]
        assert [dict(labels) for labels in info] == [
            {
                "method": "ef21",
                "compressor": "top_k(k=2)",
                "n": "2",
                "d": "20",
                "downlink": run.plan.downlink,
                "data": run.plan.dataset,
                "stand_in": "true",
            }
        ]
        assert samples[("threepc_run_info", info[0])] == 1
        assert samples[("threepc_workers_gone", ())] == 1
        assert samples[("threepc_diagnostics_workers", ())] == 1
        # The coordinator process itself, from the dashboard's registry.
        assert samples[("process_resident_memory_bytes", ())] > 0
        assert samples[("process_cpu_seconds_total", ())] > 0
        assert any(name == "python_info" for name, _ in samples)
    finally:
        browser.quit()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        run.close()
