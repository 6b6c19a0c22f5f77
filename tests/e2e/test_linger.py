"""`serve --linger` and `worker --linger`: processes that stay up after the run (Kubernetes)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import threepc, write_config

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lingering_coordinator_keeps_serving_and_turns_late_workers_away(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", 'workers = 1\nrounds = 5\n[data]\ndataset = "synthetic"\nrows = 40\ndim = 6\n'
    )
    port = free_port()
    out = tmp_path / "out"
    server = subprocess.Popen(
        [sys.executable, "-m", "threepc.server.cli", "serve", str(config), "--listen", f"127.0.0.1:{port}",
         "--out", str(out), "-q", "--no-dashboard", "--linger"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        first = threepc("worker", "--coordinator", f"127.0.0.1:{port}", timeout=60)
        assert first.returncode == 0, first.stderr
        deadline = time.monotonic() + 30
        while not (out / "summary.json").exists():  # written when the run ends, before lingering
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert json.loads((out / "summary.json").read_text())["rounds"] == 5
        assert server.poll() is None  # still up
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        late = threepc("worker", "--coordinator", f"127.0.0.1:{port}", timeout=60)
        assert late.returncode == 0 and "already finished" in late.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.wait()
