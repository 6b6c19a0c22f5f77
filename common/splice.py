"""Bulk `bytes` fields spliced around protobuf, in the same wire format, without protobuf's copies.

Setting a bytes field copies it into the message, serializing copies it again, and on the other
end parsing copies it once more and every read of the field once more: four passes over a d-vector
that only needs to cross the wire. Here the codec hands bulk fields over by path instead
("round.iterate", "update.parts[0].dense.values": the envelope's field, then each nested field,
`[i]` for an element of a repeated message):

- `serialize(message, bulk)` serializes the message without them and splices each one into its
  nested message (fixing the enclosing lengths): one copy of each, into the frame.
- `parse(envelope, data)` cuts every bytes field of `BULK_MIN` bytes or more out of `data` before
  protobuf parses the rest, and returns them as read-only views of `data`, by path.

The bytes on the wire are those protobuf itself would write (a field may come later within its
message, which protobuf allows), so either end may be plain protobuf. Where `parse` walks (a
message of BULK_MIN bytes or more, and the large messages nested in it), it refuses what no
serializer writes and protobuf would merge: a singular field twice, or two fields of one oneof.
So the paths it names are the fields protobuf would have read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message as ProtoMessage
from typing_extensions import Buffer  # collections.abc's from Python 3.12

from threepc.common.errors import DecodeError

BULK_MIN = 64 * 1024  # smaller fields go through protobuf: below this its copies cost less than the splicing

Bulk = dict[str, memoryview]  # path -> bytes of the field's value
_LENGTH_DELIMITED = 2
_FIXED = {1: 8, 5: 4}  # wire type -> bytes of a fixed-size value (64-bit, 32-bit)

M = TypeVar("M", bound=ProtoMessage)


def byte_view(buffer: Buffer) -> memoryview:
    """A flat view of `buffer`'s bytes (of a numpy array, of any C-contiguous format)."""
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# ----------------------------------------------------------------------------- send


def serialize(message: ProtoMessage, bulk: Mapping[str, Buffer | list[Buffer]] | None = None) -> bytes:
    """`message` serialized with each bulk field set: the bytes of `bulk[path]` at `path` (a list
    of buffers: their bytes one after another)."""
    return b"".join(pieces(message, bulk))


def pieces(message: ProtoMessage, bulk: Mapping[str, Buffer | list[Buffer]] | None = None) -> list[memoryview]:
    """`serialize`'s bytes as the pieces they are joined from: views of the bulk buffers and of
    the rest of the message (to cut them into chunks without first joining them)."""
    data = memoryview(message.SerializeToString())
    if not bulk:
        return [data]
    tree: dict[str, Any] = {}
    for path, value in bulk.items():
        *parents, leaf = path.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = [byte_view(v) for v in value] if isinstance(value, list) else [byte_view(value)]
    spliced, _ = _splice(data, 0, len(data), message.DESCRIPTOR, tree)
    return spliced


def _splice(data: memoryview, start: int, end: int, descriptor: Descriptor, tree: dict) -> tuple[list, int]:
    """The pieces of the message in data[start:end] with `tree`'s fields added, and their size."""
    pieces: list[Buffer] = []
    keep = start  # data[keep:pos] is copied as it is
    spliced: set[str] = set()
    seen: dict[str, int] = {}
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint_at(data, pos, end)
        if key & 7 != _LENGTH_DELIMITED:
            pos = _skip(data, pos, end, key & 7)
            continue
        length, body = _varint_at(data, pos, end)
        pos = body + length
        field = descriptor.fields_by_number.get(key >> 3)
        if field is None or field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        name = _name(field, seen)
        inner = tree.get(name) if name is not None else None
        if name is not None and isinstance(inner, dict):
            inner_pieces, size = _splice(data, body, pos, field.message_type, inner)
            pieces += [data[keep:field_start], _varint(key), _varint(size), *inner_pieces]
            keep = pos
            spliced.add(name)
    pieces.append(data[keep:end])
    for name, value in tree.items():
        if name in spliced:
            continue
        field = descriptor.fields_by_name.get(name)
        if field is None:
            raise ValueError(f"{descriptor.full_name} has no field {name!r} (or no element {name!r} to splice into)")
        if isinstance(value, dict):  # a message protobuf left out (empty): it holds only bulk fields
            value_pieces, size = _splice(memoryview(b""), 0, 0, field.message_type, value)
            pieces += [_varint(field.number << 3 | _LENGTH_DELIMITED), _varint(size), *value_pieces]
        else:
            if field.type != FieldDescriptor.TYPE_BYTES:
                raise ValueError(f"{descriptor.full_name}.{name} is not a bytes field")
            pieces += [_varint(field.number << 3 | _LENGTH_DELIMITED), _varint(sum(v.nbytes for v in value)), *value]
    views = [memoryview(p) for p in pieces]
    return views, sum(v.nbytes for v in views)


# ----------------------------------------------------------------------------- receive


def parse(envelope: type[M], data: Buffer) -> tuple[M, Bulk]:
    """`data` parsed as `envelope`, its bytes fields of BULK_MIN bytes or more apart, by path.

    DecodeError if the framing around those fields is malformed; protobuf's own errors (in the
    rest) propagate as protobuf raises them."""
    bulk: Bulk = {}
    view = byte_view(data).toreadonly()  # bulk views must not write into the frame
    rest: Buffer = view
    if view.nbytes >= BULK_MIN:
        pieces = _strip(view, 0, view.nbytes, envelope.DESCRIPTOR, "", bulk)
        if bulk:
            rest = b"".join(pieces)
    message = envelope()
    message.ParseFromString(rest)
    return message, bulk


def _strip(data: memoryview, start: int, end: int, descriptor: Descriptor, prefix: str, bulk: Bulk) -> list:
    """The pieces of the message in data[start:end] without its large bytes fields (into `bulk`)."""
    pieces: list[Buffer] = []
    keep = start
    seen: dict[str, int] = {}
    oneofs: dict[str, str] = {}
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint_at(data, pos, end)
        field = descriptor.fields_by_number.get(key >> 3)
        if field is not None:
            _check_once(field, seen, oneofs, prefix)
        if key & 7 != _LENGTH_DELIMITED:
            pos = _skip(data, pos, end, key & 7)
            continue
        length, body = _varint_at(data, pos, end)
        pos = body + length
        if pos > end:
            raise DecodeError(f"message: a field of {length} bytes overruns its message ({end - body} left)")
        if field is None:
            continue
        name = _name(field, seen)
        if length < BULK_MIN or name is None:
            continue
        if field.type == FieldDescriptor.TYPE_BYTES:
            bulk[prefix + name] = data[body:pos]
            pieces.append(data[keep:field_start])
            keep = pos
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = _strip(data, body, pos, field.message_type, f"{prefix}{name}.", bulk)
            size = sum(memoryview(p).nbytes for p in inner)
            pieces += [data[keep:field_start], _varint(key), _varint(size), *inner]
            keep = pos
    pieces.append(data[keep:end])
    return pieces


# ----------------------------------------------------------------------------- wire format


def _check_once(field: FieldDescriptor, seen: dict[str, int], oneofs: dict[str, str], prefix: str) -> None:
    """DecodeError if a singular field, or another field of its oneof, came before."""
    if _repeated(field):
        return
    if field.name in seen:
        raise DecodeError(f"message: {prefix}{field.name} occurs twice")
    seen[field.name] = 1
    oneof = field.containing_oneof
    if oneof is not None:
        if oneof.name in oneofs:
            raise DecodeError(f"message: {prefix}{oneofs[oneof.name]} and {prefix}{field.name} both set (oneof {oneof.name})")
        oneofs[oneof.name] = field.name


def _name(field: FieldDescriptor, seen: dict[str, int]) -> str | None:
    """The field's path component: its name, `name[i]` for the i-th element of a repeated
    message, None for other repeated fields (packed scalars, repeated bytes: never bulk)."""
    if not _repeated(field):
        return field.name
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        return None
    index = seen.get(field.name, 0)
    seen[field.name] = index + 1
    return f"{field.name}[{index}]"


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6.32 (`label` is gone in 7)
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_at(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at data[pos] and the position after it."""
    value = shift = 0
    while shift < 64:
        if pos >= end:
            raise DecodeError("message: truncated (a varint runs past its message)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise DecodeError("message: a varint longer than 10 bytes")


def _skip(data: memoryview, pos: int, end: int, wire_type: int) -> int:
    """The position after a value of `wire_type` (varint or fixed) at data[pos]."""
    if wire_type == 0:
        return _varint_at(data, pos, end)[1]
    if wire_type in _FIXED:
        if pos + _FIXED[wire_type] > end:
            raise DecodeError("message: truncated (a fixed-size value runs past its message)")
        return pos + _FIXED[wire_type]
    raise DecodeError(f"message: wire type {wire_type} (groups are not part of this protocol)")
