"""deploy/k8s rendered by kubectl's kustomize, validated offline against the Kubernetes schemas,
and checked to agree with deploy/docker-compose.yml, deploy/Dockerfile and the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from functools import cache
from typing import Any

import pytest

from tests.conftest import ROOT, threepc

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extra"
)

DEPLOY = ROOT / "deploy"
# 1.28 is the oldest release with the apps.kubernetes.io/pod-index label; 1.30 the one we name.
KUBERNETES_VERSIONS = ("1.28.0", "1.30.0")
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH (its built-in kustomize renders deploy/k8s)")
    r = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return tuple(doc for doc in yaml.safe_load_all(r.stdout) if doc)


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in rendered()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the render"
    return found[0]


def container(kind: str) -> dict[str, Any]:
    (c,) = one(kind)["spec"]["template"]["spec"]["containers"]
    return c


def compose_service(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"][name]


@cache
def cli_help(command: str) -> str:
    r = threepc(command, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


def flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("-")]


def env_names(c: dict[str, Any]) -> set[str]:
    return {e["name"] for e in c.get("env", [])}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_for_kubernetes(version: str) -> None:
    kinds = sorted(d["kind"] for d in rendered())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
        "Service",
        "StatefulSet",
    ]
    for doc in rendered():
        # Raises on an unknown field, a wrong type or a missing required field.
        kubernetes_validate.validate(doc, version, strict=True)


def test_coordinator_and_workers_run_the_compose_commands_with_flags_the_cli_has() -> None:
    coordinator, worker = container("Deployment"), container("StatefulSet")
    # The coordinator's command is the same in both; the workers' differ only in the address.
    assert coordinator["args"] == compose_service("coordinator")["command"]
    assert flags(worker["args"]) == flags(compose_service("worker")["command"])
    assert (
        coordinator["args"][:2] == ["serve", "/etc/threepc/run.toml"]
        and worker["args"][0] == "worker"
    )
    for args in (coordinator["args"], worker["args"]):
        listed = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", cli_help(args[0])))
        assert set(flags(args)) <= listed, f"threepc {args[0]} lacks {set(flags(args)) - listed}"
    for env in ("THREEPC_TOKEN",):
        assert env in cli_help("serve") and env in cli_help("worker")
    assert "THREEPC_WORKER_ID" in cli_help("worker")


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_ports_agree_across_cli_args_compose_dockerfile_service_and_probe() -> None:
    coordinator = container("Deployment")
    args = coordinator["args"]
    grpc_port, dashboard_port = (
        int(arg(args, "--listen").rsplit(":", 1)[1]),
        int(arg(args, "--dashboard").rsplit(":", 1)[1]),
    )
    assert (grpc_port, dashboard_port) == (50051, 8080)
    assert {p["name"]: p["containerPort"] for p in coordinator["ports"]} == {
        "grpc": 50051,
        "dashboard": 8080,
    }
    service = one("Service", "threepc-coordinator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": 50051,
        "dashboard": 8080,
    }
    assert (
        service["spec"]["selector"].items()
        <= one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    # Ready when grpc.health.v1 answers on the gRPC port.
    assert coordinator["readinessProbe"]["grpc"]["port"] == grpc_port
    compose_ports = {p.rsplit(":", 1)[1] for p in compose_service("coordinator")["ports"]}
    assert compose_ports == {"50051", "8080"}
    assert re.search(r"^EXPOSE 50051 8080$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    # The workers dial the Service at its gRPC port.
    host, port = arg(container("StatefulSet")["args"], "--coordinator").rsplit(":", 1)
    assert (host, int(port)) == (service["metadata"]["name"], grpc_port)


def test_image_mounts_and_environment_agree_with_compose() -> None:
    default_image = re.fullmatch(
        r"\$\{THREEPC_IMAGE:-(.+)\}", compose_service("coordinator")["image"]
    )
    assert default_image
    for kind, service in (("Deployment", "coordinator"), ("StatefulSet", "worker")):
        c, s = container(kind), compose_service(service)
        assert c["image"] == default_image.group(1)
        # Kubernetes only: the pod ordinal as worker id, and lingering after the run (its
        # controllers restart a process that exits; compose does not).
        assert env_names(c) - {"THREEPC_WORKER_ID", "THREEPC_LINGER"} == set(s["environment"])
        assert next(e for e in c["env"] if e["name"] == "THREEPC_LINGER")["value"] == "1"
        token = next(e for e in c["env"] if e["name"] == "THREEPC_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "threepc-token", "key": "token"}
        data_dir = next(e for e in c["env"] if e["name"] == "THREEPC_DATA_DIR")["value"]
        assert data_dir == s["environment"]["THREEPC_DATA_DIR"] == "/data"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/data"]["readOnly"] is True
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True  # compose: read_only
        assert s["read_only"] is True
    c = container("Deployment")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    compose_mounts = {
        re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1]
        for v in compose_service("coordinator")["volumes"]
    }
    assert {"/etc/threepc/run.toml", "/out", "/data"} <= compose_mounts
    assert arg(c["args"], "--out") == "/out" and "/out" in mounts
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert (
        volumes[mounts["/etc/threepc"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    )
    assert (
        volumes[mounts["/out"]]["persistentVolumeClaim"]["claimName"]
        == one("PersistentVolumeClaim")["metadata"]["name"]
    )


def test_run_config_is_the_example_and_worker_count_is_the_replicas() -> None:
    config_map = one("ConfigMap")
    assert config_map["metadata"]["name"].startswith("threepc-run-")  # hashed: edits roll the pods
    text = config_map["data"]["run.toml"]
    assert text == (DEPLOY / "example.toml").read_text(), (
        "deploy/k8s/run.toml drifted from deploy/example.toml"
    )
    assert one("StatefulSet")["spec"]["replicas"] == tomllib.loads(text)["workers"]
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["replicas"] == [
        {"name": "threepc-worker", "count": tomllib.loads(text)["workers"]}
    ]


def test_worker_id_is_the_pod_ordinal_of_a_parallel_statefulset() -> None:
    statefulset = one("StatefulSet")
    worker_id = next(e for e in container("StatefulSet")["env"] if e["name"] == "THREEPC_WORKER_ID")
    assert worker_id["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    headless = one("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert one("Deployment")["spec"]["replicas"] == 1
