"""The coordinator: one bidirectional stream per worker, rounds driven by the shared engine.

    stream in -> Reassembler -> codec.message_from_proto (validates) -> Aggregator.apply
    Aggregator.finish_round -> x^{t+1} -> Round serialized once -> every stream

The servicer is thin: the round logic is `threepc.common.engine.Aggregator`, the same object the
in-process engine drives. Each stream's bytes are metered where they are read and written.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from threepc.common import codec, config as config_mod
from threepc.common.engine import Aggregator, Plan
from threepc.common.errors import AuthError, MismatchError, ProtocolError, ThreePCError, TransportError
from threepc.common.payloads import Message
from threepc.common.wire import (
    CONTROL,
    DIAGNOSTICS,
    ROUND,
    SERVICE,
    Meter,
    Reassembler,
    category_of,
    channel_options,
    frames,
)
from threepc.proto.threepc_pb2 import CoordinatorMessage as ProtoCoordinatorMessage
from threepc.proto.threepc_pb2 import Done as ProtoDone
from threepc.proto.threepc_pb2 import Welcome as ProtoWelcome
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage
from threepc.server.status import aborting_on_error

log = logging.getLogger("threepc.coordinator")

VERSION = "0.1.0"


@dataclass
class WorkerLink:
    """The coordinator's side of one worker's stream."""

    worker_id: int
    peer: str
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # frames to write; None ends
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (round, Message, diagnostics)
    meter: Meter = field(default_factory=Meter)
    rows: int = 0
    ready: bool = False
    last_round: int = -1
    error: ThreePCError | None = None


RowCallback = Callable[[dict], None]


class Coordinator:
    """Registers workers, runs the rounds, meters every byte. One instance per run."""

    def __init__(self, plan: Plan, on_round: RowCallback | None = None, token: str = ""):
        self.plan = plan
        self.token = token  # a deployment secret, never part of the run's config
        self.config = plan.config
        self.agg = Aggregator(plan)
        self.on_round = on_round
        self.links: dict[int, WorkerLink] = {}
        self.all_ready = asyncio.Event()
        self.finished = asyncio.Event()
        self.rows: list[dict] = []
        self.started_at: float | None = None
        self._config_json = config_mod.to_json(plan.resolved)

    # ------------------------------------------------------------------ the stream

    async def train(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        """One worker's whole life: Join -> Welcome -> Ready -> rounds -> Done."""
        meter = Meter()
        inbound = Reassembler(ProtoWorkerMessage, meter, self.config.wire.max_message_bytes)
        async with aborting_on_error(context):
            await self._serve_stream(context, inbound, meter)

    async def _serve_stream(self, context: grpc.aio.ServicerContext, inbound: Reassembler, meter: Meter) -> None:
        """Join -> Welcome -> Ready, then write this worker's frames until the run ends."""
        join = await self._expect(context, inbound, "join")
        if self.token and not hmac.compare_digest(join.join.token.encode(), self.token.encode()):
            raise AuthError("join token missing or wrong")
        link = self._register(join.join.requested_id, context.peer(), meter)
        try:
            welcome = ProtoWelcome(
                worker_id=link.worker_id,
                n_workers=self.config.workers,
                config_json=self._config_json,
                start_round=self.agg.t,
            )
            await self._send(context, link, ProtoCoordinatorMessage(welcome=welcome))
            ready = (await self._expect(context, inbound, "ready")).ready
            if ready.dimension != self.plan.dim:
                raise MismatchError(
                    f"worker {link.worker_id} has dimension {ready.dimension}, the run's is {self.plan.dim}"
                )
        except BaseException:
            del self.links[link.worker_id]  # free the slot of a worker that never got ready
            raise
        link.rows, link.ready = ready.rows, True
        log.info("worker %d ready (%s, %d rows)", link.worker_id, link.peer, ready.rows)
        if sum(w.ready for w in self.links.values()) == self.config.workers:
            self.all_ready.set()
        reader = asyncio.create_task(self._read_rounds(context, inbound, link))
        try:
            while (data := await link.outbox.get()) is not None:
                await context.write(data[1])
                link.meter.count_sent(data[0], len(data[1]))
        finally:
            reader.cancel()
        if link.error is not None:
            raise link.error

    async def _expect(self, context: grpc.aio.ServicerContext, inbound: Reassembler, kind: str) -> ProtoWorkerMessage:
        while True:
            data = await context.read()
            if data is grpc.aio.EOF:
                raise ProtocolError(f"stream ended while waiting for {kind}")
            message = inbound.feed(data)
            if message is None:
                continue
            if message.WhichOneof("kind") != kind:
                raise ProtocolError(f"expected {kind}, got {message.WhichOneof('kind')}")
            return message

    def _register(self, requested: int, peer: str, meter: Meter) -> WorkerLink:
        n = self.config.workers
        if requested >= n:
            raise ProtocolError(f"worker id {requested} outside [0, {n})")
        if requested >= 0:
            worker_id = requested
            if worker_id in self.links:
                raise ProtocolError(f"worker id {worker_id} is already taken")
        else:
            free = [i for i in range(n) if i not in self.links]
            if not free:
                raise ProtocolError(f"all {n} worker slots are taken")
            worker_id = free[0]
        link = WorkerLink(worker_id, peer, meter=meter)
        self.links[worker_id] = link
        return link

    async def _send(self, context: grpc.aio.ServicerContext, link: WorkerLink, message: ProtoCoordinatorMessage) -> None:
        for data in frames(message, self.config.wire.chunk_bytes):
            await context.write(data)
            link.meter.count_sent(category_of(message), len(data))

    async def _read_rounds(self, context: grpc.aio.ServicerContext, inbound: Reassembler, link: WorkerLink) -> None:
        """Decode and validate each Update (+ Diagnostics) and hand it to the round loop."""
        d = self.plan.dim
        try:
            pending: tuple[int, Message] | None = None
            while True:
                data = await context.read()
                if data is grpc.aio.EOF:
                    raise TransportError(f"worker {link.worker_id} closed its stream")
                message = inbound.feed(data)
                if message is None:
                    continue
                kind = message.WhichOneof("kind")
                t = self.agg.t
                if kind == "update" and pending is None:
                    decoded = codec.message_from_proto(message.update, d, t, link.worker_id)
                    if t % self.config.diagnostics_every == 0:
                        pending = (t, decoded)
                    else:
                        link.inbox.put_nowait((t, decoded, None))
                elif kind == "diagnostics" and pending is not None:
                    diag = codec.diagnostics_from_proto(message.diagnostics, d, t, link.worker_id)
                    link.inbox.put_nowait((pending[0], pending[1], diag))
                    pending = None
                else:
                    raise ProtocolError(f"unexpected {kind} from worker {link.worker_id} in round {t}")
        except ThreePCError as err:
            link.error = err
            link.inbox.put_nowait(None)
            link.outbox.put_nowait(None)
        except asyncio.CancelledError:
            raise

    # ------------------------------------------------------------------ the rounds

    async def run(self) -> list[dict]:
        """Wait for every worker, run the rounds, tell the workers the run is done."""
        await self.all_ready.wait()
        self.started_at = time.perf_counter()
        n, deadline = self.config.workers, self.config.round_timeout_s
        try:
            for t in range(self.agg.t, self.config.rounds):
                self._broadcast(ProtoCoordinatorMessage(round=codec.iterate_to_proto(t, self.agg.x)))
                for worker_id in range(n):
                    link = self.links[worker_id]
                    try:
                        item = await asyncio.wait_for(link.inbox.get(), deadline)
                    except TimeoutError:
                        raise TransportError(f"worker {worker_id} sent nothing for round {t} within {deadline} s") from None
                    if item is None:
                        raise link.error or TransportError(f"worker {worker_id} went away")
                    _, message, diagnostics = item
                    self.agg.apply(worker_id, message)
                    link.last_round = t
                    if diagnostics is not None:
                        self.agg.add_diagnostics(*diagnostics)
                row = self.agg.finish_round()
                row.update(self.wire_totals())
                row["elapsed_s"] = time.perf_counter() - self.started_at
                self.rows.append(row)
                if self.on_round:
                    self.on_round(row)
                if not np.isfinite(self.agg.x).all():
                    raise ThreePCError(f"the run diverged at round {t}: the iterate is no longer finite")
            self._broadcast(ProtoCoordinatorMessage(done=ProtoDone(rounds=self.agg.t, reason="finished")))
        finally:
            for link in self.links.values():
                link.outbox.put_nowait(None)
            self.finished.set()
        return self.rows

    def _broadcast(self, message: ProtoCoordinatorMessage) -> None:
        """Serialize once; the same bytes go to every stream."""
        category = category_of(message)
        data = frames(message, self.config.wire.chunk_bytes)
        for link in self.links.values():
            for frame in data:
                link.outbox.put_nowait((category, frame))

    def wire_totals(self) -> dict[str, int]:
        """Cumulative bytes over all streams: the method's up and down, and diagnostics up."""
        meters = [link.meter for link in self.links.values()]
        return {
            "wire_bytes_up": sum(m.received.get(ROUND, 0) for m in meters),
            "wire_bytes_down": sum(m.sent.get(ROUND, 0) for m in meters),
            "diag_bytes_up": sum(m.received.get(DIAGNOSTICS, 0) for m in meters),
            "control_bytes": sum(m.received.get(CONTROL, 0) + m.sent.get(CONTROL, 0) for m in meters),
        }


async def start_server(
    coordinator: Coordinator, listen: str, *, grace_s: float = 5.0
) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server for `coordinator`, and the port it bound (listen on port 0 in tests)."""
    options = channel_options(coordinator.config.wire.max_message_bytes)
    server = grpc.aio.server(options=options)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Train": grpc.stream_stream_rpc_method_handler(coordinator.train)},
    )
    server.add_generic_rpc_handlers((handler,))
    # The standard grpc.health.v1 service, for load balancers and Kubernetes gRPC probes.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise TransportError(f"cannot listen on {listen}")
    await server.start()
    return server, port

