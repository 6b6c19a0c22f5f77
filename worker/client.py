"""A worker: its stream to the coordinator, its shard, and its mechanism state.

    Round (x^t) -> WorkerNode.round (grad -> 3PC -> Message) -> codec -> bytes -> stream

The round logic is `threepc.common.engine.WorkerNode`, the object the in-process engine drives.
The worker meters every frame it sends and receives, so both ends' counts can be compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from threepc.common import codec, config as config_mod
from threepc.common.engine import WorkerNode, load_data, load_shard, local_problem
from threepc.common.errors import (
    AuthError,
    DecodeError,
    ProtocolError,
    ThreePCError,
    TransportError,
)
from threepc.common.wire import TRAIN_METHOD, Meter, Reassembler, category_of, channel_options, frames
from threepc.proto.threepc_pb2 import CoordinatorMessage as ProtoCoordinatorMessage
from threepc.proto.threepc_pb2 import Join as ProtoJoin
from threepc.proto.threepc_pb2 import Ready as ProtoReady
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage

log = logging.getLogger("threepc.worker")

VERSION = "0.1.0"
# Status codes the coordinator uses on purpose, back to the error a user reads.
_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: DecodeError,
    grpc.StatusCode.FAILED_PRECONDITION: ProtocolError,
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


async def wait_for_coordinator(channel: grpc.aio.Channel, address: str, timeout_s: float) -> None:
    """Wait until the channel connects, retrying with exponential backoff, or give up clearly."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            await asyncio.wait_for(channel.channel_ready(), min(delay, max(deadline - time.monotonic(), 0.01)))
            return
        except asyncio.TimeoutError:
            if time.monotonic() >= deadline:
                raise TransportError(f"no coordinator answered at {address} within {timeout_s:g} s") from None
            log.info("coordinator at %s not up yet; retrying in %.1f s", address, delay)
            delay = min(delay * 2, 5.0)


async def run_worker(options: WorkerOptions) -> dict:
    """Join the run, train until Done, and return this worker's summary (its meter included)."""
    meter = Meter()
    async with grpc.aio.insecure_channel(options.coordinator, options=channel_options(1 << 30)) as channel:
        await wait_for_coordinator(channel, options.coordinator, options.connect_timeout_s)
        call = channel.stream_stream(TRAIN_METHOD)()
        try:
            return await _train(call, options, meter)
        except grpc.aio.AioRpcError as err:
            raise _translate(err.code(), err.details(), options.coordinator) from None


def _translate(code: grpc.StatusCode, details: str | None, address: str) -> ThreePCError:
    """A failed stream's status as the error a user reads."""
    cls = _ERRORS.get(code, TransportError)
    if cls is TransportError:
        return TransportError(f"stream to {address} failed: {code.name}: {details or ''}".rstrip(": "))
    return cls(f"coordinator refused: {details or code.name}")


async def _train(call: grpc.aio.StreamStreamCall, options: WorkerOptions, meter: Meter) -> dict:
    inbound: Reassembler = Reassembler(ProtoCoordinatorMessage, meter, 1 << 30)

    async def send(message: ProtoWorkerMessage, chunk_bytes: int) -> None:
        for data in frames(message, chunk_bytes):
            await call.write(data)
            meter.count_sent(category_of(message), len(data))

    async def receive() -> ProtoCoordinatorMessage:
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    raise _translate(code, await call.details(), options.coordinator)
                raise TransportError("the coordinator closed the stream before the run was done")
            message = inbound.feed(data)
            if message is not None:
                return message

    await send(ProtoWorkerMessage(join=ProtoJoin(requested_id=options.worker_id, token=options.token, version=VERSION)), 1 << 20)
    first = await receive()
    if first.WhichOneof("kind") != "welcome":
        raise ProtocolError(f"expected welcome, got {first.WhichOneof('kind')}")
    welcome = first.welcome
    config = config_mod.from_json(welcome.config_json)
    worker_id = welcome.worker_id
    shard = load_shard(config, worker_id, load_data(config, options.data))
    problem = local_problem(config, shard, worker_id)
    node = WorkerNode(config, worker_id, problem)
    chunk = config.wire.chunk_bytes
    await send(ProtoWorkerMessage(ready=ProtoReady(rows=problem.rows, dimension=problem.dim)), chunk)
    log.info("worker %d: %d rows, d = %d", worker_id, problem.rows, problem.dim)
    rounds = 0
    while True:
        message = await receive()
        kind = message.WhichOneof("kind")
        if kind == "done":
            break
        if kind != "round":
            raise ProtocolError(f"expected round or done, got {kind}")
        t = message.round.round
        x = codec.iterate_from_proto(message.round, problem.dim)
        update, diagnostics = node.round(t, x)
        await send(ProtoWorkerMessage(update=codec.message_to_proto(t, worker_id, update)), chunk)
        if diagnostics is not None:
            await send(
                ProtoWorkerMessage(diagnostics=codec.diagnostics_to_proto(t, worker_id, *diagnostics)), chunk
            )
        rounds += 1
    await call.done_writing()
    summary = {"worker_id": worker_id, "rows": problem.rows, "rounds": rounds, "meter": meter.as_dict()}
    if options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(summary, indent=2))
    return summary

