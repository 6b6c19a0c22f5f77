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

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError

from threepc.common import splice
from threepc.common.errors import DecodeError
from threepc.common.splice import Buffer, Bulk, byte_view
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
    if it is too large (each cut from the message's pieces: the whole is never joined here)."""
    pieces = splice.pieces(message, bulk)
    size = sum(p.nbytes for p in pieces)
    if size <= chunk_bytes:
        return [b"".join(pieces)]
    envelope = type(message)
    chunks = []
    for start in range(0, size, chunk_bytes):
        chunk = ProtoChunk(last=start + chunk_bytes >= size, total_bytes=size if start == 0 else 0)
        chunks.append(splice.serialize(envelope(chunk=chunk), {"chunk.data": _cut(pieces, chunk_bytes)}))
    return chunks


def _cut(pieces: list[memoryview], nbytes: int) -> list[memoryview]:
    """The first `nbytes` of `pieces` (fewer if they hold fewer), taken off their front."""
    taken: list[memoryview] = []
    while pieces and nbytes > 0:
        piece = pieces[0]
        if piece.nbytes <= nbytes:
            taken.append(pieces.pop(0))
            nbytes -= piece.nbytes
        else:
            taken.append(piece[:nbytes])
            pieces[0] = piece[nbytes:]
            nbytes = 0
    return taken


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
        self._whole: np.ndarray | None = None  # the chunked message being gathered (its total_bytes)
        self._filled = 0
        self._pending_frames: list[int] = []

    @property
    def mid_message(self) -> bool:
        """Whether a chunked message has begun and not ended."""
        return self._whole is not None

    def feed(self, data: Buffer) -> Received[Envelope] | None:
        """The message `data` completes, or None while a chunked message is still arriving.

        A chunk's bytes are copied into one buffer of the size its first chunk announced, so a
        chunked message costs its size once, not its chunks and their join."""
        message, bulk = self._parse(data)
        if message.WhichOneof("kind") != "chunk":
            if self._whole is not None:
                raise DecodeError("chunk: a message arrived in the middle of a chunked one")
            self.meter.count_received(category_of(message), len(data))
            return Received(message, bulk)
        chunk = message.chunk
        if self._whole is None:
            if chunk.total_bytes > self.max_bytes:
                raise DecodeError(f"chunk: chunked message of {chunk.total_bytes} bytes exceeds the limit of {self.max_bytes} bytes")
            self._whole, self._filled = np.empty(chunk.total_bytes, np.uint8), 0
        piece = byte_view(bulk.get("chunk.data", chunk.data))
        end = self._filled + piece.nbytes
        if end > self._whole.size:
            raise DecodeError(f"chunk: chunks exceed the {self._whole.size} bytes their first one announced")
        self._whole[self._filled : end] = np.frombuffer(piece, np.uint8)
        self._filled = end
        self._pending_frames.append(len(data))
        if not chunk.last:
            return None
        if end != self._whole.size:
            raise DecodeError(f"chunk: the last chunk ends at byte {end} of the {self._whole.size} announced")
        whole, bulk = self._parse(self._whole)
        if whole.WhichOneof("kind") == "chunk":
            raise DecodeError("chunk: a chunked message may not contain another chunk")
        for size in self._pending_frames:
            self.meter.count_received(category_of(whole), size)
        self._whole, self._pending_frames = None, []
        return Received(whole, bulk)

    def _parse(self, data: Buffer) -> tuple[Envelope, Bulk]:
        try:
            message, bulk = splice.parse(self.envelope, data)
        except ProtobufDecodeError as err:
            raise DecodeError(f"message: not a valid {self.envelope.DESCRIPTOR.name}: {err}") from None
        if message.WhichOneof("kind") is None:
            raise DecodeError(f"message: empty or unknown {self.envelope.DESCRIPTOR.name}")
        return message, bulk
