"""Typed payloads <-> protobuf messages, in `x_to_proto` / `x_from_proto` pairs.

The only module that knows both the math's payloads and the wire's messages. Every decoder
validates before it returns (dimension, counts, lengths of packed fields, index range and order,
level range, NaN/Inf, round and worker id) and raises `DecodeError` naming the field; nothing it
returns can corrupt the aggregate.

Bulk fields: an encoder given a `bulk` dict puts each field of `BULK_MIN` bytes or more there, by
its path ("update.parts[0].dense.values"), instead of into the protobuf, and `wire.frames`
splices them in; a decoder reads a field from the `bulk` its frame was parsed with, where it was
cut out (`wire.Received.bulk`), else from the protobuf. Either way the same bytes cross the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from threepc.common import bitpack
from threepc.common.errors import DecodeError
from threepc.common.hadamard import padded_size
from threepc.common.payloads import (
    Chosen,
    DenseVector,
    Expect,
    Grid,
    IndexRule,
    Message,
    Mode,
    PartKind,
    QuantizedVector,
    SeededQuantizedVector,
    SeededSparseVector,
    SignVector,
    SparseVector,
    VectorPayload,
    largest_magnitude,
    perm_k_block,
)
from threepc.common.splice import BULK_MIN, Buffer, Bulk, byte_view
from threepc.proto.threepc_pb2 import Diagnostics as ProtoDiagnostics
from threepc.proto.threepc_pb2 import Dtype as ProtoDtype
from threepc.proto.threepc_pb2 import Part as ProtoPart
from threepc.proto.threepc_pb2 import QuantizedVector as ProtoQuantizedVector
from threepc.proto.threepc_pb2 import Restore as ProtoRestore
from threepc.proto.threepc_pb2 import Round as ProtoRound
from threepc.proto.threepc_pb2 import Update as ProtoUpdate

# ----------------------------------------------------------------------------- values

_DTYPE_TO_PROTO = {
    "float64": ProtoDtype.FLOAT64,
    "float32": ProtoDtype.FLOAT32,
    "float16": ProtoDtype.FLOAT16,
    "bfloat16": ProtoDtype.BFLOAT16,
}
_DTYPE_FROM_PROTO = {v: k for k, v in _DTYPE_TO_PROTO.items()}
_NUMPY = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


NO_BULK: Mapping[str, Buffer] = {}


def _wire_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` (already rounded to `dtype`) as the little-endian array whose bytes travel;
    bfloat16 as float32's top half. No copy where `values` already is that array."""
    if dtype == "bfloat16":
        top = np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16
        return top.astype("<u2")
    return np.ascontiguousarray(values, dtype=_NUMPY[dtype])


def values_to_bytes(values: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of `values` (already rounded to `dtype`); bfloat16 as float32's top half."""
    return _wire_values(values, dtype).tobytes()


def _put(proto: Any, name: str, data: Buffer, path: str, bulk: Bulk | None) -> None:
    """proto.<name> = data, or data into `bulk` at `path` if it is large (spliced in unchanged)."""
    if bulk is not None and memoryview(data).nbytes >= BULK_MIN:
        bulk[path] = byte_view(data)
    else:
        setattr(proto, name, bytes(data))


def _put_values(proto: Any, name: str, values: np.ndarray, dtype: str, path: str, bulk: Bulk | None) -> None:
    _put(proto, name, _wire_values(values, dtype), path, bulk)


def _get(proto: Any, name: str, path: str, bulk: Mapping[str, Buffer]) -> Buffer:
    """The bytes of proto.<name>, or of the field cut out of its frame at `path`."""
    return bulk[path] if path in bulk else getattr(proto, name)


def values_from_bytes(data: Buffer, proto_dtype: int, count: int, field: str) -> tuple[np.ndarray, str]:
    """`count` finite values from `data`; DecodeError on a wrong dtype, length or NaN/Inf."""
    values, dtype = _parse_values(data, proto_dtype, count, field)
    if not np.isfinite(values).all():
        raise DecodeError(f"{field}: contains NaN or Inf")
    return values, dtype


def _parse_values(data: Buffer, proto_dtype: int, count: int, field: str) -> tuple[np.ndarray, str]:
    """`count` values from `data` (not yet checked finite); DecodeError on a wrong dtype or length."""
    dtype = _DTYPE_FROM_PROTO.get(proto_dtype)
    if dtype is None:
        raise DecodeError(f"{field}: unknown dtype {proto_dtype}")
    nbytes = memoryview(data).nbytes
    if nbytes != count * _ITEMSIZE[dtype]:
        raise DecodeError(
            f"{field}: {nbytes} bytes, expected {count} {dtype} values = {count * _ITEMSIZE[dtype]} bytes"
        )
    if dtype == "bfloat16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32), dtype
    return np.frombuffer(data, _NUMPY[dtype]), dtype


# ----------------------------------------------------------------------------- vector payloads


def fill_part(proto: ProtoPart, part: VectorPayload, bulk: Bulk | None = None, field: str = "part") -> None:
    """Write `part` into `proto` in place (building nested messages by constructor copies
    every bulk field once more: 0.5 s for a dense d = 1e7 vector); `field` is its path."""
    if isinstance(part, Chosen):
        proto.choice_bits = part.flag_bits
        part = part.payload
    if isinstance(part, DenseVector):
        proto.dense.dtype = _DTYPE_TO_PROTO[part.dtype]
        _put_values(proto.dense, "values", part.values, part.dtype, f"{field}.dense.values", bulk)
    elif isinstance(part, SparseVector):
        coding, packed, _ = bitpack.encode_indices(part.indices, part.size)
        sparse = proto.sparse
        sparse.count = int(part.indices.size)
        sparse.index_coding = int(coding)
        _put(sparse, "indices", packed, f"{field}.sparse.indices", bulk)
        sparse.dtype = _DTYPE_TO_PROTO[part.dtype]
        _put_values(sparse, "values", part.values, part.dtype, f"{field}.sparse.values", bulk)
    elif isinstance(part, SeededSparseVector):
        seeded = proto.seeded
        seeded.rule = int(part.rule)
        seeded.seed = part.seed
        seeded.count = int(part.values.size)
        seeded.block = part.block
        seeded.blocks = part.blocks
        seeded.dtype = _DTYPE_TO_PROTO[part.dtype]
        _put_values(seeded, "values", part.values, part.dtype, f"{field}.seeded.values", bulk)
    elif isinstance(part, QuantizedVector):
        _fill_quantized(proto.quantized, part, bulk, f"{field}.quantized")
    elif isinstance(part, SeededQuantizedVector):
        sq = proto.seeded_quantized
        sq.rule = int(part.rule)
        sq.seed = part.seed
        sq.block = part.block
        sq.blocks = part.blocks
        _fill_quantized(sq.quantized, part.quantized, bulk, f"{field}.seeded_quantized.quantized")
    elif isinstance(part, SignVector):
        sign = proto.sign
        sign.scale = part.scale
        _put(sign, "signs", bitpack.pack_bits(part.negative), f"{field}.sign.signs", bulk)
        sign.rotation_seed = part.rotation_seed
        sign.rotated = part.rotated
    else:
        raise TypeError(f"no wire form for {type(part).__name__}")


def _fill_quantized(q: ProtoQuantizedVector, part: QuantizedVector, bulk: Bulk | None, field: str) -> None:
    q.grid = int(part.grid)
    q.levels = part.levels
    q.scale = part.scale
    q.offset = part.offset
    q.signed = part.negative is not None
    if part.negative is not None:
        _put(q, "signs", bitpack.pack_bits(part.negative), f"{field}.signs", bulk)
    q.level_bits = part.level_bits
    _put(q, "level_codes", bitpack.pack_uints(part.level_codes, part.level_bits), f"{field}.level_codes", bulk)
    q.seed = part.seed


def part_to_proto(part: VectorPayload) -> ProtoPart:
    proto = ProtoPart()
    fill_part(proto, part)
    return proto


_R = TypeVar("_R")
# Scales and offsets travel as float32-sized figures (payloads.SCALE_BITS); bounding them to
# float32's range keeps every decoded value finite in float64 (2^127 * 3.4e38 for Grid.EXPONENT,
# sqrt(d') * 3.4e38 after DRIVE's inverse rotation).
_SCALE_MAX = float(np.finfo(np.float32).max)


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise DecodeError(f"{field}: not finite ({value})")
    return value


def _scale(value: float, field: str) -> float:
    """A finite scale or offset within float32's range."""
    if abs(_finite(value, field)) > _SCALE_MAX:
        raise DecodeError(f"{field}: {value} beyond float32's range (|x| <= {_SCALE_MAX:.7g})")
    return value


def _packed(field: str, decode: Callable[..., _R], *args: object) -> _R:
    """A bitpack decoder's result, its DecodeError prefixed with the wire field's name."""
    try:
        return decode(*args)
    except DecodeError as err:
        raise DecodeError(f"{field}: {err}") from None


MAX_CHOICE_BITS = 2

# Payload classes by the wire's oneof name: the kind of a part, read from its header alone.
_KIND = {
    "dense": DenseVector,
    "sparse": SparseVector,
    "seeded": SeededSparseVector,
    "quantized": QuantizedVector,
    "seeded_quantized": SeededQuantizedVector,
    "sign": SignVector,
}


def part_from_proto(
    proto: ProtoPart,
    d: int,
    field: str = "part",
    bulk: Mapping[str, Buffer] = NO_BULK,
    expect: Expect | None = None,
) -> VectorPayload:
    """A validated vector payload of dimension d (wrapped in `Chosen` if it carries a choice).

    With `expect` (what the run's method sends): values in another dtype than the run's, or
    beyond its state dtype's range, are refused, and PermK may cut d into up to n blocks (else
    up to d: without n, a block count is bounded by what d allows)."""
    if proto.choice_bits > MAX_CHOICE_BITS:
        raise DecodeError(f"{field}.choice_bits: {proto.choice_bits}, at most {MAX_CHOICE_BITS}")
    payload = _payload_from_proto(proto, d, field, bulk, expect)
    return Chosen(payload, proto.choice_bits) if proto.choice_bits else payload


def _values(
    data: Buffer, proto_dtype: int, count: int, field: str, expect: Expect | None
) -> tuple[np.ndarray, str, float]:
    """values_from_bytes and their largest |value|; with `expect`: in the run's value dtype,
    within its state dtype's range (a float64 value of 1e39 is finite, and no float32 state's)."""
    values, dtype = _parse_values(data, proto_dtype, count, field)
    top = largest_magnitude(values)  # NaN or Inf if any is: the same pass as a finiteness check
    if not math.isfinite(top):
        raise DecodeError(f"{field}: contains NaN or Inf")
    if expect is None:
        return values, dtype, top
    if dtype != expect.value_dtype:
        raise DecodeError(f"{field}: {dtype} values, this run sends {expect.value_dtype} (wire.value_dtype)")
    if top > expect.bound:
        raise DecodeError(f"{field}: |value| up to {top:.7g}, beyond the state dtype's range (|x| <= {expect.bound:.7g})")
    return values, dtype, top


def _blocks_bound(d: int, expect: Expect | None) -> int:
    """The most blocks PermK may cut d into: n (n > d: a coordinate shared by ~n/d workers)."""
    return d if expect is None else expect.workers


def _payload_from_proto(
    proto: ProtoPart, d: int, field: str, bulk: Mapping[str, Buffer], expect: Expect | None
) -> VectorPayload:
    kind = proto.WhichOneof("kind")
    if kind == "dense":
        path = f"{field}.dense.values"
        values, dtype, top = _values(_get(proto.dense, "values", path, bulk), proto.dense.dtype, d, path, expect)
        return DenseVector(values, dtype, top)
    if kind == "sparse":
        sp = proto.sparse
        if sp.count > d:
            raise DecodeError(f"{field}.sparse.count: {sp.count} > d = {d}")
        path = f"{field}.sparse.indices"
        indices = _packed(path, bitpack.decode_indices, sp.index_coding, _get(sp, "indices", path, bulk), sp.count, d)
        path = f"{field}.sparse.values"
        values, dtype, _ = _values(_get(sp, "values", path, bulk), sp.dtype, sp.count, path, expect)
        return SparseVector(d, indices, values, dtype)
    if kind == "seeded":
        ss = proto.seeded
        if ss.rule not in IndexRule._value2member_map_:
            raise DecodeError(f"{field}.seeded.rule: unknown rule {ss.rule}")
        rule = IndexRule(ss.rule)
        if ss.count > d:
            raise DecodeError(f"{field}.seeded.count: {ss.count} > d = {d}")
        limit = _blocks_bound(d, expect)
        if rule is IndexRule.PERM_K and not (0 < ss.blocks <= limit and ss.block < ss.blocks):
            raise DecodeError(f"{field}.seeded: block {ss.block} of {ss.blocks} invalid (blocks in [1, {limit}])")
        path = f"{field}.seeded.values"
        values, dtype, _ = _values(_get(ss, "values", path, bulk), ss.dtype, ss.count, path, expect)
        payload = SeededSparseVector(rule, ss.seed, values, ss.block, ss.blocks, dtype)
        if rule is IndexRule.PERM_K and payload.indices(d).size != ss.count:
            raise DecodeError(f"{field}.seeded.count: {ss.count} values for a block of {payload.indices(d).size}")
        return payload
    if kind == "quantized":
        return _quantized_from_proto(proto.quantized, d, f"{field}.quantized", bulk)
    if kind == "seeded_quantized":
        sq = proto.seeded_quantized
        if sq.rule != IndexRule.PERM_K:
            raise DecodeError(f"{field}.seeded_quantized.rule: {sq.rule}, expected PERM_K")
        limit = _blocks_bound(d, expect)
        if not (0 < sq.blocks <= limit and sq.block < sq.blocks):
            raise DecodeError(
                f"{field}.seeded_quantized: block {sq.block} of {sq.blocks} invalid (blocks in [1, {limit}])"
            )
        count = int(perm_k_block(d, sq.seed, sq.block, sq.blocks)[0].size)
        quantized = _quantized_from_proto(sq.quantized, count, f"{field}.seeded_quantized.quantized", bulk)
        return SeededQuantizedVector(IndexRule.PERM_K, sq.seed, sq.block, sq.blocks, quantized)
    if kind == "sign":
        s = proto.sign
        count = padded_size(d) if s.rotated else d  # DRIVE sends d' = 2^ceil(log2 d) signs
        path = f"{field}.sign.signs"
        negative = _packed(path, bitpack.unpack_bits, _get(s, "signs", path, bulk), count)
        return SignVector(_scale(s.scale, f"{field}.sign.scale"), negative, s.rotation_seed, s.rotated)
    raise DecodeError(f"{field}: unknown or missing payload kind")


def _quantized_from_proto(
    q: ProtoQuantizedVector, count: int, field: str, bulk: Mapping[str, Buffer]
) -> QuantizedVector:
    """`count` validated levels (and signs) on a known grid, scales within float32's range."""
    if q.grid not in Grid._value2member_map_:
        raise DecodeError(f"{field}.grid: unknown grid {q.grid}")
    if not 1 <= q.level_bits <= 32:
        raise DecodeError(f"{field}.level_bits: {q.level_bits} not in [1, 32]")
    grid = Grid(q.grid)
    if grid in (Grid.UNIFORM, Grid.NATURAL) and q.levels < 1:
        raise DecodeError(f"{field}.levels: {q.levels}, expected s >= 1 for grid {grid.name}")
    path = f"{field}.level_codes"
    codes = _packed(path, bitpack.unpack_uints, _get(q, "level_codes", path, bulk), count, q.level_bits)
    top = 254 if grid is Grid.EXPONENT else (q.levels - 1 if grid is Grid.RANGE else q.levels)
    if codes.size and int(codes.max()) > top:
        raise DecodeError(f"{field}.level_codes: level {int(codes.max())} > {top}")
    path = f"{field}.signs"
    negative = _packed(path, bitpack.unpack_bits, _get(q, "signs", path, bulk), count) if q.signed else None
    return QuantizedVector(
        grid,
        q.levels,
        _scale(q.scale, f"{field}.scale"),
        codes.astype(np.uint32),
        q.level_bits,
        negative,
        _scale(q.offset, f"{field}.offset"),
        q.seed,
    )


# ----------------------------------------------------------------------------- round messages


def fill_update(
    proto: ProtoUpdate, t: int, worker_id: int, message: Message, bulk: Bulk | None = None
) -> ProtoUpdate:
    """Write round t's message into `proto` (`envelope.update`) in place; returns it."""
    proto.round = t
    proto.worker_id = worker_id
    proto.mode = int(message.mode)
    proto.flag_bits = message.flag_bits
    for i, part in enumerate(message.parts):
        fill_part(proto.parts.add(), part, bulk, f"update.parts[{i}]")
    return proto


def message_to_proto(t: int, worker_id: int, message: Message) -> ProtoUpdate:
    return fill_update(ProtoUpdate(), t, worker_id, message)


MAX_PARTS = 4  # the largest composition (3PCv3 over 3PCv2) sends three parts


def message_from_proto(
    proto: ProtoUpdate,
    d: int,
    t: int,
    worker_id: int,
    bulk: Mapping[str, Buffer] = NO_BULK,
    expect: Expect | None = None,
) -> Message:
    """A validated Message for round t from worker `worker_id`, dimension d.

    `expect`: what the run's method sends this worker now (`Aggregator.expects`); a message of
    another form (a dense update in an EF21/TopK round, a REPLACE where only DELTA is sent) is
    refused from its header, before its values are read, and so are values in another dtype or
    beyond the state dtype's range. None: any well-formed message (tests, benchmarks)."""
    if proto.round != t:
        raise DecodeError(f"update.round: {proto.round}, expected the current round {t}")
    if proto.worker_id != worker_id:
        raise DecodeError(f"update.worker_id: {proto.worker_id}, but this stream speaks for worker {worker_id}")
    if proto.mode not in Mode._value2member_map_:
        raise DecodeError(f"update.mode: unknown mode {proto.mode}")
    if len(proto.parts) > MAX_PARTS:
        raise DecodeError(f"update.parts: {len(proto.parts)} parts, at most {MAX_PARTS}")
    if proto.flag_bits > 1:
        raise DecodeError(f"update.flag_bits: {proto.flag_bits}, expected 0 or 1")
    if expect is not None:
        kinds = [_KIND.get(p.WhichOneof("kind") or "") for p in proto.parts]
        if all(kinds):  # else the part's own decoder names what is missing
            sent = tuple(PartKind(k, p.choice_bits > 0) for k, p in zip(kinds, proto.parts))
            if not expect.admits(Mode(proto.mode), sent):
                form = f"{Mode(proto.mode).name}({', '.join(map(str, sent))})"
                raise DecodeError(f"update: a message of form {form}, but this run's method sends {expect.describe()}")
    parts = tuple(part_from_proto(p, d, f"update.parts[{i}]", bulk, expect) for i, p in enumerate(proto.parts))
    return Message(Mode(proto.mode), parts, proto.flag_bits)


def fill_round(
    proto: ProtoRound,
    t: int,
    x: np.ndarray,
    aggregate_sum: np.ndarray | None = None,
    digest: bytes = b"",
    bulk: Bulk | None = None,
) -> ProtoRound:
    """Write x^t densely into `proto` (`envelope.round`) in place; returns it. Under the
    delta downlink a dense round also carries g_sum, so the worker can follow from it (a flag
    instead where it is all zeros: round 0's, 8 d bytes to every worker for nothing)."""
    dtype = x.dtype.name
    proto.round = t
    proto.dtype = _DTYPE_TO_PROTO[dtype]
    _put_values(proto, "iterate", x, dtype, "round.iterate", bulk)
    if aggregate_sum is not None:
        if aggregate_sum.any():
            _put_values(proto, "aggregate_sum", aggregate_sum, "float64", "round.aggregate_sum", bulk)
        else:
            proto.aggregate_zero = True
    proto.digest = digest
    return proto


def fill_round_change(
    proto: ProtoRound,
    t: int,
    dtype: str,
    indices: np.ndarray | None,
    values: np.ndarray,
    d: int,
    digest: bytes,
    bulk: Bulk | None = None,
) -> ProtoRound:
    """Write round t as the change of g_sum (delta downlink) into `proto` (`envelope.round`); returns it.

    `indices` None (or all d of them): every coordinate changed, and no indices travel (d sorted
    distinct indices in [0, d) can only be 0..d-1)."""
    proto.round = t
    proto.dtype = _DTYPE_TO_PROTO[dtype]
    proto.delta = True
    proto.change_count = d if indices is None else int(indices.size)
    if proto.change_count < d:
        coding, packed, _ = bitpack.encode_indices(indices, d)
        proto.change_coding = int(coding)
        _put(proto, "change_indices", packed, "round.change_indices", bulk)
    _put_values(proto, "change_values", values, "float64", "round.change_values", bulk)
    proto.digest = digest
    return proto


def round_change_from_proto(
    proto: ProtoRound, d: int, bulk: Mapping[str, Buffer] = NO_BULK
) -> tuple[np.ndarray | None, np.ndarray]:
    """The (indices, new g_sum values) of a delta round, validated; indices None: all d."""
    if proto.change_count > d:
        raise DecodeError(f"round.change_count: {proto.change_count} > d = {d}")
    indices = None
    if proto.change_count < d:
        path = "round.change_indices"
        packed = _get(proto, "change_indices", path, bulk)
        indices = _packed(path, bitpack.decode_indices, proto.change_coding, packed, proto.change_count, d)
    elif proto.change_indices or "round.change_indices" in bulk:
        raise DecodeError("round.change_indices: given for a change of all d coordinates (they must be left out)")
    path = "round.change_values"
    values, _ = values_from_bytes(_get(proto, "change_values", path, bulk), ProtoDtype.FLOAT64, proto.change_count, path)
    return indices, values


def aggregate_from_proto(proto: ProtoRound, d: int, bulk: Mapping[str, Buffer] = NO_BULK) -> np.ndarray | None:
    """g_sum from a dense round under the delta downlink; None if the round carries none."""
    path = "round.aggregate_sum"
    data = _get(proto, "aggregate_sum", path, bulk)
    if proto.aggregate_zero:
        if memoryview(data).nbytes:
            raise DecodeError(f"{path}: given with aggregate_zero (an all-zero g_sum is left out)")
        return np.zeros(d)
    if not memoryview(data).nbytes:
        return None
    values, _ = values_from_bytes(data, ProtoDtype.FLOAT64, d, path)
    return values


def iterate_from_proto(proto: ProtoRound, d: int, bulk: Mapping[str, Buffer] = NO_BULK) -> np.ndarray:
    values, _ = values_from_bytes(_get(proto, "iterate", "round.iterate", bulk), proto.dtype, d, "round.iterate")
    return values


def fill_diagnostics(
    proto: ProtoDiagnostics, t: int, worker_id: int, loss: float, grad: np.ndarray, bulk: Bulk | None = None
) -> ProtoDiagnostics:
    """Write round t's loss and float64 gradient into `proto` (`envelope.diagnostics`); returns it."""
    proto.round = t
    proto.worker_id = worker_id
    proto.loss = loss
    proto.dtype = ProtoDtype.FLOAT64
    _put_values(proto, "gradient", grad, "float64", "diagnostics.gradient", bulk)
    return proto


def diagnostics_from_proto(
    proto: ProtoDiagnostics, d: int, t: int, worker_id: int, bulk: Mapping[str, Buffer] = NO_BULK
) -> tuple[float, np.ndarray]:
    if proto.round != t or proto.worker_id != worker_id:
        raise DecodeError(
            f"diagnostics: round {proto.round} worker {proto.worker_id}, expected round {t} worker {worker_id}"
        )
    path = "diagnostics.gradient"
    grad, _ = values_from_bytes(_get(proto, "gradient", path, bulk), proto.dtype, d, path)
    return _finite(proto.loss, "diagnostics.loss"), np.asarray(grad, np.float64)  # no copy of float64


def fill_restore(
    proto: ProtoRestore,
    t: int,
    state: tuple[np.ndarray, np.ndarray] | None,
    path: str = "restore",
    bulk: Bulk | None = None,
) -> ProtoRestore:
    """Write the Restore for round t into `proto`, at `path` in its envelope ("restore", or
    "welcome.restore"): `state`, the mirror g_i^t and x^{t-1}, each at its own dtype (exact),
    or `has_state = false` if there is none. Returns it; `restore_from_proto` reads it back."""
    proto.round = t
    proto.has_state = state is not None
    if state is not None:
        mirror, x_prev = state
        proto.mirror_dtype = _DTYPE_TO_PROTO[mirror.dtype.name]
        _put_values(proto, "mirror", mirror, mirror.dtype.name, f"{path}.mirror", bulk)
        proto.x_prev_dtype = _DTYPE_TO_PROTO[x_prev.dtype.name]
        _put_values(proto, "x_prev", x_prev, x_prev.dtype.name, f"{path}.x_prev", bulk)
    return proto


def restore_from_proto(
    proto: ProtoRestore, d: int, path: str = "restore", bulk: Mapping[str, Buffer] = NO_BULK
) -> tuple[np.ndarray, np.ndarray] | None:
    """(h, x_prev) for WorkerNode.restore, or None for a fresh start; DecodeError if malformed."""
    if not proto.has_state:
        return None
    if not proto.round:
        raise DecodeError("restore.round: 0 with state, expected a round >= 1 (round 0 has no x^{-1})")
    h, _ = values_from_bytes(_get(proto, "mirror", f"{path}.mirror", bulk), proto.mirror_dtype, d, "restore.mirror")
    x_prev, _ = values_from_bytes(_get(proto, "x_prev", f"{path}.x_prev", bulk), proto.x_prev_dtype, d, "restore.x_prev")
    return h, x_prev
