"""deploy/docker-compose.yml on a real container engine: one coordinator and 4 scaled workers.

Builds the wheelhouse and the image (BASE=$THREEPC_BASE_IMAGE), starts the cluster with TLS
(deploy/docker-compose.tls.yml) on a real LibSVM data set mounted at /data, waits for the
coordinator container to exit and compares the metrics in the mounted folder with the same config
run in-process on this host. Then a second run: a worker killed mid-run is restarted and rejoins,
the coordinator lingers after the run (THREEPC_LINGER), and `logs` and `down` work in a shell
without THREEPC_TOKEN. Needs a Docker-compatible engine at $DOCKER_HOST and docker-compose on this
host (the second run kills a container's process by its host pid); here
`shared/tools/container-engine up` provides both, and `container-engine env` the variables.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from tests.conftest import (
    ROOT,
    SHARED_DATA,
    figures,
    read_rows,
    requires_shared_data,
    threepc,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
trustme = pytest.importorskip("trustme")

DEPLOY = ROOT / "deploy"
WORKERS = 4
ROUNDS = 30
CONFIG = f"""
workers = {WORKERS}
rounds = {ROUNDS}
seed = 3
method = "ef21"
[compressor]
name = "top_k"
k = 2
[problem]
name = "logreg_nonconvex"
lam = 0.1
[data]
dataset = "australian_scale"
"""
# The second run: long enough (each worker waits THROTTLE_S before each update) to kill a worker in it.
RESTART_ROUNDS = 150
RESTART_CONFIG = CONFIG.replace(f"workers = {WORKERS}", "workers = 2").replace(
    f"rounds = {ROUNDS}", f"rounds = {RESTART_ROUNDS}"
)
THROTTLE_S = 0.1


# ------------------------------------------------------------------ the engine's HTTP API


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _engine(method: str, path: str, timeout: float = 30) -> tuple[int, Any]:
    """One request to the Docker-compatible API at $DOCKER_HOST (unix:// or tcp://)."""
    host = urlsplit(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    conn: http.client.HTTPConnection
    if host.scheme == "unix":
        conn = _UnixConnection(host.path, timeout)
    else:
        conn = http.client.HTTPConnection(
            host.hostname or "localhost", host.port or 2375, timeout=timeout
        )
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body) if body else None
    except ValueError:
        return response.status, body.decode(errors="replace")


def _why_no_engine() -> str | None:
    if shutil.which("docker-compose") is None:
        return "docker-compose not on PATH (run shared/tools/container-engine up)"
    if "DOCKER_HOST" not in os.environ and not Path("/var/run/docker.sock").exists():
        return (
            "no container engine: DOCKER_HOST unset and no /var/run/docker.sock "
            '(run shared/tools/container-engine up; eval "$(shared/tools/container-engine env)")'
        )
    try:
        status, _ = _engine("GET", "/_ping", timeout=5)
    except OSError as err:
        return f"container engine at {os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')} does not answer: {err}"
    return None if status == 200 else f"container engine answered /_ping with HTTP {status}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_exited(container: str, deadline: float) -> int:
    """The container's exit code once it has exited (polling: the engine's /wait varies)."""
    while True:
        status, info = _engine("GET", f"/containers/{container}/json")
        assert status == 200, f"inspect {container}: HTTP {status} {info}"
        state = info["State"]
        if state["Status"] in ("exited", "dead"):
            return int(state["ExitCode"])
        assert time.monotonic() < deadline, f"container {container} still {state['Status']}"
        time.sleep(1)


# ------------------------------------------------------------------ the cluster


class Compose:
    """docker-compose on a copy of deploy/ (so the wheelhouse and runs stay out of the tree)."""

    def __init__(self, files: list[Path], env: dict[str, str]):
        self.files, self.env = files, env

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            ["docker-compose", *(f"-f{f}" for f in self.files), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check:
            assert r.returncode == 0, f"docker-compose {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r

    def ids(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Compose, dict[str, Path]]]:
    """The image, built once for the module, and the first run's folders."""
    reason = _why_no_engine()
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("compose")
    folder = tmp_path / "deploy"
    folder.mkdir()
    for name in ("Dockerfile", ".dockerignore", "docker-compose.yml", "docker-compose.tls.yml"):
        shutil.copy(DEPLOY / name, folder / name)

    # The wheelhouse pins what this venv has, so the image computes with the same numpy.
    constraints = tmp_path / "constraints.txt"
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    constraints.write_text(
        "".join(
            line + "\n" for line in freeze.splitlines() if not line.lower().startswith("threepc")
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            str(ROOT),
            "-w",
            str(folder / "wheelhouse"),
            "-c",
            str(constraints),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    wheels = sorted((folder / "wheelhouse").iterdir())
    (ours,) = [w for w in wheels if w.name.startswith("threepc-")]
    assert not [w for w in wheels if w.name.lower().startswith("torch-")], (
        "the image takes no torch"
    )

    paths = {
        "config": write_config(tmp_path / "run.toml", CONFIG),
        "out": tmp_path / "out",
        "data": tmp_path / "data",
        "local": tmp_path / "local",
    }
    paths["out"].mkdir()
    paths["data"].mkdir()
    shutil.copy(SHARED_DATA / "australian_scale.bz2", paths["data"])  # only the mounted folder has it
    # TLS: the coordinator's certificate names the host the workers dial, `coordinator`.
    paths["tls"] = tmp_path / "tls"
    paths["tls"].mkdir()
    ca = trustme.CA()
    issued = ca.issue_cert("coordinator")
    ca.cert_pem.write_to_path(paths["tls"] / "ca.crt")
    issued.cert_chain_pems[0].write_to_path(paths["tls"] / "tls.crt")
    issued.private_key_pem.write_to_path(paths["tls"] / "tls.key")
    # The reference: the same config in-process on this host, run by the very wheel the image
    # installs (ahead of the editable install on the path), so no edit of the tree can come between.
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(ours),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    r = threepc(
        "run",
        str(paths["config"]),
        "--out",
        str(paths["local"]),
        "--in-process",
        "-q",
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
            "THREEPC_DATA_DIR": str(paths["data"]),
        },
    )
    assert r.returncode == 0, r.stderr
    build_id = secrets.token_hex(6)
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"threepc-e2e-{build_id}",
        "THREEPC_IMAGE": f"threepc-e2e:{build_id}",
        "BASE": os.environ.get("THREEPC_BASE_IMAGE", "python:3.11-slim"),
        "THREEPC_TOKEN": secrets.token_hex(16),
        "THREEPC_CONFIG": str(paths["config"]),
        "THREEPC_OUT_DIR": str(paths["out"]),
        "THREEPC_DATA_DIR": str(paths["data"]),
        "THREEPC_UID": str(os.getuid()),
        "THREEPC_GID": str(os.getgid()),
        "THREEPC_BIND": "127.0.0.1",
        "THREEPC_GRPC_PORT": str(_free_port()),
        "THREEPC_DASHBOARD_PORT": str(_free_port()),
        "THREEPC_TLS_DIR": str(paths["tls"]),
    }
    for name in ("THREEPC_LINGER", "THREEPC_THROTTLE"):
        env.pop(name, None)
    # A label on every image the build makes, so that the build cache goes with the test.
    override = folder / "labels.yml"
    override.write_text(
        f"services:\n  coordinator:\n    build:\n      labels:\n        threepc.e2e: '{build_id}'\n"
    )
    compose = Compose(
        [folder / "docker-compose.yml", folder / "docker-compose.tls.yml", override], env
    )
    try:
        started = time.monotonic()
        compose("build", "coordinator", timeout=600)
        print(f"compose cluster: build {time.monotonic() - started:.0f} s")
        yield compose, paths
    finally:
        compose("down", "-v", "--rmi", "all", "--remove-orphans", timeout=120, check=False)
        filters = quote(json.dumps({"label": [f"threepc.e2e={build_id}"]}))
        _engine("POST", f"/images/prune?filters={filters}", timeout=120)


def _without(compose: Compose, *names: str) -> Compose:
    """The same cluster seen from a shell without these variables."""
    return Compose(compose.files, {k: v for k, v in compose.env.items() if k not in names})


@requires_shared_data("australian_scale")
def test_compose_cluster_of_scaled_workers_equals_the_in_process_run(
    cluster: tuple[Compose, dict[str, Path]],
) -> None:
    compose, paths = cluster
    started = time.monotonic()

    # What the cluster cannot run without is refused in one line, exit code 2, nothing started:
    # a join token, and an out folder the coordinator's user can write.
    for missing, line in (
        (("THREEPC_TOKEN",), "threepc: error: THREEPC_TOKEN is not set: "),
        (
            ("THREEPC_UID", "THREEPC_GID"),
            (
                "threepc: error: THREEPC_OUT_DIR (/out) is not writable by uid 10001, whom the coordinator"
                " runs as: export THREEPC_UID=$(id -u) THREEPC_GID=$(id -g) as its owner"
            ),
        ),
    ):
        r = _without(compose, *missing)(
            "run", "--rm", "--no-deps", "-T", "coordinator", check=False
        )
        assert r.returncode == 2, f"{missing}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert [ln for ln in (r.stdout + r.stderr).splitlines() if "threepc" in ln][-1].startswith(
            line
        ), r
        assert "Traceback" not in r.stdout + r.stderr
    assert not list(paths["out"].iterdir())

    compose("up", "-d", "coordinator")
    # The coordinator waits for its workers; its dashboard answers on the published port.
    url = f"http://127.0.0.1:{compose.env['THREEPC_DASHBOARD_PORT']}/api/state"
    deadline, state = time.monotonic() + 60, None
    while state is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                state = json.loads(response.read())
        except OSError:
            assert time.monotonic() < deadline, (
                f"dashboard {url} did not answer:\n{compose('logs').stdout}"
            )
            time.sleep(1)
    assert state["workers_expected"] == WORKERS and state["started"] is False

    # A worker without the cluster's token is turned away (and takes no worker id).
    refused = compose("run", "--rm", "-T", "-e", "THREEPC_TOKEN=wrong", "worker", check=False)
    assert refused.returncode != 0 and "token" in refused.stdout + refused.stderr, refused

    compose("up", "-d", "--no-recreate", "--scale", f"worker={WORKERS}")
    workers = compose.ids("worker")
    assert len(workers) == WORKERS
    (coordinator,) = compose.ids("coordinator")
    deadline = time.monotonic() + 300
    codes = [_wait_exited(coordinator, deadline)] + [_wait_exited(w, deadline) for w in workers]
    assert codes == [0] * (1 + WORKERS), f"exit codes {codes}:\n{compose('logs').stdout}"
    print(f"compose cluster: run {time.monotonic() - started:.0f} s")

    rows = read_rows(paths["out"])
    assert [row["round"] for row in rows] == list(range(ROUNDS))
    summary = json.loads((paths["out"] / "summary.json").read_text())
    per_worker = summary["per_worker"]
    assert sorted(w["worker_id"] for w in per_worker) == list(range(WORKERS))  # ids assigned 0..3
    for w in per_worker:
        assert w["bits"] > 0 and w["last_round"] == ROUNDS - 1
        assert w["meter"]["received_bytes"]["round"] > 0 and w["meter"]["sent_bytes"]["round"] > 0

    local_rows = read_rows(paths["local"])
    assert figures(rows) == [row["grad_norm_sq"] for row in local_rows]
    assert [row["bits_up_per_worker"] for row in rows] == [
        row["bits_up_per_worker"] for row in local_rows
    ]
    # A shell without the token reads the logs and takes the cluster down.
    no_token = _without(compose, "THREEPC_TOKEN")
    assert "distributed run: " in no_token("logs", "coordinator").stdout
    no_token("down")
    assert compose.ids("coordinator") == compose.ids("worker") == []


@requires_shared_data("australian_scale")
def test_a_killed_compose_worker_restarts_and_rejoins_and_a_lingering_coordinator_goes_with_down(
    cluster: tuple[Compose, dict[str, Path]], tmp_path: Path
) -> None:
    compose, _ = cluster
    out = tmp_path / "out2"
    out.mkdir()
    throttle = tmp_path / "throttle.yml"
    throttle.write_text(
        f"services:\n  worker:\n    environment:\n      THREEPC_THROTTLE: '{THROTTLE_S}'\n"
    )
    compose = Compose(
        [*compose.files, throttle],
        {
            **compose.env,
            "THREEPC_CONFIG": str(write_config(tmp_path / "restart.toml", RESTART_CONFIG)),
            "THREEPC_OUT_DIR": str(out),
            "THREEPC_LINGER": "1",
        },
    )
    compose("up", "-d", "--scale", "worker=2")
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_rows(out)) >= 20):
        assert time.monotonic() < deadline, compose("logs").stdout
        time.sleep(0.5)
    # As the kernel's OOM killer would: SIGKILL to the worker's process, not a `docker kill` (a
    # stop by hand, which no restart policy undoes).
    victim = compose.ids("worker")[0]
    status, info = _engine("GET", f"/containers/{victim}/json")
    assert status == 200 and info["State"]["Pid"] > 0, info
    os.kill(info["State"]["Pid"], signal.SIGKILL)

    while not (out / "summary.json").exists():  # written when the run ends, before lingering
        assert time.monotonic() < deadline, compose("logs").stdout
        time.sleep(1)
    codes = [_wait_exited(w, deadline) for w in compose.ids("worker")]
    logs = compose("logs").stdout
    assert codes == [0, 0], f"exit codes {codes}:\n{logs}"
    status, info = _engine("GET", f"/containers/{victim}/json")
    assert info["RestartCount"] >= 1, info["State"]
    assert "rejoined" in logs, logs
    summary = json.loads((out / "summary.json").read_text())
    assert [w["last_round"] for w in summary["per_worker"]] == [RESTART_ROUNDS - 1] * 2
    assert [row["round"] for row in read_rows(out)] == list(range(RESTART_ROUNDS))

    # THREEPC_LINGER reached the coordinator: after the run its dashboard still answers.
    (coordinator,) = compose.ids("coordinator")
    assert _engine("GET", f"/containers/{coordinator}/json")[1]["State"]["Status"] == "running"
    url = f"http://127.0.0.1:{compose.env['THREEPC_DASHBOARD_PORT']}/api/state"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read())["finished"] is True
    # ...until `down`, from a shell without the token.
    _without(compose, "THREEPC_TOKEN")("down")
    assert compose.ids("coordinator") == []
