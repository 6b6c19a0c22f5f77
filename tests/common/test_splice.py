"""Bulk fields spliced around protobuf: the same messages protobuf would write and read."""

from __future__ import annotations

import numpy as np
import pytest

from threepc.common import codec, splice
from threepc.common.errors import DecodeError
from threepc.common.payloads import DenseVector, Message, Mode, SparseVector
from threepc.common.splice import BULK_MIN, Bulk
from threepc.common.wire import Meter, Reassembler, frames
from threepc.proto.threepc_pb2 import CoordinatorMessage as ProtoCoordinatorMessage
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage

RNG = np.random.default_rng(5)


def _blob(nbytes: int) -> bytes:
    return RNG.integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def _update_with_bulk() -> tuple[ProtoWorkerMessage, Bulk, ProtoWorkerMessage]:
    """(message without its bulk fields, the bulk, the same message with them set)."""
    stripped, reference = ProtoWorkerMessage(), ProtoWorkerMessage()
    bulk: Bulk = {}
    for message in (stripped, reference):
        message.update.round = 3
        message.update.worker_id = 1
        sparse = message.update.parts.add().sparse
        sparse.count = 7
        sparse.dtype = 2
        message.update.parts.add()  # an element with nothing but bulk fields: `dense` is absent
        message.update.parts.add().dense.dtype = 2
    values, indices, dense = _blob(BULK_MIN + 3), _blob(100), _blob(BULK_MIN * 2)
    bulk = {
        "update.parts[0].sparse.values": memoryview(values),
        "update.parts[0].sparse.indices": memoryview(indices),  # small: spliced all the same
        "update.parts[1].dense.values": memoryview(dense),
        "update.parts[2].dense.values": memoryview(dense),
    }
    reference.update.parts[0].sparse.values = values
    reference.update.parts[0].sparse.indices = indices
    reference.update.parts[1].dense.values = dense
    reference.update.parts[2].dense.values = dense
    return stripped, bulk, reference


def test_serialize_writes_what_protobuf_would_read_as_the_whole_message() -> None:
    stripped, bulk, reference = _update_with_bulk()
    data = splice.serialize(stripped, bulk)
    assert ProtoWorkerMessage.FromString(data) == reference
    assert len(data) == reference.ByteSize()  # what the meters count is protobuf's own size


def test_parse_cuts_out_the_large_fields_and_protobuf_reads_the_rest() -> None:
    _, _, reference = _update_with_bulk()
    message, bulk = splice.parse(ProtoWorkerMessage, reference.SerializeToString())
    assert sorted(bulk) == [
        "update.parts[0].sparse.values",
        "update.parts[1].dense.values",
        "update.parts[2].dense.values",
    ]
    assert all(isinstance(v, memoryview) and v.readonly for v in bulk.values())
    assert message.update.parts[0].sparse.indices == reference.update.parts[0].sparse.indices  # small: kept
    assert message.update.parts[1].dense.values == b""
    for path, value in bulk.items():
        part = int(path.split("[")[1][0])
        kind = "sparse" if "sparse" in path else "dense"
        getattr(message.update.parts[part], kind).values = bytes(value)
    assert message == reference


def test_a_field_just_under_the_threshold_stays_in_the_protobuf() -> None:
    for size, cut in ((BULK_MIN - 1, False), (BULK_MIN, True)):
        message = ProtoCoordinatorMessage()
        message.round.iterate = _blob(size)
        parsed, bulk = splice.parse(ProtoCoordinatorMessage, message.SerializeToString())
        assert ("round.iterate" in bulk) is cut
        assert (bytes(bulk["round.iterate"]) if cut else parsed.round.iterate) == message.round.iterate


def test_a_message_without_bulk_parses_as_protobuf_does() -> None:
    message = ProtoCoordinatorMessage()
    message.round.round = 9
    message.round.iterate = _blob(BULK_MIN * 2)
    message.round.digest = b"12345678"
    assert splice.serialize(message) == message.SerializeToString()
    small = ProtoCoordinatorMessage()
    small.done.rounds = 4
    assert splice.parse(ProtoCoordinatorMessage, small.SerializeToString()) == (small, {})


def test_serialize_refuses_a_path_the_message_does_not_have() -> None:
    stripped, _, _ = _update_with_bulk()
    with pytest.raises(ValueError, match="no field 'values'"):
        splice.serialize(stripped, {"update.values": memoryview(b"x")})
    with pytest.raises(ValueError, match=r"parts\[5\]"):
        splice.serialize(stripped, {"update.parts[5].dense.values": memoryview(b"x")})
    with pytest.raises(ValueError, match="not a bytes field"):
        splice.serialize(stripped, {"update.round": memoryview(b"x")})


def _large_round() -> bytes:
    message = ProtoCoordinatorMessage()
    message.round.round = 2
    message.round.iterate = _blob(BULK_MIN)
    return message.SerializeToString()


def test_parse_refuses_what_protobuf_would_merge() -> None:
    data = _large_round()
    twice = data + ProtoCoordinatorMessage(round={"round": 3}).SerializeToString()  # `round` again
    with pytest.raises(DecodeError, match="round occurs twice"):
        splice.parse(ProtoCoordinatorMessage, twice)
    other = data + ProtoCoordinatorMessage(done={"rounds": 1}).SerializeToString()  # another oneof member
    with pytest.raises(DecodeError, match="round and done both set"):
        splice.parse(ProtoCoordinatorMessage, other)
    inner = ProtoCoordinatorMessage()
    inner.round.iterate = _blob(BULK_MIN)
    body = inner.round.SerializeToString() + inner.round.SerializeToString()  # iterate twice in one round
    with pytest.raises(DecodeError, match="round.iterate occurs twice"):
        splice.parse(ProtoCoordinatorMessage, b"\x12" + splice._varint(len(body)) + body)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: d[:-1], "overruns its message"),
        (lambda d: d + b"\x80", "truncated"),
        (lambda d: d + b"\xff" * 11, "longer than 10 bytes|truncated"),
        (lambda d: d + b"\x7b", "wire type 3"),
        (lambda d: d + b"\x7d\x00", "fixed-size value"),
    ],
)
def test_parse_refuses_broken_framing(damage, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        splice.parse(ProtoCoordinatorMessage, damage(_large_round()))


@pytest.mark.parametrize("chunk_bytes", [BULK_MIN // 3, 1 << 30])
def test_a_d_vector_crosses_the_wire_as_one_copy_with_the_bytes_protobuf_would_meter(chunk_bytes: int) -> None:
    """A dense update and a sparse one large enough to be cut out, through the codec, frames and
    the Reassembler (chunked, or not): same values, same metered bytes as plain protobuf."""
    d = 3 * BULK_MIN // 4
    x = RNG.standard_normal(d).astype(np.float32)
    idx = np.sort(RNG.choice(d, d // 2, replace=False))
    message = Message(Mode.DELTA, (DenseVector(x, "float32"), SparseVector(d, idx, x[idx], "float32")))
    envelope, bulk = ProtoWorkerMessage(), Bulk()
    codec.fill_update(envelope.update, 4, 0, message, bulk)
    assert sorted(bulk) == ["update.parts[0].dense.values", "update.parts[1].sparse.values"]
    reference = ProtoWorkerMessage(update=codec.message_to_proto(4, 0, message))
    sent = frames(envelope, chunk_bytes, bulk)
    assert [len(f) for f in sent] == [len(f) for f in frames(reference, chunk_bytes)]
    meter = Meter()
    inbound = Reassembler(ProtoWorkerMessage, meter, 1 << 24)
    received = None
    for frame in sent:
        received = inbound.feed(frame)
    assert received is not None and received.bulk
    decoded = codec.message_from_proto(received.message.update, d, 4, 0, received.bulk)
    assert decoded.dense(d).tobytes() == message.dense(d).tobytes()
    assert meter.received["round"] == sum(len(f) + 5 for f in sent)


@pytest.mark.parametrize("chunk_bytes", [1 << 10, 7919, BULK_MIN - 1, BULK_MIN + 3, 2 * BULK_MIN + 17])
def test_chunks_cut_from_the_pieces_carry_the_bytes_protobuf_would_write(chunk_bytes: int) -> None:
    """Chunk boundaries anywhere (inside a bulk field, inside the rest, on a seam): the chunks'
    data joined is the message serialized whole (protobuf reads the reference message from it),
    and the first chunk announces its size."""
    stripped, bulk, reference = _update_with_bulk()
    whole = splice.serialize(stripped, bulk)
    assert ProtoWorkerMessage.FromString(whole) == reference
    sent = frames(stripped, chunk_bytes, bulk)
    chunks = [ProtoWorkerMessage.FromString(f).chunk for f in sent]
    assert len(sent) == -(-len(whole) // chunk_bytes) > 1
    assert b"".join(c.data for c in chunks) == whole
    assert [c.total_bytes for c in chunks] == [len(whole)] + [0] * (len(chunks) - 1)
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    received = None
    inbound = Reassembler(ProtoWorkerMessage, Meter(), 1 << 24)
    for frame in sent:
        received = inbound.feed(frame)
    assert received is not None
    assert ProtoWorkerMessage.FromString(splice.serialize(received.message, received.bulk)) == reference


def test_a_dense_round_and_diagnostics_travel_cut_out() -> None:
    d = BULK_MIN // 2
    x = RNG.standard_normal(d).astype(np.float32)
    g_sum = RNG.standard_normal(d)
    envelope, bulk = ProtoCoordinatorMessage(), Bulk()
    codec.fill_round(envelope.round, 7, x, g_sum, b"digest!!", bulk)
    assert sorted(bulk) == ["round.aggregate_sum", "round.iterate"]
    message, cut = splice.parse(ProtoCoordinatorMessage, frames(envelope, 1 << 30, bulk)[0])
    assert np.array_equal(codec.iterate_from_proto(message.round, d, cut), x)
    assert np.array_equal(codec.aggregate_from_proto(message.round, d, cut), g_sum)
    worker, bulk = ProtoWorkerMessage(), Bulk()
    codec.fill_diagnostics(worker.diagnostics, 7, 2, 0.5, g_sum, bulk)
    message, cut = splice.parse(ProtoWorkerMessage, frames(worker, 1 << 30, bulk)[0])
    loss, grad = codec.diagnostics_from_proto(message.diagnostics, d, 7, 2, cut)
    assert loss == 0.5 and np.array_equal(grad, g_sum)
