"""deploy/docker-compose.yml (with deploy/docker-compose.tls.yml) and deploy/Dockerfile, checked
without a container engine: `docker-compose config`, and the services' entrypoint run by sh here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra")

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
TLS_FILE = DEPLOY / "docker-compose.tls.yml"
needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not on PATH (shared/tools/container-engine up installs it)",
)


def compose(
    *args: str, env: dict[str, str] | None = None, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("THREEPC_", "COMPOSE_"))}
    return subprocess.run(
        ["docker-compose", *(f"-f{f}" for f in files), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **(env or {})},
    )


def compose_config(
    *args: str, env: dict[str, str] | None = None, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> Any:
    r = compose(*args, "config", env=env, files=files)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@needs_compose
def test_compose_file_validates_and_resolves_its_defaults() -> None:
    config = compose_config(env={"THREEPC_TOKEN": "t0ken"})
    coordinator, worker = config["services"]["coordinator"], config["services"]["worker"]
    assert coordinator["image"] == worker["image"] == "threepc:0.1.0"
    assert coordinator["build"]["args"]["BASE"] == "python:3.11-slim"
    assert (
        coordinator["environment"]["THREEPC_TOKEN"]
        == worker["environment"]["THREEPC_TOKEN"]
        == "t0ken"
    )
    mounts = {v.split(":")[1]: v.split(":")[0] for v in coordinator["volumes"]}
    assert mounts["/etc/threepc/run.toml"] == str(DEPLOY / "example.toml")
    assert mounts["/out"] == str(DEPLOY / "runs") and mounts["/data"] == str(DEPLOY / "data")
    assert sorted(coordinator["ports"]) == ["127.0.0.1:50051:50051/tcp", "127.0.0.1:8080:8080/tcp"]
    # Workers are one scalable service: no fixed ids, names or host ports.
    assert "ports" not in worker and "container_name" not in worker
    assert "THREEPC_WORKER_ID" not in worker["environment"]
    # A failed worker starts again, a bounded number of times; a coordinator started again resumes.
    assert re.fullmatch(r"on-failure:[1-9]\d?", worker["restart"])
    assert coordinator["environment"]["THREEPC_AUTO_RESUME"] == "1"
    assert not coordinator["environment"]["THREEPC_LINGER"]  # the run ends, and so does `up`


@needs_compose
def test_compose_settings_come_from_the_environment(tmp_path: Path) -> None:
    env = {
        "THREEPC_TOKEN": "t",
        "THREEPC_CONFIG": str(tmp_path / "my.toml"),
        "THREEPC_OUT_DIR": str(tmp_path / "out"),
        "THREEPC_DATA_DIR": str(tmp_path / "data"),
        "THREEPC_BIND": "0.0.0.0",
        "THREEPC_GRPC_PORT": "6000",
        "THREEPC_DASHBOARD_PORT": "6001",
        "THREEPC_IMAGE": "registry.example/threepc:1",
        "BASE": "debian-python:x",
        "THREEPC_UID": "1000",
        "THREEPC_GID": "100",
        "THREEPC_LINGER": "1",
    }
    services = compose_config(env=env)["services"]
    coordinator = services["coordinator"]
    assert (
        coordinator["image"] == "registry.example/threepc:1" and coordinator["user"] == "1000:100"
    )
    assert coordinator["build"]["args"]["BASE"] == "debian-python:x"
    assert sorted(coordinator["ports"]) == ["0.0.0.0:6000:50051/tcp", "0.0.0.0:6001:8080/tcp"]
    assert {
        f"{tmp_path / 'my.toml'}:/etc/threepc/run.toml:ro",
        f"{tmp_path / 'out'}:/out:rw",
        f"{tmp_path / 'data'}:/data:ro",
    } <= set(coordinator["volumes"])
    # The dashboard outlives a short run when asked; workers end with the run all the same.
    assert coordinator["environment"]["THREEPC_LINGER"] == "1"
    assert "THREEPC_LINGER" not in services["worker"]["environment"]


@needs_compose
def test_logs_ps_and_down_read_the_file_in_a_shell_without_the_token(tmp_path: Path) -> None:
    # --project-directory elsewhere: a deploy/.env with a token must not make this pass.
    config = compose_config("--project-directory", str(tmp_path))
    assert config["services"]["worker"]["environment"]["THREEPC_TOKEN"] == ""


def entrypoint() -> list[str]:
    """The services' entrypoint as the container runs it (compose's `$$` is `$`)."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert services["coordinator"]["entrypoint"] == services["worker"]["entrypoint"]
    return [a.replace("$$", "$") for a in services["coordinator"]["entrypoint"]]


def run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The entrypoint under this host's sh, with this venv's threepc on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(
        [*entrypoint(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": path, **env},
    )


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_a_container_refuses_to_start_without_a_token_in_one_line() -> None:
    for command in (
        ["worker", "--coordinator", "coordinator:50051"],
        ["serve", "/etc/threepc/run.toml"],
    ):
        r = run_entrypoint(*command, env={"THREEPC_TOKEN": ""})
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.splitlines() == [
            (
                "threepc: error: THREEPC_TOKEN is not set: export THREEPC_TOKEN=$(openssl rand -hex 16) "
                "(or write THREEPC_TOKEN=... in deploy/.env) and run docker-compose up again"
            )
        ]
    # With a token it is the image's threepc, arguments and all.
    r = run_entrypoint("methods", env={"THREEPC_TOKEN": "t"})
    assert r.returncode == 0 and "ef21" in r.stdout, r.stderr


@pytest.mark.skipif(
    shutil.which("sh") is None or os.access("/out", os.W_OK),
    reason="no sh, or /out is writable here",
)
def test_a_coordinator_that_cannot_write_its_out_folder_says_whose_uid_to_set() -> None:
    r = run_entrypoint("serve", "/etc/threepc/run.toml", env={"THREEPC_TOKEN": "t"})
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        (
            f"threepc: error: THREEPC_OUT_DIR (/out) is not writable by uid {os.getuid()}, whom the coordinator "
            "runs as: export THREEPC_UID=$(id -u) THREEPC_GID=$(id -g) as its owner and run docker-compose up again"
        )
    ]


@needs_compose
def test_the_tls_override_adds_the_key_to_the_coordinator_the_ca_to_the_workers_and_keeps_the_data(
    tmp_path: Path,
) -> None:
    env = {
        "THREEPC_TOKEN": "t",
        "THREEPC_TLS_DIR": str(tmp_path),
        "THREEPC_DATA_DIR": str(tmp_path / "data"),
    }
    plain = compose_config(env=env)["services"]
    services = compose_config(env=env, files=(COMPOSE_FILE, TLS_FILE))["services"]
    tls = {
        "coordinator": {
            f"{tmp_path / 'tls.crt'}:/etc/threepc/tls/tls.crt:ro",
            f"{tmp_path / 'tls.key'}:/etc/threepc/tls/tls.key:ro",
        },
        "worker": {f"{tmp_path / 'ca.crt'}:/etc/threepc/tls/ca.crt:ro"},
    }
    for name, added in tls.items():
        assert f"{tmp_path / 'data'}:/data:ro" in services[name]["volumes"]
        assert set(services[name]["volumes"]) == set(plain[name]["volumes"]) | added
        for variable, path in services[name]["environment"].items():
            if variable.startswith("THREEPC_TLS_"):
                assert any(v.split(":")[1] == path for v in added)
    assert {"THREEPC_TLS_CERT", "THREEPC_TLS_KEY"} <= set(services["coordinator"]["environment"])
    assert "THREEPC_TLS_CA" in services["worker"]["environment"]


def test_dockerfile_installs_from_the_wheelhouse_only_and_never_torch() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.MULTILINE)
    assert "FROM ${BASE}" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"pip install[^\n]*", code)
    assert installs and all("--no-index" in i and "--find-links" in i for i in installs)
    assert "torch" not in code
    assert re.search(r"^EXPOSE 50051 8080$", text, re.MULTILINE)
    ignore = [
        line
        for line in (DEPLOY / ".dockerignore").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert ignore == ["*", "!wheelhouse"]  # the build context sends the wheelhouse alone
