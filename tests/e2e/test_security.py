"""Hostile input and limits: tokens, spoofed ids, malformed and oversize messages, TLS, health.

Most run real gRPC in this process (a Coordinator on loopback, and a raw stream that sends what a
hostile client would); one runs the CLI with TLS and a token as a user would. Certificates are
throwaway ones from `trustme`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import threepc, write_config
from tests.e2e.test_faults import (
    SYNTHETIC,
    free_port,
    make_plan,
    on_loopback,
    reference_x,
    spawn,
    worker,
)
from threepc.common import codec
from threepc.common.engine import WorkerNode, load_data, load_shard, local_problem
from threepc.common.errors import AuthError, TransportError
from threepc.common.wire import TRAIN_METHOD
from threepc.proto.threepc_pb2 import (
    Chunk,
    CoordinatorMessage,
    DenseVector,
    Diagnostics,
    Dtype,
    Join,
    Part,
    Ready,
    Resync,
    Update,
    WorkerMessage,
)
from threepc.server.coordinator import Coordinator
from threepc.worker.client import run_worker, wait_for_coordinator

pytestmark = pytest.mark.e2e

trustme = pytest.importorskip("trustme")

CONFIG = f'workers = 2\nrounds = 30\nseed = 1\nmethod = "ef21"\ncompressor = {{ name = "top_k", k = 2 }}\n{SYNTHETIC}'


class RawClient:
    """One Train stream that sends whatever it is told, as a hostile client would."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.stream_stream(TRAIN_METHOD)()

    async def send(self, message: WorkerMessage | bytes) -> None:
        await self.call.write(message if isinstance(message, bytes) else message.SerializeToString())

    async def receive(self) -> CoordinatorMessage:
        data = await self.call.read()
        assert data is not grpc.aio.EOF
        return CoordinatorMessage.FromString(data)

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """Read until the coordinator ends the stream; its status."""
        try:
            while await self.call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass
        return await self.call.code(), await self.call.details() or ""

    async def next_kinds(self, until: str) -> list[str]:
        """The kinds of the messages it gets, up to the first of kind `until`."""
        kinds: list[str] = []
        while not kinds or kinds[-1] != until:
            kinds.append((await self.receive()).WhichOneof("kind") or "")
        return kinds

    async def join(self, worker_id: int, token: str = "", dim: int = 10) -> CoordinatorMessage:
        """Join and get ready; returns the first Round."""
        await self.send(WorkerMessage(join=Join(requested_id=worker_id, token=token)))
        assert (await self.receive()).WhichOneof("kind") == "welcome"
        await self.send(WorkerMessage(ready=Ready(rows=100, dimension=dim)))
        return await self.receive()

    async def close(self) -> None:
        await self.channel.close()


def dense_update(t: int, worker_id: int, values: bytes) -> WorkerMessage:
    part = Part(dense=DenseVector(dtype=2, values=values))  # FLOAT32
    return WorkerMessage(update=Update(round=t, worker_id=worker_id, parts=[part]))


# ---------------------------------------------------------------------- tokens


def test_a_wrong_token_is_refused_before_any_gradient() -> None:
    the_plan = make_plan(CONFIG)

    async def main() -> tuple[Coordinator, grpc.StatusCode, str]:
        async with on_loopback(the_plan, token="s3cret") as (c, address):
            raw = RawClient(address)
            await raw.send(WorkerMessage(join=Join(requested_id=0, token="guess")))
            await raw.send(dense_update(0, 0, np.ones(10, "<f4").tobytes()))  # never read
            code, details = await raw.status()
            await raw.close()
            with pytest.raises(AuthError, match="join token missing or wrong"):
                await run_worker(worker(address, 1))  # no token at all
            return c, code, details

    c, code, details = asyncio.run(main())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "join token" in details
    assert c.links == {} and all(m.messages == 0 for m in c.agg.meters)


# ---------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "what, bad",
    [
        ("wrong length", lambda t: dense_update(t, 1, b"\x00" * 12)),
        ("NaN", lambda t: dense_update(t, 1, np.full(10, np.nan, "<f4").tobytes())),
        ("another worker's id", lambda t: dense_update(t, 0, np.ones(10, "<f4").tobytes())),
        ("not protobuf", lambda t: b"\xff\xff\xff\xff"),
    ],
)
def test_a_malformed_update_is_refused_counted_and_its_worker_may_rejoin(what: str, bad: Any) -> None:
    the_plan = make_plan(CONFIG)

    async def main() -> tuple[Coordinator, grpc.StatusCode, np.ndarray]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            honest = asyncio.ensure_future(run_worker(worker(address, 0, throttle_s=0.02)))
            raw = RawClient(address)
            first = await raw.join(1)
            assert first.WhichOneof("kind") == "round" and first.round.round == 0
            mirror_before = c.agg.mirrors[1].copy()
            await raw.send(bad(0))
            code, _ = await raw.status()
            await raw.close()
            await asyncio.gather(run, honest, run_worker(worker(address, 1)))  # worker 1 comes back
            return c, code, mirror_before

    c, code, mirror_before = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert c.refused == [0, 1]
    rows = c.rows
    assert rows[0]["refused"] == 1 and sum(r["refused"] for r in rows) == 1
    assert not mirror_before.any()
    assert rows[-1]["absent_workers"] == []  # the worker rejoined (in round 0 itself, if it was quick)
    # The whole run equals the replay with worker 1 absent where the rows say: nothing leaked in.
    assert np.array_equal(c.agg.x, reference_x(the_plan, rows))


HOSTILE_CONFIG = (
    'workers = 3\nrounds = 12\nseed = 2\nmethod = "3pcv1"\ncompressor = "identity"\n'
    f'{SYNTHETIC}[wire]\nvalue_dtype = "float64"\n'
)


@pytest.mark.parametrize(
    "state, t, parts, refused_at",
    [
        # Finite parts that pass the codec; their sum is not finite: refused when applied.
        ("float64", 1, [1.7e308, 1.7e308], "apply"),
        ("float32", 1, [3e38, 3e38], "apply"),
        # Finite in float64, beyond float32 state's range: refused at decode.
        ("float32", 0, [1e39], "decode"),
    ],
)
def test_a_finite_update_that_would_overflow_the_aggregate_is_refused_and_the_run_goes_on(
    state: str, t: int, parts: list[float], refused_at: str
) -> None:
    """3PCv1 with identity sends REPLACE(y, C(x - y)): two dense float64 parts, here from a
    hostile worker 2 (an honest round 0 first). It used to make x non-finite and end the run for
    everyone with DivergedError and no rows. Now it is refused and counted, worker 2 is absent
    for the round (refused at apply: its stream stays, and a Restore precedes its next Round),
    and the honest workers finish the run; x is what the in-process replay of the rows gives."""
    the_plan = make_plan(HOSTILE_CONFIG + f'iterate_dtype = "{state}"\n')
    config, d = the_plan.resolved, the_plan.dim
    shard = load_shard(config, 2, load_data(config))
    node = WorkerNode(config, 2, local_problem(config, shard, 2))

    async def main() -> tuple[Any, list[str], grpc.StatusCode | None]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            honest = [asyncio.ensure_future(run_worker(worker(address, i))) for i in (0, 1)]
            raw = RawClient(address)
            assert (await raw.join(2, dim=d)).round.round == 0
            if t > 0:  # round 0 as an honest worker 2 sends it
                message, (loss, grad) = node.round(0, the_plan.x0)  # type: ignore[misc]
                await raw.send(WorkerMessage(update=codec.message_to_proto(0, 2, message)))
                await raw.send(WorkerMessage(diagnostics=codec.fill_diagnostics(Diagnostics(), 0, 2, loss, grad)))
                assert (await raw.next_kinds("round"))[-1] == "round"
            hostile = [Part(dense=DenseVector(dtype=Dtype.FLOAT64, values=np.full(d, v, "<f8").tobytes())) for v in parts]
            await raw.send(WorkerMessage(update=Update(round=t, worker_id=2, mode=1, parts=hostile)))  # REPLACE
            gradient = np.zeros(d, "<f8").tobytes()
            await raw.send(WorkerMessage(diagnostics=Diagnostics(round=t, worker_id=2, dtype=Dtype.FLOAT64, gradient=gradient)))
            code, kinds = None, []
            if refused_at == "apply":
                kinds = await raw.next_kinds("round")
                await raw.call.done_writing()  # and goes away
            else:
                code, _ = await raw.status()
            await raw.close()
            await asyncio.gather(run, *honest)
            return c, kinds, code

    c, kinds, code = asyncio.run(main())
    rows = c.rows
    assert len(rows) == 12 and c.refused == [0, 0, 1]
    assert rows[t]["refused"] == 1 and sum(r["refused"] for r in rows) == 1
    assert all(r["absent_workers"] == [2] for r in rows[t:])
    if refused_at == "apply":
        assert kinds == ["restore", "round"]  # its state goes back to the mirror before round t + 1
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert np.isfinite(c.agg.x).all() and np.isfinite(c.agg.mirrors).all() and np.isfinite(c.agg.g_sum).all()
    assert all(r["grad_norm_sq"] is not None and np.isfinite(r["grad_norm_sq"]) for r in rows)
    assert np.array_equal(c.agg.x, reference_x(the_plan, rows))  # nothing of it reached the aggregate


def test_honest_updates_that_all_overflow_end_the_run_as_in_process() -> None:
    """Refusing what would overflow must not turn a diverging run into one that loops on
    refusals: the round whose every update is refused ends the run with DivergedError, at the
    round and with the rows the in-process run gives."""
    from threepc.common.engine import run_in_process
    from threepc.common.errors import DivergedError

    text = (
        'workers = 3\nrounds = 60\nseed = 1\nmethod = "gd"\ncompressor = "identity"\nproblem = "least_squares"\n'
        'stepsize = 100.0\n[data]\ndataset = "synthetic"\nrows = 300\ndim = 30\n'
        '[wire]\nvalue_dtype = "float64"\niterate_dtype = "float32"\n'
    )
    the_plan = make_plan(text)

    async def main() -> tuple[Coordinator, list[Any]]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            workers = [asyncio.ensure_future(run_worker(worker(address, i, reconnect_timeout_s=3))) for i in range(3)]
            return c, await asyncio.wait_for(asyncio.gather(run, *workers, return_exceptions=True), 120)

    c, results = asyncio.run(main())
    local: list[dict] = []
    with pytest.raises(DivergedError) as in_process:
        run_in_process(the_plan, local.append)
    assert isinstance(results[0], DivergedError) and str(results[0]) == str(in_process.value)
    assert "the run diverged at round 21" in str(results[0])
    assert len(c.rows) == len(local) == 21 and c.rows[20]["refused"] == 2
    assert [r["grad_norm_sq"] for r in c.rows] == [r["grad_norm_sq"] for r in local]
    assert [r["absent_workers"] for r in c.rows[19:]] == [[], [1, 2]]


def test_an_oversize_message_is_refused_and_counted() -> None:
    the_plan = make_plan(CONFIG + "[wire]\nmax_message_bytes = 65536\n")

    async def main() -> tuple[Coordinator, grpc.StatusCode, str]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            honest = asyncio.ensure_future(run_worker(worker(address, 0, throttle_s=0.02)))
            raw = RawClient(address)
            await raw.join(1)
            await raw.send(dense_update(0, 1, b"\x00" * 100_000))  # over 64 KiB
            code, details = await raw.status()
            await raw.close()
            await asyncio.gather(run, honest, run_worker(worker(address, 1)))
            return c, code, details

    c, code, details = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 65536 bytes" in details
    assert c.refused == [0, 1] and c.rows[0]["refused"] == 1
    assert np.array_equal(c.agg.x, reference_x(c.plan, c.rows))  # nothing of it reached the aggregate


def test_health_is_served() -> None:
    the_plan = make_plan(CONFIG)

    async def main() -> int:
        async with on_loopback(the_plan) as (_, address), grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service="threepc.v1.Coordinator"))
            return reply.status

    assert asyncio.run(main()) == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("localhost")
    paths = {name: folder / f"{name}.pem" for name in ("ca", "other_ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other_ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    return paths


def test_tls_trusts_only_its_ca_and_host(certificates: dict[str, Path]) -> None:
    from threepc.common.tls import server_credentials

    the_plan = make_plan(CONFIG.replace("rounds = 30", "rounds = 3").replace("workers = 2", "workers = 1"))
    credentials = server_credentials(certificates["cert"], certificates["key"])

    async def main() -> tuple[list[str], dict]:
        errors = []
        async with on_loopback(the_plan, credentials=credentials, host="localhost") as (c, address):
            port = address.rsplit(":", 1)[1]
            for host, ca in [("localhost", "other_ca"), ("127.0.0.1", "ca"), ("localhost", None)]:
                try:
                    tls_ca = certificates[ca] if ca else None
                    await run_worker(worker(f"{host}:{port}", 0, tls_ca=tls_ca, connect_timeout_s=2))
                except TransportError as err:
                    errors.append(str(err))
            run = asyncio.ensure_future(c.run())
            ok = await run_worker(worker(address, 0, tls_ca=certificates["ca"]))
            await run
            return errors, ok

    errors, ok = asyncio.run(main())
    assert "TLS handshake with localhost:" in errors[0] and "not signed by the CA given with --tls-ca" in errors[0]
    assert "does not name the host in 127.0.0.1:" in errors[1]
    assert "within 2 s (it closed the connection: if it serves TLS, give --tls-ca)" in errors[2]
    assert ok["rounds"] == 3


def test_cli_serves_tls_with_a_token_and_says_what_is_wrong_in_one_line(
    certificates: dict[str, Path], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c.toml", CONFIG.replace("workers = 2", "workers = 1").replace("30", "3"))
    port = free_port()
    server = spawn("serve", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(tmp_path / "o"), "-q",
                   "--no-dashboard", "--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"]),
                   env={"THREEPC_TOKEN": "s3cret"}, log=tmp_path / "serve.log")
    address = f"localhost:{port}"
    try:
        wrong_token = threepc("worker", "-c", address, "--tls-ca", str(certificates["ca"]), "--token", "nope",
                              timeout=60)
        wrong_ca = threepc("worker", "-c", address, "--tls-ca", str(certificates["other_ca"]),
                           "--token", "s3cret", timeout=60)
        right = threepc("worker", "-c", address, "--tls-ca", str(certificates["ca"]), timeout=60,
                        env={"THREEPC_TOKEN": "s3cret"})
        assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        server.kill()
    assert wrong_token.returncode == 1
    assert wrong_token.stderr.strip().splitlines() == [
        "threepc: error: coordinator refused: AuthError: join token missing or wrong"
    ]
    assert wrong_ca.returncode == 1
    assert wrong_ca.stderr.strip().splitlines() == [
        (
            f"threepc: error: TLS handshake with {address} failed: the coordinator's certificate is not signed "
            "by the CA given with --tls-ca, or names another host"
        )
    ]
    assert right.returncode == 0, right.stderr


def test_tls_needs_both_files(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", CONFIG)
    r = threepc("serve", str(config), "--tls-cert", str(tmp_path / "missing.pem"), "--out", str(tmp_path / "o"),
                "-q", "--no-dashboard", timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["threepc: error: TLS needs both --tls-cert and --tls-key"]



# ---------------------------------------------------------------------- peers that hold resources


class PeakRSS:
    """The largest resident set of process `pid` while inside, sampled every 10 ms in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = self.baseline = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 1e6


def test_streams_without_a_token_buffer_next_to_nothing_and_the_run_goes_on(tmp_path: Path) -> None:
    """The issue's attack on a real `threepc serve` (token set): four streams send 4 MiB chunks of
    a 64 MiB message before any Join (the coordinator held each one's 64 MiB, for good: measured
    86 -> 530 MB); another sends a 20 MB Join (+99 MB). Now each is refused at its first message:
    the chunks cost what gRPC holds of a stream's frames in flight (+73 MB, for the moment it
    takes to end them), the large Join nothing. Then the honest workers run the whole run."""
    config = write_config(tmp_path / "c.toml", CONFIG)
    port = free_port()
    server = spawn("serve", str(config), "--listen", f"127.0.0.1:{port}", "--out", str(tmp_path / "o"), "-q",
                   "--no-dashboard", env={"THREEPC_TOKEN": "s3cret"}, log=tmp_path / "serve.log")
    address = f"127.0.0.1:{port}"
    piece = 4 << 20
    chunk = WorkerMessage(chunk=Chunk(last=False, total_bytes=16 * piece, data=b"\x01" * piece)).SerializeToString()
    big = WorkerMessage(join=Join(requested_id=0, token="x" * 20_000_000)).SerializeToString()

    async def flood(frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
        raw = RawClient(address)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for frame in frames:
                await raw.send(frame)
        try:
            return await asyncio.wait_for(raw.status(), 30)  # the old coordinator never ended them
        finally:
            await raw.close()

    async def main() -> tuple[list[tuple[grpc.StatusCode, str]], list[float], list[dict]]:
        async with grpc.aio.insecure_channel(address) as channel:
            await wait_for_coordinator(channel, address, 60)
        verdict = await flood([chunk])  # one chunk, then it waits for the verdict
        with PeakRSS(server.pid) as chunks:
            await asyncio.gather(*(flood([chunk] * 16) for _ in range(4)))  # (their later writes fail)
        with PeakRSS(server.pid) as large:
            too_large = await flood([big])
        done = await asyncio.gather(*(run_worker(worker(address, i, token="s3cret")) for i in range(2)))
        return [verdict, too_large], [chunks.growth_mb, large.growth_mb], done

    try:
        (verdict, too_large), (chunks_mb, large_mb), done = asyncio.run(main())
        assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        server.kill()
    assert verdict[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert f"join: the first message has {len(chunk)} bytes; a Join has at most 4096" in verdict[1]
    assert too_large[0] == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC drops it: over twice a chunk frame
    # A few frames of gRPC's at once (4 x 64 MiB held before), and nothing for the large Join.
    assert chunks_mb < 110, f"the coordinator grew by {chunks_mb:.0f} MB for four streams without a token"
    assert large_mb < 10, f"the coordinator grew by {large_mb:.0f} MB for a 20 MB first message"
    assert [w["rounds"] for w in done] == [30, 30]


def test_a_peer_silent_before_join_or_ready_loses_its_slot_and_the_worker_retries() -> None:
    """A stream that never sends its Join ends at the Join deadline; a peer that joins as worker 1
    and never sends Ready holds the slot until the Ready deadline. The real worker 1, refused
    meanwhile (its slot is taken, the run has not started), retries with backoff, gets the slot,
    and the run starts and finishes."""
    the_plan = make_plan(CONFIG)

    async def main() -> tuple[Coordinator, list[tuple[grpc.StatusCode, str]], dict]:
        async with on_loopback(the_plan, join_timeout_s=1.0, ready_timeout_s=1.5) as (c, address):
            run = asyncio.ensure_future(c.run())
            silent = RawClient(address)
            await silent.call.wait_for_connection()
            squatter = RawClient(address)
            await squatter.send(WorkerMessage(join=Join(requested_id=1)))
            assert (await squatter.receive()).WhichOneof("kind") == "welcome"  # and then nothing
            statuses = asyncio.gather(
                asyncio.wait_for(silent.status(), 30), asyncio.wait_for(squatter.status(), 30)
            )
            _, real = await asyncio.gather(run_worker(worker(address, 0)), run_worker(worker(address, 1)))
            await run
            ended = await statuses
            await silent.close()
            await squatter.close()
            return c, ended, real

    c, (silent, squatter), real = asyncio.run(main())
    assert silent[0] == grpc.StatusCode.DEADLINE_EXCEEDED and "no Join within 1 s" in silent[1]
    assert squatter[0] == grpc.StatusCode.DEADLINE_EXCEEDED and "no Ready within 1.5 s" in squatter[1]
    assert real["worker_id"] == 1 and real["rounds"] == 30 and real["streams"] >= 2  # refused, then in
    assert len(c.rows) == 30 and all(r["absent_workers"] == [] for r in c.rows)
    assert c.losses == []  # the squatter was never a worker of the run


def test_a_resync_flood_gets_one_dense_round_and_the_rest_are_refused_and_counted() -> None:
    """The issue's flood at d = 1e5: 500 Resync requests for one round (2.5 KB) made the
    coordinator send x densely 500 times (800 KB each). Now one is served; the other 499 are
    refused and counted, and the honest worker's run finishes."""
    d = 100_000
    the_plan = make_plan(
        f'workers = 2\nrounds = 4\nseed = 1\nmethod = "ef21"\ncompressor = {{ name = "top_k", k = 1 }}\n'
        f'[data]\ndataset = "synthetic"\nrows = 20\ndim = {d}\n'
    )

    async def main() -> tuple[Coordinator, int]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            honest = asyncio.ensure_future(run_worker(worker(address, 0, throttle_s=0.05)))
            raw = RawClient(address)
            first = await raw.join(1, dim=d)
            assert first.WhichOneof("kind") == "round" and first.round.round == 0
            for _ in range(500):
                await raw.send(WorkerMessage(resync=Resync(round=0)))
            await raw.call.done_writing()  # then it leaves: what was queued for it is still sent
            received = 0
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (data := await raw.call.read()) is not grpc.aio.EOF:
                    received += len(data)
            await raw.close()
            await asyncio.gather(run, honest)
            return c, received

    c, received = asyncio.run(main())
    dense_round = 8 * d  # x^0 in float64
    assert dense_round <= received < 2 * dense_round + 4096  # one resync's dense round, and no more
    assert c.resyncs == [0, 1] and c.refused == [0, 499]
    assert c.rows[0]["resyncs"] == 1 and c.rows[0]["refused"] == 499
    assert len(c.rows) == 4
