"""Bytes on the wire and codec speed, per payload kind, against the information limit.

For every payload kind a worker can send (dense float32/float16/bfloat16, TopK at k/d in {0.1%,
1%, 10%}, seeded RandK, the quantizers and sign compressors that are registered in
`threepc.common.compressors.COMPRESSORS`, the lazy-aggregation skip, and a message of two parts)
it prints, per dimension d:

- `payload_bits`: `Message.bits()`, the exact bits the method is charged;
- `update_bytes`: the serialized `Update` protobuf;
- `wire_bytes`: what the coordinator's `Meter` counts for it: the `WorkerMessage` envelope as
  `threepc.common.wire.frames` splits it (chunks above `wire.chunk_bytes` as resolved for d), plus gRPC's
  5-byte frame per message;
- `limit_bits`: the information limit where an index set is coded: log2 C(d, k) for TopK's
  indices plus the value bits (seeded indices are free: only values count); null for kinds with
  no index set (dense, quantized, sign, skip);
- `naive_bytes`: int32 index + float32 value per sent coordinate (4 bytes per coordinate, no
  indices, for kinds that send all d coordinates); `npsave_bytes`: those same arrays serialized as
  Flower's `ndarray_to_bytes` does (`np.save` into a BytesIO, one buffer per array);
- `compress_s`, `encode_s` (`codec.fill_update` into an envelope + `SerializeToString`, as the
  worker sends it), `decode_s` (`Reassembler.feed` parse + `codec.message_from_proto`, as the
  coordinator receives it) and `dense_s` (`Message.dense(d)`, where lazy payloads draw their
  seeded indices or dequantize): medians after one warm-up call;
- on TopK rows `argpartition_s`: numpy's `argpartition` selecting the same k of |x|; and one
  `memcpy` row per d: `x.copy()` of the float64 input, the floor any round pays.

    .venv/bin/python -m threepc.benchmarks.bench_wire
    .venv/bin/python -m threepc.benchmarks.bench_wire --d 1e6 --json

Prints figures only; it never fails on timing (a kind that cannot be built or sent is printed
with its error instead of its figures).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from threepc.common import codec
from threepc.common.bitpack import log2_binomial
from threepc.common.compressors import COMPRESSORS, make_compressor
from threepc.common.config import RunConfig
from threepc.common.engine import chunk_bytes, message_limit
from threepc.common.payloads import (
    Message,
    Mode,
    SeededSparseVector,
    SparseVector,
    VectorPayload,
    skip,
)
from threepc.common.randomness import fixed
from threepc.common.splice import Bulk
from threepc.common.wire import FRAME_BYTES, Meter, Reassembler, frames
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage

DENSITIES = (0.001, 0.01, 0.1)
RAND_K_DENSITY = 0.01
N_WORKERS = 4  # for compressors that split coordinates among workers (PermK)
ROUND, WORKER = 1, 0

# Compressors that travel as quantized levels or signs, timed with their default parameters when
# registered (another module adds them; the benchmark takes whatever is there).
QUANTIZERS = ("qsgd", "natural_dithering", "natural_compression", "iq", "cq")
SIGNS = ("scaled_sign", "drive")
SEEDED = ("perm_k", "perm_k_cq")


@dataclass
class Row:
    kind: str
    d: int
    k: int | None
    payload_bits: int | None = None
    update_bytes: int | None = None
    wire_bytes: int | None = None
    limit_bits: float | None = None
    naive_bytes: int | None = None
    npsave_bytes: int | None = None
    compress_s: float | None = None
    encode_s: float | None = None
    decode_s: float | None = None
    dense_s: float | None = None
    argpartition_s: float | None = None
    error: str | None = None


def _median_s(repeats: int, fn: Callable[[], object], warm: bool = False) -> float:
    """Median wall time of fn() in seconds, after one warm-up call (caches, allocator) unless
    the caller just made one (`warm`)."""
    if not warm:
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sent_indices(part: VectorPayload, d: int) -> np.ndarray | None:
    """The coordinates a sparse part sends, or None if it sends all d."""
    if isinstance(part, SparseVector):
        return part.indices
    if isinstance(part, SeededSparseVector):
        return part.indices(d)
    return None


def sent_coordinates(message: Message, d: int) -> int:
    """Coordinates a message carries a value for (d for parts that send them all)."""
    total = 0
    for part in message.parts:
        idx = _sent_indices(part, d)
        total += d if idx is None else int(idx.size)
    return total


def _npsave(arr: np.ndarray) -> int:
    """Bytes of Flower's `ndarray_to_bytes`: np.save into a BytesIO."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return len(buf.getvalue())


def naive_sizes(message: Message, d: int) -> tuple[int, int]:
    """(int32 index + float32 value bytes, the same arrays through np.save) of a message's parts."""
    naive = saved = 0
    for part in message.parts:
        idx = _sent_indices(part, d)
        if idx is None:
            naive += 4 * d
            saved += _npsave(np.zeros(d, np.float32))
        else:
            naive += 8 * idx.size
            saved += _npsave(idx.astype(np.int32)) + _npsave(np.zeros(idx.size, np.float32))
    return naive, saved


def limit_bits(message: Message, d: int) -> float | None:
    """log2 C(d, k) + value bits for coded index sets, value bits for seeded ones; else None."""
    if not message.parts:
        return None
    total = float(message.flag_bits)
    for part in message.parts:
        if isinstance(part, SparseVector):
            total += log2_binomial(d, int(part.indices.size)) + part.value_bits()
        elif isinstance(part, SeededSparseVector):
            total += part.value_bits()
        else:
            return None
    return total


def measure(kind: str, d: int, k: int | None, make: Callable[[], Message], repeats: int) -> Row:
    """Sizes and times of one message kind; a failure becomes the row's `error`."""
    row = Row(kind, d, k)
    try:
        message = make()
        if row.k is None:
            row.k = sent_coordinates(message, d)
        row.compress_s = _median_s(repeats, make, warm=True)

        def encode() -> list[bytes]:
            envelope, bulk = ProtoWorkerMessage(), Bulk()  # filled in place, as a worker does
            codec.fill_update(envelope.update, ROUND, WORKER, message, bulk)
            return frames(envelope, chunk_bytes(RunConfig(), d), bulk)  # as a worker's

        def decode(data: list[bytes]) -> Message:
            inbound = Reassembler(ProtoWorkerMessage, Meter(), message_limit(RunConfig(), d))  # as the coordinator's
            received = None
            for frame in data:
                received = inbound.feed(frame)
            assert received is not None
            return codec.message_from_proto(received.message.update, d, ROUND, WORKER, received.bulk)

        data = encode()  # each first call below is also the warm-up of its timing
        decoded = decode(data)
        if decoded.dense(d).tobytes() != message.dense(d).tobytes():
            raise AssertionError("decoded message differs from the sent one")
        row.payload_bits = message.bits()
        row.update_bytes = codec.message_to_proto(ROUND, WORKER, message).ByteSize()
        row.wire_bytes = sum(len(f) + FRAME_BYTES for f in data)
        row.limit_bits = limit_bits(message, d)
        row.naive_bytes, row.npsave_bytes = naive_sizes(message, d)
        row.encode_s = _median_s(repeats, encode, warm=True)
        row.decode_s = _median_s(repeats, lambda: decode(data), warm=True)
        row.dense_s = _median_s(repeats, lambda: decoded.dense(d), warm=True)
    except Exception as err:  # noqa: BLE001 - a benchmark prints what it could not measure, goes on
        row.error = f"{type(err).__name__}: {err}"
    return row


def _compressed(
    name: str, params: dict[str, object], dtype: str, x: np.ndarray
) -> Callable[[], Message]:
    compressor = make_compressor(name, params, dtype)
    return lambda: Message(Mode.DELTA, (compressor.compress(x, fixed(1, WORKER, N_WORKERS)),))


def rows_for(d: int, x: np.ndarray, repeats: int) -> Iterator[Row]:
    """Every kind at dimension d, for the gradient-like vector x."""
    for dtype in ("float32", "float16", "bfloat16"):
        yield measure(f"dense {dtype}", d, d, _compressed("identity", {}, dtype, x), repeats)
    for density in DENSITIES:
        k = max(1, round(d * density))
        row = measure(
            f"top_k {density:.1%}", d, k, _compressed("top_k", {"k": k}, "float32", x), repeats
        )
        row.argpartition_s = _median_s(
            repeats, functools.partial(np.argpartition, np.abs(x), d - k)
        )
        yield row
    k = max(1, round(d * RAND_K_DENSITY))
    yield measure(
        f"rand_k {RAND_K_DENSITY:.1%}", d, k, _compressed("rand_k", {"k": k}, "float32", x), repeats
    )
    for name in (*SEEDED, *QUANTIZERS, *SIGNS):
        if name in COMPRESSORS:
            yield measure(name, d, None, _compressed(name, {}, "float32", x), repeats)
    yield measure("skip", d, 0, skip, repeats)

    top = make_compressor("top_k", {"k": k}, "float32")
    rand = make_compressor("rand_k", {"k": k}, "float32")

    def composite() -> Message:
        r = fixed(1, WORKER, N_WORKERS)
        return Message(Mode.DELTA, (top.compress(x, r), rand.compress(x, r)))

    yield measure(f"top_k+rand_k {RAND_K_DENSITY:.1%}", d, 2 * k, composite, repeats)
    memcpy = Row("memcpy", d, d)
    memcpy.encode_s = _median_s(repeats, x.copy)
    yield memcpy


def gradient_like(d: int, seed: int) -> np.ndarray:
    """A heavy-tailed float64 d-vector (Student t, 3 degrees of freedom), as gradients often are."""
    return np.random.default_rng(seed).standard_t(3, size=d)


# ----------------------------------------------------------------------------- output

_COLUMNS = (
    ("kind", "kind"),
    ("d", "d"),
    ("k", "k"),
    ("payload bits", "payload_bits"),
    ("wire bytes", "wire_bytes"),
    ("limit bits", "limit_bits"),
    ("wire/limit", None),
    ("naive bytes", "naive_bytes"),
    ("np.save bytes", "npsave_bytes"),
    ("wire/naive", None),
    ("compress ms", "compress_s"),
    ("encode ms", "encode_s"),
    ("decode ms", "decode_s"),
    ("dense ms", "dense_s"),
    ("argpart ms", "argpartition_s"),
)


def _cells(row: Row) -> list[str]:
    def num(v: float | None, ms: bool = False) -> str:
        if v is None:
            return "-"
        if ms:
            return f"{1e3 * v:.2f}"
        if isinstance(v, float):
            return f"{v:.0f}"
        return f"{v:,}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.3f}"

    wire_bits = None if row.wire_bytes is None else 8 * row.wire_bytes
    cells = []
    for title, attr in _COLUMNS:
        if title == "wire/limit":
            cells.append(ratio(wire_bits, row.limit_bits))
        elif title == "wire/naive":
            cells.append(ratio(row.wire_bytes, row.naive_bytes))
        elif attr == "kind":
            cells.append(row.kind)
        elif attr == "d":
            cells.append(f"{row.d:.0e}")
        elif attr is not None:
            cells.append(num(getattr(row, attr), ms=attr.endswith("_s")))
    return cells


def print_table(rows: Sequence[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="threepc wire: bytes and codec time per payload kind", title_justify="left")
    for title, _ in _COLUMNS:
        table.add_column(title, justify="left" if title == "kind" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*_cells(row), style="red" if row.error else None)
    console = Console(width=240)
    console.print(table)
    console.print(
        "wire bytes: WorkerMessage frames + 5-byte gRPC frame each; limit: log2 C(d,k) + value bits; "
        "naive: int32 index + float32 value; np.save: Flower's ndarray_to_bytes of those arrays"
    )
    for row in rows:
        if row.error:
            console.print(f"[red]{row.kind} at d = {row.d:.0e} failed: {row.error}[/red]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="threepc bench wire", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--d", type=float, nargs="+", default=[1e6, 1e7], help="dimensions (default 1e6 1e7)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per figure, median (default 3, 1 at d > 2e6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per row instead of a table"
    )
    args = parser.parse_args(argv)

    rows: list[Row] = []
    for d in (int(v) for v in args.d):
        x = gradient_like(d, args.seed)
        repeats = args.repeats if args.repeats is not None else (3 if d <= 2_000_000 else 1)
        for row in rows_for(d, x, repeats):
            if args.json:
                print(
                    json.dumps({k: _finite_or_none(v) for k, v in asdict(row).items()}), flush=True
                )
            rows.append(row)
    if not args.json:
        print_table(rows)
    return 0


def _finite_or_none(v: object) -> object:
    return None if isinstance(v, float) and not math.isfinite(v) else v


if __name__ == "__main__":
    raise SystemExit(main())
