"""deploy/k8s (and its TLS overlay deploy/k8s-tls) rendered by kubectl's kustomize, validated
offline against the Kubernetes schemas, and checked to agree with deploy/docker-compose.yml,
deploy/Dockerfile, deploy/example.toml and the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, threepc

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extra"
)

DEPLOY = ROOT / "deploy"
# 1.28: the oldest release we name (Job pods carry batch.kubernetes.io/controller-uid since 1.27).
KUBERNETES_VERSIONS = ("1.28.0", "1.30.0")
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOB_UID = "metadata.labels['batch.kubernetes.io/controller-uid']"


@cache
def rendered(folder: str = "k8s") -> tuple[dict[str, Any], ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH (its built-in kustomize renders deploy/k8s)")
    r = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return tuple(doc for doc in yaml.safe_load_all(r.stdout) if doc)


def plain(name: str) -> dict[str, Any]:
    """A manifest applied with `kubectl apply -f`, outside the kustomization."""
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text())


def one(kind: str, name: str | None = None, folder: str = "k8s") -> dict[str, Any]:
    found = [
        d
        for d in rendered(folder)
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the render of {folder}"
    return found[0]


def pod(role: str, folder: str = "k8s") -> dict[str, Any]:
    return one("Job", f"threepc-{role}", folder)["spec"]["template"]["spec"]


def container(role: str, folder: str = "k8s") -> dict[str, Any]:
    (c,) = pod(role, folder)["containers"]
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


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def env(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def run_config() -> dict[str, Any]:
    return tomllib.loads((DEPLOY / "example.toml").read_text())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(version: str) -> None:
    kinds = sorted(d["kind"] for d in rendered())
    assert kinds == ["ConfigMap", "Job", "Job", "PodDisruptionBudget", "Service"]
    assert sorted(d["kind"] for d in rendered("k8s-tls")) == kinds
    for doc in (*rendered(), *rendered("k8s-tls"), plain("volume.yaml"), plain("copy.yaml")):
        # Raises on an unknown field, a wrong type or a missing required field.
        kubernetes_validate.validate(doc, version, strict=True)


def test_coordinator_and_workers_run_the_compose_commands_with_flags_the_cli_has() -> None:
    coordinator, worker = container("coordinator")["args"], container("worker")["args"]
    # The same as compose but for Kubernetes' own: the run's folder on the shared volume, and the
    # plaintext health port for kubelet's probe.
    assert coordinator[:2] == ["serve", "/etc/threepc/run.toml"] and worker[0] == "worker"
    without_health = (
        coordinator[: coordinator.index("--health-listen")]
        + coordinator[coordinator.index("--health-listen") + 2 :]
    )
    compose = compose_service("coordinator")["command"]
    assert arg(compose, "--out") == "/out" and arg(coordinator, "--out") == "/out/$(THREEPC_RUN)"
    assert [a.replace("/out/$(THREEPC_RUN)", "/out") for a in without_health] == compose
    assert flags(worker) == flags(compose_service("worker")["command"])
    for args in (coordinator, worker):
        listed = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", cli_help(args[0])))
        assert set(flags(args)) <= listed, f"threepc {args[0]} lacks {set(flags(args)) - listed}"
    for name in ("THREEPC_TOKEN", "THREEPC_TLS_CERT", "THREEPC_TLS_KEY"):
        assert name in cli_help("serve")
    for name in ("THREEPC_TOKEN", "THREEPC_TLS_CA", "THREEPC_WORKER_ID"):
        assert name in cli_help("worker")


def test_a_run_is_a_pair_of_jobs_that_complete_and_a_restarted_coordinator_resumes_its_own_folder() -> (
    None
):
    for role in ("coordinator", "worker"):
        job = one("Job", f"threepc-{role}")
        # A failed process is restarted (a bounded number of times); one that exits 0 is done.
        assert pod(role)["restartPolicy"] == "OnFailure" and 0 < job["spec"]["backoffLimit"] <= 20
        # Lingering would keep a Job from ever completing, and its workers from a new run.
        assert "THREEPC_LINGER" not in env(container(role))
    coordinator = container("coordinator")
    # Every pod of this Job (restarted or replaced) writes to the same folder, a new Job to a new one.
    assert env(coordinator)["THREEPC_RUN"] == {"fieldRef": {"fieldPath": JOB_UID}}
    assert env(coordinator)["THREEPC_AUTO_RESUME"] == "1"
    assert compose_service("coordinator")["environment"]["THREEPC_AUTO_RESUME"] == "1"
    assert one("Job", "threepc-coordinator")["spec"].get("parallelism", 1) == 1
    # SIGTERM lets the open round finish and writes the checkpoint before the kill.
    assert pod("coordinator")["terminationGracePeriodSeconds"] >= 60
    config = run_config()
    assert 0 < config["checkpoint_every"] < config["rounds"]  # something to resume from


def test_workers_are_an_indexed_job_whose_index_is_the_worker_id_and_the_count_agrees() -> None:
    job = one("Job", "threepc-worker")["spec"]
    n = run_config()["workers"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == n
    assert env(container("worker"))["THREEPC_WORKER_ID"] == {
        "fieldRef": {"fieldPath": COMPLETION_INDEX}
    }
    # Long enough to wait out a coordinator pod that is replaced and resumes.
    assert float(arg(container("worker")["args"], "--reconnect-timeout")) >= 120
    budget = one("PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == n - 1  # a drain takes one worker at a time
    labels = one("Job", "threepc-worker")["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    coordinator_labels = one("Job", "threepc-coordinator")["spec"]["template"]["metadata"]["labels"]
    assert not budget["selector"]["matchLabels"].items() <= coordinator_labels.items()


def test_ports_agree_across_cli_args_compose_dockerfile_service_and_probe() -> None:
    coordinator = container("coordinator")
    args = coordinator["args"]
    grpc_port, dashboard_port, health_port = (
        int(arg(args, flag).rsplit(":", 1)[1])
        for flag in ("--listen", "--dashboard", "--health-listen")
    )
    assert (grpc_port, dashboard_port, health_port) == (50051, 8080, 50052)
    assert {p["name"]: p["containerPort"] for p in coordinator["ports"]} == {
        "grpc": 50051,
        "dashboard": 8080,
        "health": 50052,
    }
    service = one("Service", "threepc-coordinator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": 50051,
        "dashboard": 8080,
    }
    assert (
        service["spec"]["selector"].items()
        <= one("Job", "threepc-coordinator")["spec"]["template"]["metadata"]["labels"].items()
    )
    # Ready when grpc.health.v1 answers on the plaintext health port, with or without TLS.
    for folder in ("k8s", "k8s-tls"):
        assert container("coordinator", folder)["readinessProbe"]["grpc"]["port"] == health_port
    compose_ports = {p.rsplit(":", 1)[1] for p in compose_service("coordinator")["ports"]}
    assert compose_ports == {"50051", "8080"}
    assert re.search(r"^EXPOSE 50051 8080$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    # The workers dial the Service at its gRPC port.
    host, port = arg(container("worker")["args"], "--coordinator").rsplit(":", 1)
    assert (host, int(port)) == (service["metadata"]["name"], grpc_port)


def test_the_image_is_pinned_to_the_package_version_in_both() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    default_image = re.fullmatch(
        r"\$\{THREEPC_IMAGE:-(.+)\}", compose_service("coordinator")["image"]
    )
    assert default_image and default_image.group(1) == f"threepc:{version}"
    for role in ("coordinator", "worker"):
        assert container(role)["image"] == f"threepc:{version}"
    assert not plain("copy.yaml")["spec"]["containers"][0]["image"].endswith(":latest")


def test_mounts_and_environment_agree_with_compose() -> None:
    for role in ("coordinator", "worker"):
        c, s = container(role), compose_service(role)
        token = env(c)["THREEPC_TOKEN"]
        assert token["secretKeyRef"] == {"name": "threepc-token", "key": "token"}
        assert env(c)["THREEPC_DATA_DIR"] == s["environment"]["THREEPC_DATA_DIR"] == "/data"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/data"]["readOnly"] is True
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True  # compose: read_only
        assert s["read_only"] is True
    c = container("coordinator")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    compose_mounts = {
        re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1]
        for v in compose_service("coordinator")["volumes"]
    }
    assert {"/etc/threepc/run.toml", "/out", "/data"} <= compose_mounts
    assert "/out" in mounts
    volumes = {v["name"]: v for v in pod("coordinator")["volumes"]}
    assert (
        volumes[mounts["/etc/threepc"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    )


def test_the_results_volume_outlives_delete_k_and_the_copy_pod_mounts_it_read_only() -> None:
    assert not [d for d in rendered() if d["kind"] == "PersistentVolumeClaim"]  # delete -k keeps it
    claim = plain("volume.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    c = container("coordinator")
    out = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/out")
    volumes = {v["name"]: v for v in pod("coordinator")["volumes"]}
    assert volumes[out]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    copy = plain("copy.yaml")["spec"]
    (volume,) = copy["volumes"]
    assert volume["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"],
        "readOnly": True,
    }
    assert copy["containers"][0]["volumeMounts"] == [
        {"name": volume["name"], "mountPath": "/out", "readOnly": True}
    ]
    # deploy/README.md copies with it.
    readme = (DEPLOY / "README.md").read_text()
    assert (
        "kubectl apply -f deploy/k8s/copy.yaml" in readme
        and "kubectl cp threepc-copy:/out/" in readme
    )


def test_run_config_is_the_example_with_a_sparse_diagnostics_cadence() -> None:
    config_map = one("ConfigMap")
    assert config_map["metadata"]["name"].startswith("threepc-run-")  # hashed: an edit is a new one
    assert config_map["data"]["run.toml"] == (DEPLOY / "example.toml").read_text(), (
        "deploy/k8s/run.toml drifted from deploy/example.toml"
    )
    # Each diagnostics round uploads a dense float64 gradient per worker: not every round.
    assert run_config()["diagnostics_every"] >= 10


def secrets_of(spec: dict[str, Any]) -> set[str]:
    return {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}


def test_tls_overlay_gives_the_key_to_the_coordinator_alone_and_the_ca_to_the_workers() -> None:
    coordinator, worker = pod("coordinator", "k8s-tls"), pod("worker", "k8s-tls")
    assert secrets_of(coordinator) == {"threepc-tls-server"}
    assert secrets_of(worker) == {"threepc-tls-ca"}
    for spec, variables in (
        (coordinator, ("THREEPC_TLS_CERT", "THREEPC_TLS_KEY")),
        (worker, ("THREEPC_TLS_CA",)),
    ):
        (c,) = spec["containers"]
        tls_volume = next(v["name"] for v in spec["volumes"] if "secret" in v)
        mount = next(m for m in c["volumeMounts"] if m["name"] == tls_volume)
        assert mount["readOnly"] is True
        for name in variables:
            assert Path(env(c)[name]).parent == Path(mount["mountPath"])
    # The keys `kubectl create secret tls` writes, and the CA file of the generic secret.
    assert {
        Path(env(container("coordinator", "k8s-tls"))[n]).name
        for n in ("THREEPC_TLS_CERT", "THREEPC_TLS_KEY")
    } == {
        "tls.crt",
        "tls.key",
    }
    assert Path(env(container("worker", "k8s-tls"))["THREEPC_TLS_CA"]).name == "ca.crt"
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl create secret tls threepc-tls-server --cert=tls.crt --key=tls.key" in readme
    assert "kubectl create secret generic threepc-tls-ca --from-file=ca.crt" in readme
    # Everything else is the plain run's.
    assert container("coordinator", "k8s-tls")["args"] == container("coordinator")["args"]
    assert container("worker", "k8s-tls")["args"] == container("worker")["args"]
