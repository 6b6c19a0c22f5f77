"""What both ends of a stream share: the method path, channel options, chunking and metering.

Messages cross the stream as bytes we serialize ourselves (the gRPC method has no serializer),
so each end knows the exact size of every message: its serialized protobuf plus gRPC's 5-byte
message frame. A broadcast is serialized once and the same bytes go to every stream. Bulk fields
(d-vectors) travel beside the protobuf, spliced in and cut out by `threepc.common.splice`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from google.protobuf.message import DecodeError as ProtobufDecodeError

from threepc.common import splice
from threepc.common.errors import DecodeError
from threepc.common.splice import Buffer, Bulk
from threepc.proto.threepc_pb2 import Chunk as ProtoChunk
from threepc.proto.threepc_pb2 import CoordinatorMessage as ProtoCoordinatorMessage
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage

SERVICE = "threepc.v1.Coordinator"
TRAIN_METHOD = f"/{SERVICE}/Train"
FRAME_BYTES = 5  # gRPC length-prefixed message: 1 compressed flag + 4 length bytes

# Traffic categories, metered apart: a method's rounds, the plots' diagnostics, and set-up.
ROUND, DIAGNOSTICS, CONTROL = "round", "diagnostics", "control"
_CATEGORY = {
    "join": CONTROL,
    "ready": CONTROL,
    "welcome": CONTROL,
    "done": CONTROL,
    "update": ROUND,
    "round": ROUND,
    "diagnostics": DIAGNOSTICS,
    "resync": ROUND,  # part of the delta downlink's cost
}


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Raised size limits (deliberately: messages up to the run's limit, larger ones chunked)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass
class Meter:
    """Messages and bytes (frame included) by direction and category, for one stream."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    messages_sent: int = 0
    messages_received: int = 0

    def count_sent(self, category: str, nbytes: int) -> None:
        self.sent[category] = self.sent.get(category, 0) + nbytes + FRAME_BYTES
        self.messages_sent += 1

    def count_received(self, category: str, nbytes: int) -> None:
        self.received[category] = self.received.get(category, 0) + nbytes + FRAME_BYTES
        self.messages_received += 1

    def as_dict(self) -> dict:
        return {
            "sent_bytes": dict(sorted(self.sent.items())),
            "received_bytes": dict(sorted(self.received.items())),
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
        }


Envelope = TypeVar("Envelope", ProtoWorkerMessage, ProtoCoordinatorMessage)


def category_of(message: ProtoWorkerMessage | ProtoCoordinatorMessage) -> str:
    return _CATEGORY.get(message.WhichOneof("kind") or "", CONTROL)


def frames(
    message: ProtoWorkerMessage | ProtoCoordinatorMessage, chunk_bytes: int, bulk: Mapping[str, Buffer] | None = None
) -> list[bytes]:
    """The gRPC messages that carry `message` with its `bulk` fields: itself, or Chunk messages
    if it is too large."""
    data = splice.serialize(message, bulk)
    if len(data) <= chunk_bytes:
        return [data]
    envelope = type(message)
    view = memoryview(data)
    return [
        splice.serialize(envelope(chunk=ProtoChunk(last=i + chunk_bytes >= len(data))), {"chunk.data": view[i : i + chunk_bytes]})
        for i in range(0, len(data), chunk_bytes)
    ]


class Received(NamedTuple, Generic[Envelope]):
    """A message as it arrived: the protobuf without its bulk fields, and those by path."""

    message: Envelope
    bulk: Bulk


class Reassembler(Generic[Envelope]):
    """Parses incoming frames, joining chunks; meters each frame under its message's category."""

    def __init__(self, envelope: type[Envelope], meter: Meter, max_bytes: int):
        self.envelope = envelope
        self.meter = meter
        self.max_bytes = max_bytes
        self._pending: list[Buffer] = []
        self._pending_frames: list[int] = []

    @property
    def mid_message(self) -> bool:
        """Whether a chunked message has begun and not ended."""
        return bool(self._pending)

    def feed(self, data: bytes) -> Received[Envelope] | None:
        """The message `data` completes, or None while a chunked message is still arriving."""
        message, bulk = self._parse(data)
        if message.WhichOneof("kind") != "chunk":
            if self._pending:
                raise DecodeError("chunk: a message arrived in the middle of a chunked one")
            self.meter.count_received(category_of(message), len(data))
            return Received(message, bulk)
        self._pending.append(bulk.get("chunk.data", message.chunk.data))
        self._pending_frames.append(len(data))
        if sum(memoryview(p).nbytes for p in self._pending) > self.max_bytes:
            raise DecodeError(f"chunk: chunked message exceeds the limit of {self.max_bytes} bytes")
        if not message.chunk.last:
            return None
        whole, bulk = self._parse(b"".join(self._pending))
        if whole.WhichOneof("kind") == "chunk":
            raise DecodeError("chunk: a chunked message may not contain another chunk")
        for size in self._pending_frames:
            self.meter.count_received(category_of(whole), size)
        self._pending, self._pending_frames = [], []
        return Received(whole, bulk)

    def _parse(self, data: bytes) -> tuple[Envelope, Bulk]:
        try:
            message, bulk = splice.parse(self.envelope, data)
        except ProtobufDecodeError as err:
            raise DecodeError(f"message: not a valid {self.envelope.DESCRIPTOR.name}: {err}") from None
        if message.WhichOneof("kind") is None:
            raise DecodeError(f"message: empty or unknown {self.envelope.DESCRIPTOR.name}")
        return message, bulk
