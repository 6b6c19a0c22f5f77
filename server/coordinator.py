"""The coordinator: one bidirectional stream per worker, rounds driven by the shared engine.

    stream in -> Reassembler -> codec.message_from_proto (validates) -> Aggregator.apply
    Aggregator.finish_round -> x^{t+1} -> Round serialized once -> every stream

The servicer is thin: the round logic is `threepc.common.engine.Aggregator`, the same object the
in-process engine drives. Each stream's bytes are metered where they are read and written.

Faults (DESIGN.md, "The round protocol"):
- A round closes when every live worker has answered, or at its deadline (`round_timeout_s`).
  A worker that is gone or late is `absent`: its mirror g_i stays (a lazy skip for the 3PC
  family); for methods that need every worker (EF, MARINA) `absent_policy` decides: "wait"
  keeps the round open until it answers (or rejoins), "drop" closes it and rescales.
- Messages are applied as they come, in worker-id order (one that comes before a lower id's
  waits for it), so both transports add in the same order and the close phase is short. The
  order passes a worker that is gone (it is absent this round) unless the round waits for all.
- A worker's mechanism state must equal what the coordinator's mirror rebuilds. A worker whose
  message was not applied (late, refused, or it rejoined) gets a Restore (its mirror g_i and
  x^{t-1}) before its next Round; an update for a closed round is refused and counted (`late`).
- A malformed message is refused and counted (`refused`), never applied; its stream is ended
  with INVALID_ARGUMENT and the worker may rejoin with the same id.
- Before its token is checked a stream holds next to nothing: its first message must be a Join
  of at most JOIN_BYTES, never chunked, sent within `join_timeout_s`; and a worker that joined
  must be ready within `ready_timeout_s` (its slot is freed then; a worker refused a taken slot
  retries). A worker gets at most one resync (a dense round t again) per round: the rest are
  refused and counted.
- A worker whose own gradient, loss or update is no longer finite sends Diverged for its round;
  taken in worker-id order like an update, it ends the run as the in-process engine ends it
  (`WorkerDivergedError`, the same line), and every worker gets Done with that reason.
- A worker whose stream ends mid-run is lost (`losses`: when, why, and when it rejoined): the
  run's summary and report name every worker lost and not back.
- `checkpoint()` writes the state that must survive (server/checkpoint.py); `request_stop()`
  (SIGTERM) lets the open round finish (or abandons it if none of its updates was applied yet),
  writes a checkpoint and ends the run with `Stopped`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from threepc.common import codec
from threepc.common import config as config_mod
from threepc.common.engine import CHUNK_FRAMING, Aggregator, Diagnostics, Plan, digest
from threepc.common.errors import (
    AuthError,
    DeadlineError,
    DecodeError,
    DivergedError,
    MismatchError,
    ProtocolError,
    RefusedUpdate,
    RunFinishedError,
    SlotTakenError,
    ThreePCError,
    TransportError,
    WorkerDivergedError,
)
from threepc.common.payloads import Message, value_bits
from threepc.common.splice import Bulk
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
from threepc.proto.threepc_pb2 import WorkerMessage as ProtoWorkerMessage
from threepc.server import checkpoint as checkpoint_mod
from threepc.server.status import aborting_on_error

log = logging.getLogger("threepc.coordinator")

VERSION = "0.1.0"

Frames = tuple[str, list[bytes]]  # a message's category and the gRPC messages that carry it
IN_TRANSIT_BYTES = 64 << 20  # n dense updates up to this size are all read as they come
READ_AHEAD = 4  # else this many past the one the order waits for (Coordinator._turn_of), or fewer
JOIN_BYTES = 4096  # a Join (id, token, version) is far smaller: a larger first message is refused unread
JOIN_TIMEOUT_S = 10.0  # an honest worker sends its Join as its stream opens
# A worker loads its shard and builds its problem between Welcome and Ready (seconds at d = 1e7);
# one slower than this is refused and rejoins at once, with its shard already loaded. Well under
# a worker's --connect-timeout (60 s), for which a worker refused a taken slot retries.
READY_TIMEOUT_S = 20.0
DIVERGED_WHAT = ("gradient", "loss", "update")  # what a Diverged message may say was not finite


def frame_limit(plan: Plan) -> int:
    """The largest gRPC message an honest worker sends: a chunk (wire.chunk_bytes) and its framing;
    anything larger it sends in chunks."""
    return plan.chunk_bytes + CHUNK_FRAMING


def read_ahead(config: config_mod.RunConfig, d: int) -> int:
    """wire.read_ahead, resolved: how many updates past the next one to apply may be read."""
    if config.wire.read_ahead is not None:
        return config.wire.read_ahead
    n = config.workers
    update_bytes = d * value_bits(config.wire.value_dtype) // 8
    if n * update_bytes <= IN_TRANSIT_BYTES:
        return n
    return max(1, min(READ_AHEAD, IN_TRANSIT_BYTES // update_bytes))  # d = 1e7, float32: 1


class _StopRequested(Exception):
    """Asked to stop (SIGTERM) with no round open or one of which nothing was applied."""


@dataclass
class WorkerLink:
    """The coordinator's side of one worker's stream (a rejoining worker gets a new one)."""

    worker_id: int
    peer: str
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (category, frame); None ends
    meter: Meter = field(default_factory=Meter)  # the worker's wire meter, across its streams
    rows: int = 0
    ready: bool = False
    last_round: int = -1  # the last round whose update from this worker was applied
    error: ThreePCError | None = None  # why the stream ended early; set = the worker is gone
    synced_round: int = -1  # the round for which the worker's state equals the mirror's rebuild
    follower_round: int = -1  # the last round this stream got: its worker can follow from it (delta downlink)
    data: dict[str, Any] | None = None  # the shard's fingerprint from its Ready (summary.json per_worker)

    @property
    def live(self) -> bool:
        return self.ready and self.error is None


@dataclass
class Loss:
    """A ready worker's stream ended mid-run: when (the round then open, or next), why, and the
    round at which the worker was back (None: not yet)."""

    worker_id: int
    lost_at_round: int
    error: str
    rejoined_at_round: int | None = None


RowCallback = Callable[[dict], None]


class Coordinator:
    """Registers workers, runs the rounds, meters every byte. One instance per run.

    State by role:
    - the method: `agg` (iterate, mirrors, bit meters: everything `Aggregator.state_dict` holds);
    - the workers: `links` (the current stream of each worker id), `wire` (each worker's wire
      meter, kept across its streams), `refused` (malformed messages, resyncs past one a round)
      and `late` (updates that came after their round closed) per worker, `resyncs` (dense
      rounds sent again on a worker's request), `losses` (streams that ended mid-run);
    - the round being collected: `_collecting` (its t, or None between rounds), `_answered`,
      `_applied` (worker ids, in order), `_held` (updates waiting for a lower id's), `_cursor`
      (the lowest id the order has not passed), `_passed` (late workers it went past),
      `_round_frames` (its Round, serialized once: the change of g_sum under the delta downlink,
      else x), `_dense_frames` (x and g_sum, for streams that cannot follow: new, or asked for a
      resync), `_events` (what the streams tell the loop);
    - the run: `rows` (one per closed round), `checkpoint_dir`, `_stop` (SIGTERM asked).
    """

    def __init__(
        self,
        plan: Plan,
        on_round: RowCallback | None = None,
        token: str = "",
        checkpoint_dir: Path | None = None,
        *,
        join_timeout_s: float = JOIN_TIMEOUT_S,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ):
        self.plan = plan
        self.join_timeout_s = join_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.token = token  # a deployment secret, never part of the run's config
        self.config = plan.config
        self.agg = Aggregator(plan)
        self.on_round = on_round
        self.checkpoint_dir = checkpoint_dir
        n = self.config.workers
        self.links: dict[int, WorkerLink] = {}
        self.wire: dict[int, Meter] = {}
        self.refused = [0] * n
        self.late = [0] * n
        self.resyncs = [0] * n
        self.losses: list[Loss] = []
        self.all_ready = asyncio.Event()
        self.finished = asyncio.Event()
        self.rows: list[dict] = []
        self.started_at: float | None = None
        self._config_json = config_mod.to_json(plan.resolved)
        self._collecting: int | None = None
        self._answered: set[int] = set()
        self._applied: list[int] = []
        self._held: dict[int, tuple[Message, Diagnostics | None]] = {}
        self._cursor = 0
        self._passed: set[int] = set()  # late workers the order went past (reading on behind them)
        self._turn_moved = asyncio.Event()  # set (and replaced) when _collecting or _cursor moves
        self.read_ahead = read_ahead(self.config, plan.dim)
        self.gates_reads = self.read_ahead < self.config.workers  # else every update is read as it comes
        self._round_frames: Frames | None = None
        self._dense_frames: Frames | None = None
        self.delta = plan.downlink == "delta"
        self._refused_round = 0
        self._resyncs_round = 0
        self._resynced: dict[int, int] = {}  # worker id -> the round of the last resync it was sent
        self._events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._over = False  # Done is on its way: a stream that ends now ends normally
        # Methods that need every worker, under "wait", keep a round open until all have answered.
        self.wait_for_all = self.agg.needs_all and self.config.absent_policy == "wait"

    # ------------------------------------------------------------------ resume

    def load_checkpoint(self, saved: checkpoint_mod.Checkpoint, rows: list[dict]) -> None:
        """Continue from `saved`: the aggregator's state, the counters, the rows before it."""
        if len(saved.refused) != self.config.workers:
            raise ThreePCError(
                f"checkpoint is of a run with {len(saved.refused)} workers, this run has {self.config.workers}"
            )
        self.agg.load_state_dict(saved.agg)
        self.refused = [int(v) for v in saved.refused]
        self.late = [int(v) for v in saved.late]
        for i, entry in enumerate(saved.wire):
            if entry is not None:
                self.wire[i] = _meter_from_dict(entry)
        self.rows = list(rows)
        log.info("resuming at round %d (%d rows kept)", self.agg.t, len(self.rows))

    def checkpoint(self) -> Path | None:
        """Write the state that must survive into `checkpoint_dir` (nothing if there is none)."""
        if self.checkpoint_dir is None:
            return None
        wire = [self.wire[i].as_dict() if i in self.wire else None for i in range(self.config.workers)]
        path = checkpoint_mod.save(
            self.checkpoint_dir, self.agg.state_dict(), self.refused, self.late,
            config_mod.to_json(self.config), wire,
        )
        log.info("checkpoint at round %d: %s", self.agg.t, path)
        return path

    def request_stop(self) -> None:
        """Stop soon (SIGTERM): finish the open round (abandon it if nothing of it was applied),
        checkpoint, end the run with `Stopped`."""
        self._stop.set()
        self._events.put_nowait((-1, "stop", None))  # wakes the round loop

    # ------------------------------------------------------------------ the stream

    async def train(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        """One worker's whole life: Join -> Welcome -> Ready -> rounds -> Done."""
        meter = Meter()
        inbound = Reassembler(ProtoWorkerMessage, meter, JOIN_BYTES)  # raised once the token is checked
        holder: list[WorkerLink] = []
        try:
            async with aborting_on_error(context):
                await self._serve_stream(context, inbound, meter, holder)
        finally:
            if holder:
                link = holder[0]
                if link.error is None and not (self._over or self.finished.is_set()):
                    # The client went away (cancelled, or its process died) while the run goes on.
                    self._gone(link, TransportError(f"worker {link.worker_id}'s stream was cancelled"))

    async def _serve_stream(
        self, context: grpc.aio.ServicerContext, inbound: Reassembler, meter: Meter, holder: list[WorkerLink]
    ) -> None:
        """Join -> Welcome -> Ready, then write this worker's frames until the run ends."""
        try:
            join = await asyncio.wait_for(self._join(context, inbound), self.join_timeout_s)
        except TimeoutError:
            raise DeadlineError(f"no Join within {self.join_timeout_s:g} s of the stream's start") from None
        # Before anything else of this stream is read: no token, no gradient.
        if self.token and not hmac.compare_digest(join.join.token.encode(), self.token.encode()):
            raise AuthError("join token missing or wrong")
        if self.finished.is_set():
            raise RunFinishedError(f"the run has finished ({self.agg.t} rounds); there is nothing to join")
        inbound.max_bytes = self.plan.message_limit
        link = self._register(join.join.requested_id, context.peer(), meter)
        inbound.meter = link.meter
        holder.append(link)
        t0 = self.agg.t
        try:
            # The Welcome's write too: a peer that reads nothing would hold it (and its slot) forever.
            ready = await asyncio.wait_for(self._welcome(context, inbound, link, t0), self.ready_timeout_s)
            link.data = self._check_data(link.worker_id, ready)
        except TimeoutError:
            holder.clear()
            self._free(link)
            log.warning("worker %d: no Ready within %g s; its slot is free", link.worker_id, self.ready_timeout_s)
            raise DeadlineError(
                f"worker {link.worker_id}: no Ready within {self.ready_timeout_s:g} s of its Join; its slot was freed"
            ) from None
        except BaseException as err:
            if isinstance(err, MismatchError):  # the worker reads it too, as its one line
                log.warning("worker %d refused: %s", link.worker_id, err)
            holder.clear()
            self._free(link)
            raise
        link.rows, link.ready = ready.rows, True
        for loss in self.losses:
            if loss.worker_id == link.worker_id and loss.rejoined_at_round is None:
                loss.rejoined_at_round = t0
        rejoined = t0 > 0 or self.agg.meters[link.worker_id].messages > 0
        log.log(
            logging.WARNING if rejoined and self.all_ready.is_set() else logging.INFO,
            "worker %d %s (%s, %d rows) at round %d",
            link.worker_id, "rejoined" if rejoined else "ready", link.peer, ready.rows, t0,
        )
        if sum(w.live for w in self.links.values()) == self.config.workers:
            self.all_ready.set()
        if self._collecting is not None and link.worker_id >= self._cursor:
            self._send_round(link, self._collecting)  # joined mid-round: it may still answer
        self._events.put_nowait((link.worker_id, "ready", None))
        reader = asyncio.create_task(self._read_rounds(context, inbound, link))
        try:
            while (data := await link.outbox.get()) is not None:
                # Counted before the write returns: the run may end (and be summed) meanwhile.
                link.meter.count_sent(data[0], len(data[1]))
                await context.write(data[1])
        finally:
            reader.cancel()
        if link.error is not None:
            raise link.error

    def _free(self, link: WorkerLink) -> None:
        """Free the slot of a worker that never got ready."""
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]

    async def _welcome(
        self, context: grpc.aio.ServicerContext, inbound: Reassembler, link: WorkerLink, t0: int
    ) -> Any:
        """Send the Welcome (the worker's state from the mirror, if it has one); its Ready."""
        message, bulk = ProtoCoordinatorMessage(), Bulk()
        welcome = message.welcome
        welcome.worker_id = link.worker_id
        welcome.n_workers = self.config.workers
        welcome.config_json = self._config_json
        welcome.start_round = t0
        state = self._mirror_of(link.worker_id)
        if state is not None:
            codec.fill_restore(welcome.restore, t0, state, "welcome.restore", bulk)
        link.synced_round = t0
        await self._send(context, link, message, bulk)
        del message, bulk, welcome, state
        return (await self._expect(context, inbound, "ready")).ready

    async def _join(self, context: grpc.aio.ServicerContext, inbound: Reassembler) -> ProtoWorkerMessage:
        """The stream's first message, a Join: read whole before anything else of the stream, so a
        peer without the token gets nothing buffered past JOIN_BYTES (no chunks, no large frame)."""
        data = await self._read(context)
        if data is grpc.aio.EOF:
            raise ProtocolError("stream ended while waiting for join")
        if len(data) > JOIN_BYTES:
            raise DecodeError(f"join: the first message has {len(data)} bytes; a Join has at most {JOIN_BYTES}")
        received = inbound.feed(data)  # a chunk's buffer is bounded by JOIN_BYTES too
        if received is None:
            raise DecodeError("join: the first message is a chunk; a Join is never chunked")
        if received.message.WhichOneof("kind") != "join":
            raise ProtocolError(f"expected join, got {received.message.WhichOneof('kind')}")
        return received.message

    def _check_data(self, worker_id: int, ready: Any) -> dict[str, Any]:
        """A worker's shard against the run's: refused (MismatchError) where d differs, or where
        it is synthetic and the run's data a file (a worker that lost its data must not train on
        made-up rows); any shard that hashes otherwise than the coordinator's own is recorded
        and logged (workers may hold their own copy of the data)."""
        plan = self.plan
        if ready.dimension != plan.dim:
            raise MismatchError(f"worker {worker_id} has dimension {ready.dimension}, the run's is {plan.dim}")
        if ready.synthetic and not plan.synthetic:
            raise MismatchError(
                f"worker {worker_id} has synthetic data ({ready.data_source}), the run's data is the file {plan.dataset}"
            )
        expected = plan.shard_hashes[worker_id] if worker_id < len(plan.shard_hashes) else None
        fingerprint = {
            "rows": ready.rows, "dimension": ready.dimension, "shard_hash": ready.shard_hash.hex(),
            "source": ready.data_source, "synthetic": ready.synthetic,
            "matches_coordinator": expected is not None and ready.shard_hash == expected,
        }
        if not fingerprint["matches_coordinator"]:
            log.warning(
                "worker %d's shard (%d rows from %s, hash %s) differs from the coordinator's (hash %s)",
                worker_id, ready.rows, ready.data_source, ready.shard_hash.hex(), expected.hex() if expected else "-",
            )
        return fingerprint

    async def _read(self, context: grpc.aio.ServicerContext) -> Any:
        """The next gRPC message of a stream (or EOF), refused if over the run's size limit.

        gRPC itself drops messages over twice the limit (`start_server`), ending the stream with
        RESOURCE_EXHAUSTED; those between the limit and twice it are refused here, and counted.
        """
        data = await context.read()
        limit = frame_limit(self.plan)
        if data is not grpc.aio.EOF and len(data) > limit:
            raise DecodeError(
                f"message: {len(data)} bytes, over the limit of {limit} bytes (wire.chunk_bytes and a chunk's framing; "
                "larger messages travel in chunks)"
            )
        return data

    async def _expect(self, context: grpc.aio.ServicerContext, inbound: Reassembler, kind: str) -> ProtoWorkerMessage:
        while True:
            data = await self._read(context)
            if data is grpc.aio.EOF:
                raise ProtocolError(f"stream ended while waiting for {kind}")
            received = inbound.feed(data)
            if received is None:
                continue
            message = received.message
            if message.WhichOneof("kind") != kind:
                raise ProtocolError(f"expected {kind}, got {message.WhichOneof('kind')}")
            return message

    def _register(self, requested: int, peer: str, meter: Meter) -> WorkerLink:
        """A new link for the worker id asked for (or the first free one); a gone worker's id is free."""
        n = self.config.workers

        def taken(i: int) -> bool:
            return i in self.links and self.links[i].error is None

        if requested >= n:
            raise ProtocolError(f"worker id {requested} outside [0, {n})")
        # A slot frees up when its stream ends or misses the Ready deadline: the worker retries.
        if requested >= 0:
            worker_id = requested
            if taken(worker_id):
                raise SlotTakenError(f"worker id {worker_id} is already taken")
        else:
            free = [i for i in range(n) if not taken(i)]
            if not free:
                raise SlotTakenError(f"all {n} worker slots are taken")
            worker_id = free[0]
        persistent = self.wire.setdefault(worker_id, Meter())
        _merge(persistent, meter)  # the Join this stream has read so far
        link = WorkerLink(worker_id, peer, meter=persistent)
        self.links[worker_id] = link
        return link

    async def _send(
        self, context: grpc.aio.ServicerContext, link: WorkerLink, message: ProtoCoordinatorMessage, bulk: Bulk | None = None
    ) -> None:
        for data in frames(message, self.plan.chunk_bytes, bulk):
            link.meter.count_sent(category_of(message), len(data))
            await context.write(data)

    def _mirror_of(self, worker_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """What rebuilds worker_id's state (its mirror g_i and x^{t-1}), or None: start afresh."""
        if not self.agg.holds(worker_id):
            return None  # the mirror holds nothing of it
        return self.agg.mirrors[worker_id], self.agg.x_prev

    def _gone(self, link: WorkerLink, error: ThreePCError) -> None:
        """The worker's stream is over: end it with `error`, and tell the round loop."""
        if link.error is not None:
            return
        if self._over:  # the worker read Done and hung up before this stream was closed
            link.outbox.put_nowait(None)
            return
        link.error = error
        link.outbox.put_nowait(None)
        if not self.finished.is_set():
            self.losses.append(Loss(link.worker_id, self.agg.t, str(error)))
            log.warning("worker %d is gone: %s", link.worker_id, error)
            self._events.put_nowait((link.worker_id, "gone", None))

    async def _read_rounds(self, context: grpc.aio.ServicerContext, inbound: Reassembler, link: WorkerLink) -> None:
        """Decode and validate each Update (+ Diagnostics) and hand it to the round loop."""
        d, wid = self.plan.dim, link.worker_id
        pending: tuple[int, Message] | None = None  # an update waiting for its diagnostics
        dropped = -1  # the round of a refused update, whose diagnostics are dropped with it
        last = -1  # the round of the last update read: the next one is read in a later round
        try:
            while True:
                # Neither the last frame (its bulk fields are views of it) nor the last update handed on
                # (d values under GD, n of them held at once otherwise) is held while waiting.
                received = message = bulk = decoded = None
                if pending is None and not inbound.mid_message and self.gates_reads:
                    await self._turn_of(wid, last)
                data = await self._read(context)
                if data is grpc.aio.EOF:
                    raise TransportError(f"worker {wid} closed its stream")
                received = inbound.feed(data)
                del data  # the frame's bytes: parsed (its bulk fields are views of them in `received`)
                if received is None:
                    continue
                message, bulk = received
                kind = message.WhichOneof("kind")
                if kind == "update" and pending is None:
                    r = last = message.update.round
                    if not self._open_for(wid, r):
                        dropped = r
                        continue
                    decoded = codec.message_from_proto(message.update, d, r, wid, bulk, self.agg.expects(wid))
                    self._answered.add(wid)
                    if self.config.diagnostic_round(r):
                        pending = (r, decoded)
                    else:
                        self._events.put_nowait((wid, "update", (r, decoded, None)))
                elif kind == "diagnostics" and pending is not None:
                    r, decoded = pending
                    diag = codec.diagnostics_from_proto(message.diagnostics, d, r, wid, bulk)
                    pending = None
                    if r == self._collecting:
                        # Held with the update until its turn: figures are summed in worker-id
                        # order, as the in-process engine sums them (equal bit for bit).
                        self._events.put_nowait((wid, "update", (r, decoded, diag)))
                        del diag
                    else:
                        self._late(link, r)  # its round closed between the update and these
                elif kind == "diagnostics" and message.diagnostics.round == dropped:
                    continue
                elif kind == "diverged" and pending is None:
                    # Its own gradient (or loss, or update) is not finite: in its turn, as its update would be.
                    r = last = message.diverged.round
                    what = message.diverged.reason
                    if what not in DIVERGED_WHAT:
                        raise DecodeError(f"diverged.reason: expected one of {', '.join(DIVERGED_WHAT)}, got {what[:40]!r}")
                    if self._open_for(wid, r):
                        self._answered.add(wid)
                        self._events.put_nowait((wid, "update", (r, WorkerDivergedError(r, wid, what), None)))
                elif kind == "resync":
                    # Its rebuilt iterate missed the digest: round t again, densely (if still open).
                    r = message.resync.round
                    if r != self._collecting:
                        continue  # its Round of the next round is dense (the worker follows no longer)
                    if self._resynced.get(wid) == r:
                        # An honest worker asks once: the dense round has no digest to miss.
                        self.refused[wid] += 1
                        self._refused_round += 1
                        log.warning("worker %d: refused a second resync for round %d", wid, r)
                        continue
                    self._resynced[wid] = r
                    self.resyncs[wid] += 1
                    self._resyncs_round += 1
                    log.warning("worker %d: digest mismatch in round %d; sending x densely", wid, r)
                    category, data = self._dense_round(r)
                    for frame in data:
                        link.outbox.put_nowait((category, frame))
                else:
                    raise ProtocolError(f"unexpected {kind} from worker {wid} in round {self.agg.t}")
        except DecodeError as err:
            self.refused[wid] += 1
            self._refused_round += 1
            log.warning("worker %d: refused a malformed message (%s)", wid, err)
            self._gone(link, err)
        except ThreePCError as err:
            self._gone(link, err)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - any transport failure ends this worker's stream, not the run
            self._gone(link, TransportError(f"worker {wid}'s stream failed: {type(err).__name__}: {err}"))

    async def _turn_of(self, worker_id: int, last: int) -> None:
        """Until worker_id's next update may be read: a round after `last` (the round of its last
        update) is open, and worker_id is less than `read_ahead` ids past the order's cursor.
        Until then its bytes wait at the worker (the server then grows no flow-control windows:
        `start_server`), so the coordinator holds a few updates in transit, not n."""
        while not (
            self._collecting is not None and self._collecting > last and worker_id < self._cursor + self.read_ahead
        ):
            await self._turn_moved.wait()

    def _move_turn(self) -> None:
        self._turn_moved.set()
        self._turn_moved = asyncio.Event()

    def _open_for(self, worker_id: int, r: int) -> bool:
        """Whether worker_id's update for round r may be taken; a late or duplicate one is refused."""
        if r == self._collecting and worker_id not in self._answered and worker_id >= self._cursor:
            return True
        link = self.links[worker_id]
        if r < self.agg.t or (r == self._collecting and worker_id not in self._answered):
            self._late(link, r)  # its round closed, or the order passed it (it was gone)
        elif r == self._collecting:
            self.refused[worker_id] += 1
            self._refused_round += 1
            log.warning("worker %d: refused a second update for round %d", worker_id, r)
        else:
            raise ProtocolError(f"update for round {r}, but round {r} has not started (now {self.agg.t})")
        return False

    def _late(self, link: WorkerLink, r: int) -> None:
        self.late[link.worker_id] += 1
        log.info("worker %d: refused its update for round %d, too late for it", link.worker_id, r)

    # ------------------------------------------------------------------ the rounds

    async def run(self) -> list[dict]:
        """Wait for every worker, run the rounds, tell the workers the run is done.

        On `request_stop` the open round finishes (or is abandoned if nothing of it was applied
        yet), a checkpoint is written and `checkpoint.Stopped` is raised.
        """
        stopped: Path | None = None
        failure: ThreePCError | None = None
        try:
            return await self._rounds()
        except _StopRequested:
            stopped = self.checkpoint() or Path("(no checkpoint dir)")
            raise checkpoint_mod.Stopped(self.agg.t, stopped) from None
        except DivergedError as err:
            # The run is over, as it would be in process: every worker is told why, and its
            # stream ends normally (a worker has nothing to rejoin).
            self._over = True
            self._broadcast(ProtoCoordinatorMessage(done=ProtoDone(rounds=self.agg.t, reason=str(err))))
            await self._drained()
            raise
        except ThreePCError as err:
            failure = err  # the workers learn why the run ended (e.g. DivergedError)
            raise
        finally:
            for link in self.links.values():
                if stopped is not None and link.error is None:
                    link.error = TransportError("the coordinator stopped (checkpoint written); rejoin when it resumes")
                elif failure is not None and link.error is None:
                    link.error = failure
                link.outbox.put_nowait(None)
            self.finished.set()

    async def _rounds(self) -> list[dict]:
        await self._until_all_ready()
        self.started_at = time.perf_counter() - (self.rows[-1]["elapsed_s"] if self.rows else 0.0)
        every = self.config.checkpoint_every
        for t in range(self.agg.t, self.config.rounds):
            if self._stop.is_set():
                raise _StopRequested
            await self._round(t)
            if every and self.agg.t % every == 0:
                self.checkpoint()
        self._over = True
        self._broadcast(ProtoCoordinatorMessage(done=ProtoDone(rounds=self.agg.t, reason="finished")))
        await self._drained()
        return self.rows

    async def _drained(self, timeout_s: float = 5.0) -> None:
        """Until every stream has taken what is queued for it (its meter counts it then), so
        that the totals the caller writes include Done; at most `timeout_s`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while loop.time() < end and any(
            not link.outbox.empty() for link in self.links.values() if link.error is None
        ):
            await asyncio.sleep(0.001)

    async def _until_all_ready(self) -> None:
        """Wait until every worker is ready; _StopRequested if asked to stop first."""
        if not self.all_ready.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (self.all_ready, self._stop)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if self._stop.is_set():
            raise _StopRequested

    async def _round(self, t: int) -> None:
        """Broadcast round t, apply its updates in worker-id order as they come, and close it when
        every live worker has answered, or at the deadline."""
        n, timeout = self.config.workers, self.config.round_timeout_s
        self._dense_frames = None
        change = self.agg.change if self.delta and t > 0 else None
        if change is None:
            self._round_frames = self._dense_round(t)
        else:
            message, bulk = ProtoCoordinatorMessage(), Bulk()
            codec.fill_round_change(
                message.round, t, self.agg.x.dtype.name, change[0], change[1], self.plan.dim, digest(self.agg.x), bulk
            )
            self._round_frames = (category_of(message), frames(message, self.plan.chunk_bytes, bulk))
        self._answered, self._applied, self._held, self._cursor, self._passed = set(), [], {}, 0, set()
        self._collecting = t
        self._move_turn()
        loop = asyncio.get_running_loop()
        try:
            for link in self.links.values():
                if link.live:
                    self._send_round(link, t)
            deadline = loop.time() + timeout
            while True:
                while not self._events.empty():  # every update read so far, before liveness is judged
                    self._take(t, self._events.get_nowait())
                self._apply_in_order(t)
                live = {i for i, link in self.links.items() if link.live}
                answered = self._held.keys() | set(self._applied)
                nobody = not live and not answered  # a round closed by no one would move x for nothing
                blocking = (set(range(n)) if self.wait_for_all or nobody else live) - answered - self._passed
                if not blocking:
                    break
                if self._stop.is_set() and not self._applied:
                    raise _StopRequested  # nothing of round t was applied: the state is still its start
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if (self.wait_for_all or nobody) and not self._stop.is_set():
                        why = "absent_policy = wait" if live else "no worker is connected"
                        log.warning("round %d: still waiting for workers %s (%s)", t, sorted(blocking), why)
                        deadline = loop.time() + timeout
                        continue
                    window = self._cursor + self.read_ahead
                    if any(i >= window for i in blocking):
                        # Later workers' updates wait unread behind the late ones: pass those, read these.
                        passed = sorted(i for i in blocking if i < window)
                        log.warning("round %d: going on without workers %s after %g s", t, passed, timeout)
                        self._passed.update(passed)
                        deadline = loop.time() + timeout
                        continue
                    log.warning("round %d: closing without workers %s after %g s", t, sorted(blocking), timeout)
                    break
                try:
                    self._take(t, await asyncio.wait_for(self._events.get(), remaining))
                except TimeoutError:
                    continue
            self._collecting = None
            while not self._events.empty():  # taken by a reader before the round closed
                self._take(t, self._events.get_nowait())
        finally:
            self._collecting = None
        self._close_round(t)

    def _take(self, t: int, event: tuple[int, str, Any]) -> None:
        """Hold an update of round t until its turn (other events only wake the loop)."""
        worker_id, kind, item = event
        if kind == "update" and item[0] == t:
            if worker_id < self._cursor:  # the order passed it while it was gone
                self._late(self.links[worker_id], t)
            else:
                self._held[worker_id] = item[1:]

    def _apply_in_order(self, t: int) -> None:
        """Apply the held updates of round t whose turn has come: the order moves past a worker
        once its update is applied, or once it is gone and the round may close without it."""
        n, start = self.config.workers, self._cursor
        while self._cursor < n:
            worker_id = self._cursor
            held = self._held.pop(worker_id, None)
            if held is not None:
                self._apply(worker_id, *held, t=t)
            else:
                link = self.links.get(worker_id)
                others = any(w.live for w in self.links.values()) or self._applied or self._held
                gone = worker_id in self._passed or not (link is not None and link.live)
                if self.wait_for_all or not gone or not others:
                    break
            self._cursor += 1
        if self._cursor != start:
            self._move_turn()

    def _apply(self, worker_id: int, message: Message | DivergedError, diagnostics: Diagnostics | None, t: int) -> None:
        if isinstance(message, DivergedError):
            raise message  # in worker-id order, as the in-process engine meets it
        try:
            self.agg.apply(worker_id, message, diagnostics)
        except RefusedUpdate as err:
            # Nothing of it was applied: counted, and the worker is absent this round (the round
            # does not wait for it); its mirror stays, and a Restore precedes its next round.
            self.refused[worker_id] += 1
            self._refused_round += 1
            self._passed.add(worker_id)
            log.warning("worker %d: refused an update (%s)", worker_id, err)
            return
        self._applied.append(worker_id)
        link = self.links.get(worker_id)
        if link is not None:
            link.last_round = t
            link.synced_round = t + 1  # its state advanced exactly as the mirror did

    def _send_round(self, link: WorkerLink, t: int) -> None:
        """Round t to one worker, after a Restore if its state may differ from the mirror's."""
        if link.synced_round != t:
            restore, bulk = ProtoCoordinatorMessage(), Bulk()
            codec.fill_restore(restore.restore, t, self._mirror_of(link.worker_id), "restore", bulk)
            for frame in frames(restore, self.plan.chunk_bytes, bulk):
                link.outbox.put_nowait((category_of(restore), frame))
            link.synced_round = t
        assert self._round_frames is not None
        follows = self._round_frames is not self._dense_frames and link.follower_round == t - 1
        category, data = self._round_frames if follows else self._dense_round(t)
        for frame in data:
            link.outbox.put_nowait((category, frame))
        link.follower_round = t

    def _dense_round(self, t: int) -> Frames:
        """Round t with x^t itself (and g_sum under the delta downlink), serialized once."""
        if self._dense_frames is None:
            message, bulk = ProtoCoordinatorMessage(), Bulk()
            aggregate = self.agg.g_sum if self.delta else None
            codec.fill_round(message.round, t, self.agg.x, aggregate, digest(self.agg.x) if self.delta else b"", bulk)
            self._dense_frames = (category_of(message), frames(message, self.plan.chunk_bytes, bulk))
        return self._dense_frames

    def _close_round(self, t: int) -> None:
        """Apply round t's updates still held (in worker-id order: those after an absent worker),
        step, and write the round's row."""
        n = self.config.workers
        for worker_id in sorted(self._held):
            self._apply(worker_id, *self._held.pop(worker_id), t=t)
        applied = set(self._applied)
        absent = [i for i in range(n) if i not in applied]
        late = [i for i in absent if i in self.links and self.links[i].live]
        if absent and self.agg.needs_all:
            log.warning("round %d: workers %s absent; %s over the %d present (absent_policy = drop)",
                        t, absent, "rescaled", n - len(absent))
        row: dict[str, Any] = self.agg.finish_round(absent)
        row["absent_workers"] = absent
        row["late_workers"] = late
        row["refused"] = self._refused_round
        row["resyncs"] = self._resyncs_round
        self._refused_round = self._resyncs_round = 0
        row.update(self.wire_totals())
        row["elapsed_s"] = time.perf_counter() - (self.started_at or 0.0)
        self.rows.append(row)
        if self.on_round:
            self.on_round(row)

    def _broadcast(self, message: ProtoCoordinatorMessage) -> None:
        """Serialize once; the same bytes go to every live stream."""
        category = category_of(message)
        data = frames(message, self.plan.chunk_bytes)
        for link in self.links.values():
            if link.error is None:
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


def _merge(into: Meter, other: Meter) -> None:
    """Add `other`'s counts to `into` (a rejoining worker's new stream, before it has an id)."""
    for mine, theirs in ((into.sent, other.sent), (into.received, other.received)):
        for category, nbytes in theirs.items():
            mine[category] = mine.get(category, 0) + nbytes
    into.messages_sent += other.messages_sent
    into.messages_received += other.messages_received


def _meter_from_dict(entry: dict[str, Any]) -> Meter:
    return Meter(
        sent=dict(entry["sent_bytes"]),
        received=dict(entry["received_bytes"]),
        messages_sent=int(entry["messages_sent"]),
        messages_received=int(entry["messages_received"]),
    )


async def start_server(
    coordinator: Coordinator,
    listen: str,
    *,
    grace_s: float = 5.0,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server for `coordinator`, and the port it bound (listen on port 0 in tests).

    `credentials` (threepc.common.tls.server_credentials): serve TLS instead of plaintext.
    """
    limit = frame_limit(coordinator.plan)
    # Twice the frame limit at the gRPC layer, so that the coordinator sees (and counts) what it
    # refuses; not the whole message limit: gRPC buffers a message whole before a read returns it,
    # and a stream's first message is read before its token is known.
    options = [
        (key, 2 * limit if key == "grpc.max_receive_message_length" else value)
        for key, value in channel_options(limit)
    ]
    if coordinator.gates_reads:
        # Windows grown by BDP probing would let every worker's update in whether it is read or
        # not; without them a stream not being read holds 64 KiB here (Coordinator._turn_of).
        options.append(("grpc.http2.bdp_probe", 0))
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
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise TransportError(f"cannot listen on {listen}")
    await server.start()
    return server, port
