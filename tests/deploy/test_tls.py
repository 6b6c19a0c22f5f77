"""TLS as deployed: a plaintext health port for kubelet's probes, the certificate recipe of
deploy/README.md, and the worker's one line when the certificate names another host.

Real processes on loopback (the CLI as a user runs it); certificates from `trustme` or from the
README's own openssl commands.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ROOT, threepc, write_config
from tests.e2e.test_faults import SYNTHETIC, free_port, spawn
from threepc.common.wire import TRAIN_METHOD

pytestmark = pytest.mark.e2e

trustme = pytest.importorskip("trustme")

CONFIG = f"workers = 1\nrounds = 3\nseed = 1\n{SYNTHETIC}"


def certificates(folder: Path, host: str) -> dict[str, Path]:
    """A CA's certificate, and a key and certificate it signed for `host`, as PEM files."""
    ca = trustme.CA()
    issued = ca.issue_cert(host)
    paths = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    issued.cert_chain_pems[0].write_to_path(paths["cert"])
    issued.private_key_pem.write_to_path(paths["key"])
    return paths


def health(channel: grpc.Channel) -> int:
    return (
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    )


def wait_serving(address: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, log.read_text()
        try:
            with grpc.insecure_channel(address) as channel:
                if health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            assert time.monotonic() < deadline, f"no health answer on {address}:\n{log.read_text()}"
            time.sleep(0.2)


def serve_tls(
    config: Path, out: Path, port: int, tls: dict[str, Path], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`threepc serve` with TLS on 127.0.0.1:port, as a process."""
    return spawn(
        "serve", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(out), "-q", "--no-dashboard",
        "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]), env=env, log=log,
    )


def test_a_tls_coordinator_answers_a_plaintext_probe_on_its_health_port_and_nothing_else(
    tmp_path: Path,
) -> None:
    tls = certificates(tmp_path, "localhost")
    config = write_config(tmp_path / "c.toml", CONFIG)
    port, health_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    server = serve_tls(config, tmp_path / "out", port, tls, log,
                       env={"THREEPC_HEALTH_LISTEN": f"127.0.0.1:{health_port}"})
    try:
        # What kubelet does: a plaintext grpc.health.v1 Check.
        wait_serving(f"127.0.0.1:{health_port}", server, log)
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(grpc.RpcError) as on_tls,
        ):
            health(channel)  # the TLS port cannot answer it: the reason for the health port
        assert on_tls.value.code() == grpc.StatusCode.UNAVAILABLE
        with (
            grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel,
            pytest.raises(grpc.RpcError) as train,
        ):
            next(iter(channel.stream_stream(TRAIN_METHOD)(iter([b""]), timeout=5)))
        assert train.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no training in plaintext
        right = threepc(
            "worker", "-c", f"localhost:{port}", "--tls-ca", str(tls["ca"]), timeout=120
        )
        assert right.returncode == 0, right.stderr
        assert server.wait(60) == 0, log.read_text()
    finally:
        server.kill()
        server.wait()
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel, pytest.raises(grpc.RpcError):
        health(channel)  # gone with the coordinator


def test_health_listen_on_an_address_it_cannot_bind_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", CONFIG)
    r = threepc(
        "serve",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--no-dashboard",
        "--health-listen",
        "no-such-host.invalid:1",
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "threepc: error: --health-listen: cannot listen on no-such-host.invalid:1"
    )


def test_a_certificate_for_another_host_is_one_line_naming_the_subject_alt_name(
    tmp_path: Path,
) -> None:
    # The Kubernetes name, dialed as localhost: the CA is right, the name is not.
    tls = certificates(tmp_path, "threepc-coordinator")
    config = write_config(tmp_path / "c.toml", CONFIG)
    port, health_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    server = serve_tls(config, tmp_path / "out", port, tls, log,
                       env={"THREEPC_HEALTH_LISTEN": f"127.0.0.1:{health_port}"})
    try:
        # Listening before the workers dial, however slow the machine: their one line is then
        # the handshake's, never the connect timeout's.
        wait_serving(f"127.0.0.1:{health_port}", server, log)
        by_name = threepc(
            "worker",
            "-c",
            f"localhost:{port}",
            "--tls-ca",
            str(tls["ca"]),
            "--connect-timeout",
            "30",
            timeout=120,
        )
        by_address = threepc(
            "worker",
            "-c",
            f"127.0.0.1:{port}",
            "--tls-ca",
            str(tls["ca"]),
            "--connect-timeout",
            "30",
            timeout=120,
        )
    finally:
        server.kill()
        server.wait()
    for r, dialed, entry in (
        (by_name, "localhost", "DNS:localhost"),
        (by_address, "127.0.0.1", "IP:127.0.0.1"),
    ):
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            (
                f"threepc: error: TLS handshake with {dialed}:{port} failed: the coordinator's certificate does "
                f"not name the host in {dialed}:{port}: its subjectAltName must list {entry} (reissue it with "
                "that name, or dial a name it lists)"
            )
        ]


def readme_recipe() -> str:
    """The openssl commands of deploy/README.md (the shell block that makes the CA)."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "deploy" / "README.md").read_text(), re.DOTALL)
    recipe = [b for b in blocks if "openssl req -x509" in b]
    assert len(recipe) == 1, "deploy/README.md has no (or several) certificate recipes"
    return recipe[0]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")
def test_the_readme_certificate_recipe_serves_tls_to_the_names_workers_dial(tmp_path: Path) -> None:
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_recipe()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    config = write_config(tmp_path / "c.toml", CONFIG)
    port, health_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    server = spawn(
        "serve",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--no-dashboard",
        "--tls-cert",
        str(tmp_path / "tls.crt"),
        "--tls-key",
        str(tmp_path / "tls.key"),
        "--health-listen",
        f"127.0.0.1:{health_port}",
        log=log,
    )
    try:
        wait_serving(f"127.0.0.1:{health_port}", server, log)
        trusted = grpc.ssl_channel_credentials((tmp_path / "ca.crt").read_bytes())
        # The names the workers dial: the Kubernetes Service, and the compose service.
        for name in ("threepc-coordinator", "coordinator"):
            options = [("grpc.ssl_target_name_override", name)]
            with grpc.secure_channel(f"127.0.0.1:{port}", trusted, options=options) as channel:
                assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        elsewhere = [("grpc.ssl_target_name_override", "elsewhere")]
        with (
            grpc.secure_channel(f"127.0.0.1:{port}", trusted, options=elsewhere) as channel,
            pytest.raises(grpc.RpcError),
        ):
            health(channel)  # and no other name
    finally:
        server.kill()
        server.wait()
    # What goes in the workers' Secret holds no private key.
    assert "PRIVATE KEY" not in (tmp_path / "ca.crt").read_text()
