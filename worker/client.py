"""A worker: its stream to the coordinator, its shard, and its mechanism state.

    Round (x^t) -> WorkerNode.round (grad -> 3PC -> Message) -> codec -> bytes -> stream

The round logic is `threepc.common.engine.WorkerNode`, the object the in-process engine drives.
The worker meters every frame it sends and receives, so both ends' counts can be compared.

When its stream breaks after it has trained (the coordinator restarted, the network dropped),
the worker rejoins with the same id, retrying with backoff for at most `reconnect_timeout_s`;
the coordinator's Welcome (or a Restore before a Round) rebuilds its state from the mirror.
Refused a slot that another stream holds, or too slow to get ready, it retries the same way for
at most `connect_timeout_s` (a slot frees up: a peer that never gets ready loses it).

A worker whose own gradient (or loss, or update) is no longer finite sends Diverged instead of
its update; the coordinator ends the run and tells every worker with Done. A worker told that
the run ended before it finished returns normally, with the reason in its summary (`ended`):
it did its part, and the coordinator's exit code says how the run went.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from threepc.common import codec, tls
from threepc.common import config as config_mod
from threepc.common.data import fingerprint
from threepc.common.engine import (
    IterateFollower,
    WorkerNode,
    chunk_bytes,
    data_origin,
    digest,
    load_data,
    load_shard,
    local_problem,
)
from threepc.common.errors import (
    AuthError,
    DeadlineError,
    DecodeError,
    DivergedError,
    MismatchError,
    ProtocolError,
    RunFinishedError,
    SlotTakenError,
    ThreePCError,
    TransportError,
    WorkerDivergedError,
)
from threepc.common.splice import Bulk
from threepc.common.wire import (
    TRAIN_METHOD,
    Meter,
    Reassembler,
    Received,
    category_of,
    channel_options,
    frames,
)
from threepc.proto.threepc_pb2 import CoordinatorMessage as ProtoCoordinatorMessage
from threepc.proto.threepc_pb2 import Diverged as ProtoDiverged
from threepc.proto.threepc_pb2 import Join as ProtoJoin
from threepc.proto.threepc_pb2 import Ready as ProtoReady
from threepc.proto.threepc_pb2 import Restore as ProtoRestore
from threepc.proto.threepc_pb2 import Resync as ProtoResync
from threepc.proto.threepc_pb2 import Round as ProtoRound
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage

log = logging.getLogger("threepc.worker")

VERSION = "0.1.0"
# Status codes the coordinator uses on purpose, back to the error a user reads.
_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: DecodeError,
    grpc.StatusCode.FAILED_PRECONDITION: ProtocolError,
    grpc.StatusCode.ALREADY_EXISTS: SlotTakenError,  # another stream holds the slot: retried
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineError,  # not ready in time: retried (the shard is loaded)
    grpc.StatusCode.ABORTED: DivergedError,  # the run itself failed: nothing to rejoin
    grpc.StatusCode.OUT_OF_RANGE: RunFinishedError,  # joined after the last round: nothing to do
}


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker process finds its coordinator and its data."""

    coordinator: str
    worker_id: int = -1  # -1: the coordinator assigns one
    data: str | None = None  # path or name overriding the run's data set
    token: str = ""
    connect_timeout_s: float = 60.0
    report: Path | None = None  # where to write this worker's meter (JSON) at the end
    reconnect_timeout_s: float = 60.0  # after a broken stream: how long to keep trying to rejoin
    tls_ca: Path | None = None  # PEM of the CA that signed the coordinator's certificate: use TLS
    throttle_s: float = 0.0  # fault drills: wait this long before each update (a straggler)
    throttle_rounds: frozenset[int] | None = None  # ... only in these rounds (None: every round)


@dataclass
class _Session:
    """What outlives one stream: the worker's id, its problem (data loaded once), its node."""

    worker_id: int
    config_json: str = ""
    node: WorkerNode | None = None
    rounds: int = 0  # updates sent, over all streams
    trained: bool = False  # this stream got past Ready: a break now is worth rejoining
    rows: int = 0
    streams: int = 0
    restores: int = 0
    resyncs: int = 0  # dense rounds asked for after a digest mismatch (delta downlink)
    ended: str = "finished"  # the reason of the coordinator's Done (why the run ended)
    follower: IterateFollower | None = None  # x and g_sum, rebuilt from the coordinator's changes
    ready: ProtoReady | None = None  # the shard's fingerprint, sent in each stream's Ready
    meter: Meter = field(default_factory=Meter)


async def wait_for_coordinator(
    channel: grpc.aio.Channel, address: str, timeout_s: float, tls_on: bool = False
) -> None:
    """Wait until the coordinator answers its health check, retrying with exponential backoff.

    A failed TLS handshake is not worth retrying: it raises at once, saying what is wrong.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    stub = health_pb2_grpc.HealthStub(channel)
    closed = False  # some attempt connected and was hung up on: a TLS port, for a plaintext client
    while True:
        remaining = deadline - time.monotonic()
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=max(min(remaining, 5.0), 0.05))
            return
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return  # something answers (a coordinator without the health service)
            details = err.details() or ""
            closed = closed or "socket closed" in details.lower()
            failure = tls.handshake_failure(details, address, tls_on)
            if failure is not None:
                raise failure from None
        if time.monotonic() + delay >= deadline:
            hint = ""
            if not tls_on and closed:
                hint = " (it closed the connection: if it serves TLS, give --tls-ca)"
            raise TransportError(f"no coordinator answered at {address} within {timeout_s:g} s{hint}")
        log.info("coordinator at %s not up yet; retrying in %.1f s", address, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _channel(options: WorkerOptions, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    channel_opts = channel_options(1 << 30)
    if credentials is None:
        return grpc.aio.insecure_channel(options.coordinator, options=channel_opts)
    return grpc.aio.secure_channel(options.coordinator, credentials, options=channel_opts)


async def run_worker(options: WorkerOptions) -> dict:
    """Join the run, train until Done, and return this worker's summary (its meter included).

    A stream that breaks after the worker has trained is rejoined with the same id, for at most
    `reconnect_timeout_s` from the break; a refusal (token, dimension) ends the worker at once.
    """
    credentials = tls.channel_credentials(options.tls_ca) if options.tls_ca else None
    session = _Session(options.worker_id)
    rejoin_until: float | None = None
    refused_until: float | None = None  # refused a slot (or too slow to get ready): retry until then
    delay = 0.2
    while True:
        timeout = options.connect_timeout_s if rejoin_until is None else max(rejoin_until - time.monotonic(), 0.1)
        session.trained = False
        try:
            async with _channel(options, credentials) as channel:
                await wait_for_coordinator(channel, options.coordinator, timeout, credentials is not None)
                call = channel.stream_stream(TRAIN_METHOD)()
                try:
                    return await _train(call, options, session)
                except grpc.RpcError as err:
                    code = err.code() if isinstance(err, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
                    details = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
                    raise _translate(code, details, options.coordinator) from None
        except RunFinishedError:
            log.info("worker %d: the run has already finished", session.worker_id)
            return _summary(session, options, finished_before_joining=True)
        except (AuthError, MismatchError, DivergedError):
            raise  # refused, or the run failed: rejoining would not help
        except (SlotTakenError, DeadlineError) as err:
            if session.trained:
                rejoin_until, delay = time.monotonic() + options.reconnect_timeout_s, 0.2
            elif rejoin_until is None:
                # As for a coordinator not up yet: with backoff, for at most connect_timeout_s.
                refused_until = refused_until or time.monotonic() + options.connect_timeout_s
                if time.monotonic() + delay >= refused_until:
                    raise type(err)(f"{err} (still, after {options.connect_timeout_s:g} s of retrying)") from None
            elif time.monotonic() >= rejoin_until:
                raise
            log.warning("worker %d: %s; retrying in %.1f s", session.worker_id, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except ThreePCError as err:
            if session.trained:
                rejoin_until = time.monotonic() + options.reconnect_timeout_s  # a fresh budget per break
                delay = 0.2
            if rejoin_until is None:
                raise  # it never trained: a first join that fails says why, once
            if time.monotonic() >= rejoin_until:
                raise TransportError(
                    f"worker {session.worker_id} lost the coordinator at {options.coordinator} and could not "
                    f"rejoin within {options.reconnect_timeout_s:g} s: {err}"
                ) from None
            log.warning("worker %d: stream broke (%s); rejoining in %.1f s", session.worker_id, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _translate(code: grpc.StatusCode, details: str | None, address: str) -> ThreePCError:
    """A failed stream's status as the error a user reads."""
    cls = _ERRORS.get(code, TransportError)
    if cls is TransportError:
        return TransportError(f"stream to {address} failed: {code.name}: {details or ''}".rstrip(": "))
    return cls(f"coordinator refused: {details or code.name}")


def _restore(node: WorkerNode, proto: ProtoRestore, path: str, bulk: Bulk) -> None:
    """Rebuild the node's mechanism state from the coordinator's mirror (or start afresh)."""
    restored = codec.restore_from_proto(proto, node.problem.dim, path, bulk)
    if restored is None:
        node.state = None
    else:
        node.restore(*restored)


def _iterate(
    session: _Session, node: WorkerNode, proto: ProtoRound, bulk: Bulk
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """x^t from a Round, given densely or rebuilt from the change of g_sum (delta downlink), and
    x^t in float64 where a follower keeps it; None when the rebuilt x^t does not match the
    coordinator's digest."""
    d = node.problem.dim
    if not proto.delta:
        x = codec.iterate_from_proto(proto, d, bulk)
        aggregate = codec.aggregate_from_proto(proto, d, bulk)
        if aggregate is not None:
            step_scale = 1.0 if node.mechanism.worker_scales else float(node.config.stepsize)
            session.follower = IterateFollower(x, aggregate, node.config.workers, step_scale)
            return x, session.follower.x64  # no float64 x of the node's own besides the follower's
        return x, None
    if session.follower is None:
        return None
    indices, values = codec.round_change_from_proto(proto, d, bulk)
    x = session.follower.follow(indices, values)
    return (x, session.follower.x64) if digest(x) == proto.digest else None


async def _train(call: grpc.aio.StreamStreamCall, options: WorkerOptions, session: _Session) -> dict:
    meter = session.meter
    inbound: Reassembler = Reassembler(ProtoCoordinatorMessage, meter, 1 << 30)

    async def ended() -> ThreePCError:
        """Why the coordinator ended the stream (its status)."""
        code = await call.code()
        if code != grpc.StatusCode.OK:
            return _translate(code, await call.details(), options.coordinator)
        return TransportError("the coordinator closed the stream before the run was done")

    async def send(message: ProtoWorkerMessage, chunk_bytes: int, bulk: Bulk | None = None) -> None:
        for data in frames(message, chunk_bytes, bulk):
            try:
                await call.write(data)
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                # The coordinator ended the stream meanwhile (the write may fail either way,
                # depending on timing): its status says why.
                raise await ended() from None
            meter.count_sent(category_of(message), len(data))

    async def receive() -> Received[ProtoCoordinatorMessage]:
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                raise await ended()
            received = inbound.feed(data)
            if received is not None:
                return received

    session.streams += 1
    join = ProtoJoin(requested_id=session.worker_id, token=options.token, version=VERSION)
    await send(ProtoWorkerMessage(join=join), 1 << 20)
    first, bulk = await receive()
    if first.WhichOneof("kind") != "welcome":
        raise ProtocolError(f"expected welcome, got {first.WhichOneof('kind')}")
    welcome = first.welcome
    node = session.node
    if node is None or node.worker_id != welcome.worker_id or session.config_json != welcome.config_json:
        config = config_mod.from_json(welcome.config_json)
        shard = load_shard(config, welcome.worker_id, load_data(config, options.data))
        node = WorkerNode(config, welcome.worker_id, local_problem(config, shard, welcome.worker_id))
        session.node, session.config_json = node, welcome.config_json
        source, _, synthetic = data_origin(shard, node.problem)
        session.ready = ProtoReady(
            rows=node.problem.rows, dimension=node.problem.dim, shard_hash=fingerprint(shard),
            data_source=source, synthetic=synthetic,
        )
    session.worker_id = worker_id = welcome.worker_id
    problem = node.problem
    if welcome.HasField("restore"):
        _restore(node, welcome.restore, "welcome.restore", bulk)
        session.restores += 1
    else:
        node.state = None  # the mirror holds nothing of this worker: its first round starts afresh
    del bulk  # views of the Welcome's frames (the restored d-vectors): not held through the rounds
    chunk = chunk_bytes(node.config, problem.dim)
    assert session.ready is not None  # set with the node
    await send(ProtoWorkerMessage(ready=session.ready), chunk)
    log.info("worker %d: %d rows, d = %d, from round %d", worker_id, problem.rows, problem.dim, welcome.start_round)
    while True:
        message, bulk = await receive()
        kind = message.WhichOneof("kind")
        session.trained = True
        if kind == "done":
            session.ended = message.done.reason or "finished"
            break
        if kind == "restore":
            _restore(node, message.restore, "restore", bulk)
            session.restores += 1
            continue
        if kind != "round":
            raise ProtocolError(f"expected round, restore or done, got {kind}")
        t = message.round.round
        iterate = _iterate(session, node, message.round, bulk)
        if iterate is None:  # the rebuilt iterate missed the digest: ask for round t densely
            await send(ProtoWorkerMessage(resync=ProtoResync(round=t)), chunk)
            session.resyncs += 1
            continue
        try:
            update, diagnostics = node.round(t, *iterate)
        except WorkerDivergedError as err:
            # Said, not sent: no decoder would take the update (the coordinator ends the run in
            # its turn, or, if its round closed meanwhile, sends the next round).
            log.warning("worker %d: %s", worker_id, err)
            await send(ProtoWorkerMessage(diverged=ProtoDiverged(round=t, reason=err.what)), chunk)
            del message, bulk, iterate
            continue
        if options.throttle_s and (options.throttle_rounds is None or t in options.throttle_rounds):
            await asyncio.sleep(options.throttle_s)
        envelope, bulk = ProtoWorkerMessage(), Bulk()  # filled in place: a constructor would copy the values again
        codec.fill_update(envelope.update, t, worker_id, update, bulk)
        await send(envelope, chunk, bulk)
        if diagnostics is not None:
            envelope, bulk = ProtoWorkerMessage(), Bulk()
            codec.fill_diagnostics(envelope.diagnostics, t, worker_id, *diagnostics, bulk)
            await send(envelope, chunk, bulk)
        del message, bulk, iterate, envelope, update, diagnostics  # d-vectors: not held while the next round arrives
        session.rounds += 1
    with contextlib.suppress(asyncio.InvalidStateError):  # the coordinator may have ended it already
        await call.done_writing()
    session.rows = problem.rows
    return _summary(session, options)


def _summary(session: _Session, options: WorkerOptions, finished_before_joining: bool = False) -> dict:
    """This worker's figures (its meter included), also written to `--report`."""
    summary = {
        "worker_id": session.worker_id,
        "rows": session.rows,
        "rounds": session.rounds,
        "streams": session.streams,
        "restores": session.restores,
        "resyncs": session.resyncs,
        "finished_before_joining": finished_before_joining,
        "ended": session.ended,
        "meter": session.meter.as_dict(),
    }
    if options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(summary, indent=2))
    return summary
