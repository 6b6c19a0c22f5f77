"""The dashboard of a real run: a coordinator and two worker processes on loopback, the page in
headless Chromium, and /metrics against the coordinator's own meters.

Needs chromium, chromedriver (Debian: `apt-get install chromium chromium-driver`) and selenium;
skips with that reason when one is missing.
"""

from __future__ import annotations

import asyncio
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

    def __init__(self, config: dict[str, Any]):
        self.plan = plan(config_mod.parse(config))
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


def _start_workers(run: LiveRun, logs: Path) -> list[subprocess.Popen]:
    procs = []
    for i in range(run.plan.config.workers):
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
