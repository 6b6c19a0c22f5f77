"""deploy/docker-compose.yml and deploy/Dockerfile, checked without a container engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra")

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not on PATH (shared/tools/container-engine up installs it)",
)


def compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("THREEPC_", "COMPOSE_"))}
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), *args, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **(env or {})},
    )


@needs_compose
def test_compose_file_validates_and_resolves_its_defaults() -> None:
    r = compose_config(env={"THREEPC_TOKEN": "t0ken"})
    assert r.returncode == 0, r.stderr
    config: dict[str, Any] = yaml.safe_load(r.stdout)
    coordinator, worker = config["services"]["coordinator"], config["services"]["worker"]
    assert coordinator["image"] == worker["image"] == "threepc:latest"
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
    }
    r = compose_config(env=env)
    assert r.returncode == 0, r.stderr
    coordinator = yaml.safe_load(r.stdout)["services"]["coordinator"]
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


@needs_compose
def test_compose_refuses_to_start_a_cluster_without_a_join_token(tmp_path: Path) -> None:
    # --project-directory elsewhere: a deploy/.env with a token must not make this pass.
    r = compose_config("--project-directory", str(tmp_path))
    assert r.returncode != 0
    assert "THREEPC_TOKEN" in r.stderr


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
