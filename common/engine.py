"""One round as plain function calls, shared by the in-process engine and the gRPC runtime.

    coordinator: x^t  ->  worker i: grad f_i(x^t) -> mechanism step -> Message
    coordinator: mirror_i <- message.apply(mirror_i) (in worker-id order) -> g^t = mean mirrors
                 -> x^{t+1} = x^t - gamma g^t

`WorkerNode` is one worker's side (its shard, its mechanism state), `Aggregator` the
coordinator's (iterate, mirrors, meters). `run_in_process` drives them with function calls; the
gRPC runtime (threepc.server, threepc.worker) drives the very same objects with encode -> bytes
-> decode in between, which is why a distributed run equals the in-process run bit for bit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from threepc.common import data as data_mod
from threepc.common.config import Component, RunConfig
from threepc.common.errors import (
    ConfigError,
    DataError,
    DivergedError,
    RefusedUpdate,
    WorkerDivergedError,
)
from threepc.common.mechanisms import Mechanism, WorkerState
from threepc.common.methods import Smoothness, build_method, stepsize
from threepc.common.oracles import make_oracle
from threepc.common.payloads import DenseVector, Expect, Message, Mode, largest_magnitude
from threepc.common.problems import Problem, hessian_variance, make_problem
from threepc.common.randomness import round_randomness

CHUNK_FRAMING = 1 << 10  # what a Chunk envelope adds around its data (tags and lengths, < 20 bytes), and room to spare
CHUNK_BYTES = 4 << 20  # wire.chunk_bytes unset (engine.chunk_bytes says why)
BLOCK = 1 << 16  # elements per block of a block-wise pass over d: 512 KB of float64 scratch stays in cache


# While the rows' largest |values| sum to no more than this, g_sum and every difference added to
# it stay far inside float64's range (Aggregator._check_row).
_SAFE_SUM = float(np.finfo(np.float64).max) / 4


def blocks(size: int) -> Iterator[slice]:
    """The consecutive slices of at most BLOCK elements that cover range(size)."""
    for start in range(0, size, BLOCK):
        yield slice(start, min(start + BLOCK, size))


_HELPER: ThreadPoolExecutor | None = None  # one thread, made on first use


def in_two_threads(work: Callable[[slice], None], size: int) -> None:
    """work(block) for the blocks of range(size), half of them in a helper thread when this
    process may use two cores: numpy leaves the GIL in its loops. For a serial step that the
    workers wait on (the mirrors' sum when a GD round closes: 5.1-5.4 -> 2.8-3.0 ms at n = 8,
    d = 1e6). Each block gets the same operations either way."""
    global _HELPER
    todo = list(blocks(size))
    if len(todo) < 2 or _usable_cores() < 2:
        _each(work, todo)
        return
    if _HELPER is None:
        _HELPER = ThreadPoolExecutor(1, thread_name_prefix="threepc-blocks")
    helped = _HELPER.submit(_each, work, todo[len(todo) // 2 :])
    try:
        _each(work, todo[: len(todo) // 2])
    finally:
        helped.result()


def _each(work: Callable[[slice], None], todo: list[slice]) -> None:
    for block in todo:
        work(block)


def _usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def initial_iterate(config: RunConfig, d: int, whole: Problem | None = None) -> np.ndarray:
    """x^0: N(0, I) drawn as numpy.random.default_rng(s).normal(0, 1, d), zeros, the
    problem's own start ("problem": the papers' quadratic start, torch's initialization, drawn
    from s), or a .npy; s = x0_seed, else the run's seed (so that a sweep over seeds can keep x^0)."""
    dtype = np.dtype(config.wire.iterate_dtype)
    seed = config.seed if config.x0_seed is None else config.x0_seed
    if config.x0 == "problem":
        start = getattr(whole, "initial_point", None)
        if start is None:
            raise ConfigError(f"x0 = 'problem': {config.problem.name} has no initial point of its own")
        return np.asarray(start(seed), dtype=np.float64).astype(dtype)
    if config.x0 == "normal":
        return np.random.default_rng(seed).normal(0.0, 1.0, d).astype(dtype)
    if config.x0 == "zeros":
        return np.zeros(d, dtype)
    path = Path(config.x0)
    if not path.is_file():
        raise ConfigError(f"x0: expected 'normal', 'zeros' or a .npy file, got {config.x0!r}")
    x0 = np.load(path, allow_pickle=False)
    if x0.shape != (d,):
        raise ConfigError(f"x0: {path} has shape {x0.shape}, the problem needs ({d},)")
    return x0.astype(dtype)


def load_data(config: RunConfig, dataset: str | None = None) -> data_mod.Dataset:
    """The run's whole data set (`dataset` overrides the config's, e.g. a worker's local path);
    a synthetic stand-in for a named set that is not found only where data.fallback asks."""
    spec = config.data
    return data_mod.load(
        dataset or spec.dataset, data_dir=spec.data_dir, dim=spec.dim, rows=spec.rows, seed=spec.seed,
        fallback=spec.fallback,
    )


def load_shard(config: RunConfig, worker_id: int, full: data_mod.Dataset) -> data_mod.Dataset:
    """Worker i's shard of the run's data."""
    return data_mod.shard(full, config.workers, worker_id, config.data.split)


def local_problem(config: RunConfig, shard: data_mod.Dataset, worker_id: int | None) -> Problem:
    """Worker i's f_i on its shard; worker_id None: the whole f on all the data."""
    return make_problem(
        config.problem.name, shard, config.problem.params, worker_id=worker_id, n_workers=config.workers
    )


def data_origin(data: data_mod.Dataset, problem: Problem) -> tuple[str, bool, bool]:
    """Where a problem's data came from: (source, stand_in, synthetic). A problem that reads
    files of its own (the autoencoder's images) says so with `data_source` and `stand_in`."""
    stand_in = data.stand_in or bool(getattr(problem, "stand_in", False))
    return getattr(problem, "data_source", None) or data.source, stand_in, data.synthetic or stand_in


@dataclass(frozen=True, eq=False)
class Plan:
    """What the coordinator resolves before round 0."""

    config: RunConfig  # as the user gave it
    resolved: RunConfig  # what workers run: the stepsize resolved to gamma
    dim: int
    gamma: float
    smoothness: Smoothness
    x0: np.ndarray
    dataset: str  # the data actually used (a file, or a synthetic stand-in)
    stand_in: bool = False  # the data is a synthetic stand-in for a named set that was not found
    synthetic: bool = False  # the data is seeded synthetic data (asked for, or a stand-in), not a file
    shard_hashes: tuple[bytes, ...] = ()  # data.fingerprint of each worker's shard, by worker id
    downlink: str = "dense"  # "dense" or "delta", resolved from wire.downlink
    message_limit: int = 64 << 20  # the largest message a worker may send, resolved from wire.max_message_bytes
    chunk_bytes: int = CHUNK_BYTES  # messages larger than this are chunked (wire.chunk_bytes)


def plan(config: RunConfig, *, stand_in_allowed: bool = True) -> Plan:
    """Load the data once, compute L_-, L_+, every L_i, the stepsize and x^0.

    `stand_in_allowed` False (`threepc serve`): data not found is an error even where
    data.fallback asks for a stand-in (remote workers could not be held to the same stand-in)."""
    loading = config
    if not stand_in_allowed and config.data.fallback != "error":
        loading = config.model_copy(update={"data": config.data.model_copy(update={"fallback": "error"})})
    try:
        full = load_data(loading)
    except DataError as err:
        if loading is config:
            raise
        raise DataError(f"{err} (data.fallback = 'synthetic' is for threepc run; a coordinator never uses a stand-in)") from None
    # The coordinator's state is n + 4 float64 vectors of d (mirrors, x, x_prev, g_sum, x^0).
    data_mod.check_fits(8 * (config.workers + 4) * full.dim, f"{full.source}: d = {full.dim} with {config.workers} workers")
    shards = [load_shard(config, i, full) for i in range(config.workers)]
    whole = local_problem(config, full, None)
    d = whole.dim
    workers = [local_problem(config, shard, i) for i, shard in enumerate(shards)]
    L_i = tuple(problem.smoothness() for problem in workers)
    L_minus = whole.smoothness()
    L_pm = hessian_variance(config.problem.name, config.problem.params, config.workers)
    smooth = Smoothness(L_minus, float(np.sqrt(np.mean(np.square(L_i)))), L_i, L_pm)
    mechanism = build_method(config.model_copy(update={"stepsize": 1.0}), d)
    gamma = stepsize(config, mechanism, d, smooth, lambda: [problem.row_smoothness() for problem in workers])
    source, stand_in, synthetic = data_origin(full, whole)
    # Workers fall back to the same stand-in as this plan, and only then: never where it found the file.
    data = config.data.model_copy(update={"fallback": "synthetic" if stand_in else "error"})
    resolved = config.model_copy(update={"stepsize": gamma, "stepsize_multiplier": 1.0, "data": data})
    if config.method.name == "marina" and config.method.params.get("iscc") and "weights" not in config.method.params:
        # ISCC samples worker j with q_j proportional to L_j: workers get the weights from here.
        method = Component.model_validate({**config.method.model_dump(), "weights": list(L_i)})
        resolved = resolved.model_copy(update={"method": method})
    x0 = initial_iterate(config, d, whole)
    x0.setflags(write=False)  # shared, never copied, by every Aggregator of the plan
    return Plan(
        config, resolved, d, gamma, smooth, x0, source, stand_in=stand_in, synthetic=synthetic,
        shard_hashes=tuple(data_mod.fingerprint(shard) for shard in shards),
        downlink=resolve_downlink(config, mechanism, d), message_limit=message_limit(config, d),
        chunk_bytes=chunk_bytes(config, d),
    )


def message_limit(config: RunConfig, d: int) -> int:
    """wire.max_message_bytes, checked against the largest message an honest worker sends at
    dimension d: a float64 d-vector (diagnostics' gradient, a dense float64 update) and its
    fields, at most 9 d bytes (TopK with k = d adds d/8 bytes of bitmap). Unset: 64 MiB, or that
    bound plus 1 MiB where larger (d = 1e7: ~91 MiB)."""
    needed = 9 * d + 4096
    if config.wire.max_message_bytes is None:
        return max(64 << 20, needed + (1 << 20))
    if config.wire.max_message_bytes < needed:
        raise ConfigError(
            f"wire.max_message_bytes = {config.wire.max_message_bytes} is below what a worker sends at "
            f"d = {d} (a float64 gradient: up to {needed} bytes); raise it or leave it unset"
        )
    return config.wire.max_message_bytes


def chunk_bytes(config: RunConfig, d: int) -> int:
    """wire.chunk_bytes, resolved: unset, 4 MiB (a float32 iterate at d = 1e6 still in one frame).

    Larger frames cost the coordinator memory it does not need: gRPC copies a message into every
    stream it is written to and holds the copy until it is sent (a broadcast: n copies at once),
    and a message received whole is first gathered in gRPC's own buffers and then copied out.
    Measured at n = 8, d = 1e7 (EF21, dense downlink): peak RSS 0.98-1.0 GB with frames up to
    the message limit, 0.79 GB with 4 MiB ones (each gathered into one buffer: wire.Reassembler);
    in steady state 0.80-0.90 against 0.69-0.71."""
    limit = message_limit(config, d)
    if config.wire.chunk_bytes is None:
        return min(CHUNK_BYTES, limit - CHUNK_FRAMING)
    if config.wire.chunk_bytes > limit - CHUNK_FRAMING:
        raise ConfigError(
            f"wire.chunk_bytes = {config.wire.chunk_bytes} does not fit in a message of at most {limit} "
            f"bytes (wire.max_message_bytes) with its framing; lower it or leave it unset"
        )
    return config.wire.chunk_bytes


def resolve_downlink(config: RunConfig, mechanism: Mechanism, d: int) -> str:
    """wire.downlink "auto": the delta downlink where it sends fewer bytes than x. A round changes
    at most n k of g_sum's coordinates, each costing a float64 value and ~2 index bits, against
    d values of the iterate's dtype; so delta when n k / d stays well under itemsize / 10
    (measured: at n = 100, k = d/100 every coordinate changes and delta costs 1.3x dense).
    EF's x moves by mean v, not by gamma g_sum / n: dense."""
    if config.wire.downlink != "auto":
        return config.wire.downlink
    from threepc.common.compressors import make_compressor

    c = make_compressor(config.compressor.name, config.compressor.params, config.wire.value_dtype)
    changed = min(1.0, c.density(d) * config.workers)
    itemsize = np.dtype(config.wire.iterate_dtype).itemsize
    return "delta" if changed < 0.5 * itemsize / 10 and not mechanism.worker_scales else "dense"


Diagnostics = tuple[float, np.ndarray]  # f_i(x^t) and grad f_i(x^t), for the round's figures


class WorkerNode:
    """One worker: its local problem and its mechanism state (the only state it keeps).

    The state is replaced, never mutated, each round (`Mechanism.step` returns a new one).
    """

    def __init__(self, config: RunConfig, worker_id: int, problem: Problem):
        self.config = config
        self.worker_id = worker_id
        self.problem = problem
        self.mechanism: Mechanism = build_method(config, problem.dim)
        self.state: WorkerState | None = None
        self.oracle = make_oracle(config.gradient)
        self.oracle_state = self.oracle.init(problem)
        self._x64: np.ndarray | None = None

    def _as_float64(self, x: np.ndarray) -> np.ndarray:
        """x as float64, in a buffer kept across rounds (problems and oracles copy what they keep)."""
        if x.dtype == np.float64:
            return x
        if self._x64 is None or self._x64.shape != x.shape:
            self._x64 = np.empty(x.shape)
        np.copyto(self._x64, x)
        return self._x64

    def restore(self, h: np.ndarray, x_prev: np.ndarray) -> None:
        """Rejoin after a restart: h from the coordinator's mirror, y = grad f_i(x^{t-1}) recomputed
        (where the method reads y at all).

        Exact for the 3PC family and MARINA (their state is (h, y)); EF's error e_i cannot be
        rebuilt from what the coordinator holds and restarts at zero (`restores_exactly`).
        """
        if self.mechanism.restores_exactly:
            h = np.array(h, dtype=self.config.wire.iterate_dtype)  # the state dtype, as the mirror
            y = self.problem.grad(np.asarray(x_prev, np.float64)) if self.mechanism.reads_y else None
            self.state = WorkerState(h, y)
        else:
            self.state = self.mechanism.reset(np.asarray(h).size)

    def round(
        self, t: int, x: np.ndarray, x64: np.ndarray | None = None
    ) -> tuple[Message, Diagnostics | None]:
        """Message for round t at iterate x^t, and (f_i(x^t), grad f_i(x^t)) on diagnostic rounds.
        `x64`: x in float64, where the caller has it already (read, never kept or changed)."""
        x64 = self._as_float64(x) if x64 is None else x64
        r = round_randomness(self.config.seed, t, self.worker_id, self.config.workers)
        # Overflow is not a warning here: each result is checked, and a non-finite one ends the
        # run with the worker named (x^t may still be finite where grad f_i(x^t) is not), in place
        # of a message no decoder would take (over gRPC the worker sends Diverged instead).
        with np.errstate(over="ignore", invalid="ignore"):
            grad, self.oracle_state = self.oracle.estimate(self.oracle_state, self.problem, x64, r)
            if not np.isfinite(grad).all():
                raise WorkerDivergedError(t, self.worker_id, "gradient")
            if self.state is None:
                message, self.state = self.mechanism.first(grad, r)
            else:
                message, self.state = self.mechanism.step(self.state, grad, r)
            if not all(_finite_values(part) for part in message.parts):
                raise WorkerDivergedError(t, self.worker_id, "update")  # past the value dtype's range
            diagnostics = None
            if self.config.diagnostic_round(t):
                full_grad = grad if self.oracle.exact else self.problem.grad(x64)
                diagnostics = (self.problem.loss(x64), full_grad)
                if not np.isfinite(diagnostics[0]):
                    raise WorkerDivergedError(t, self.worker_id, "loss")
                if full_grad is not grad and not np.isfinite(full_grad).all():
                    raise WorkerDivergedError(t, self.worker_id, "gradient")
        return message, diagnostics


def _finite_values(part: object) -> bool:
    """Whether a payload part's float values (where it has them) are all finite."""
    values = getattr(part, "values", None)
    return not (isinstance(values, np.ndarray) and values.dtype.kind == "f") or bool(np.isfinite(values).all())


@dataclass
class WorkerMeter:
    """Per-worker method traffic, as the coordinator counts it."""

    bits: int = 0  # payload bits (indices and flags included)
    value_bits: int = 0  # the papers' convention: values only
    messages: int = 0
    skips: int = 0
    absent: int = 0  # rounds closed without this worker's message (it was late or gone)


class Aggregator:
    """The coordinator's state and step: iterate, every worker's mirror g_i, their mean, meters.

    Fields by role:
    - the method: `x` (x^t), `mirrors[i]` (g_i^t, what worker i's messages built), `g_sum`
      (sum of the mirrors, kept incrementally so a round costs what its messages change);
    - the run: `step_scale` (gamma, or 1 for EF), `n`, `t` (the round being collected),
      `x_prev` (x^{t-1}: a rejoining worker rebuilds its last gradient from it);
    - metering: `meters[i]` (bits per worker), `skips_round`.
    `apply` must see a round's messages in worker-id order so that both transports add in the
    same order. `state_dict`/`from_state_dict` hold everything needed to resume exactly.
    """

    def __init__(self, plan: Plan):
        self.n = plan.config.workers
        self.d = plan.dim
        # EF's workers scale their messages by gamma themselves; the coordinator then steps by 1.
        mechanism = build_method(plan.resolved, plan.dim)
        self.step_scale = 1.0 if mechanism.worker_scales else plan.gamma
        # A missing message keeps the worker's mirror: exactly a lazy skip for the 3PC family.
        # Methods that need every worker (EF, MARINA) rescale over those present, by config.
        self.needs_all = mechanism.needs_all
        self.absent_policy = plan.config.absent_policy
        self.state_dtype = np.dtype(plan.config.wire.iterate_dtype)
        self.x = plan.x0  # iterates are replaced each round, never written into
        self.x_prev: np.ndarray | None = None
        # Under the delta downlink: the coordinates of g_sum this round's messages changed (a mask
        # over d, where a message marks its k indices: the sorted union of the n k indices took
        # 0.85 ms at n = 8, k = 1e4; `_touched_all`: maybe any), and after finish_round the
        # change to broadcast instead of x: (indices, new g_sum values), or None when x is not a
        # function of g_sum alone that round (an absent worker dropped and rescaled). Indices
        # None: every coordinate, the values then g_sum itself (read it before the next apply),
        # not d-sized copies of it and of arange(d).
        self.tracks_change = plan.downlink == "delta"
        self._touched = np.zeros(self.d if self.tracks_change else 0, bool)
        self._touched_all = False
        self.change: tuple[np.ndarray | None, np.ndarray] | None = None
        self.mirrors = np.zeros((self.n, self.d), self.state_dtype)  # g_i at the state dtype, as workers keep h
        self.g_sum = np.zeros(self.d)
        # GD: every message replaces a whole mirror, so its row is overwritten as it comes and
        # g_sum is summed from the rows once, when the round closes: n passes over d state
        # values instead of n updates of g_sum (at n = 8, d = 1e6: 5 ms a round, against 13 ms
        # of updates that all had to wait for worker 0's turn). Any round with such a message
        # ends with that sum, so messages of other kinds may be mixed in.
        self.sums_mirrors = mechanism.whole
        self._resum = False
        # What a worker may send (the codec refuses anything else), and a bound on each mirror's
        # largest |value| that keeps g_sum finite without a pass over every row (`_check_row`).
        self.state_max = float(np.finfo(self.state_dtype).max)
        value_dtype = plan.config.wire.value_dtype
        self._expect_first = Expect(mechanism.sends.first, value_dtype, self.state_max, self.n)
        self._expect_later = Expect(mechanism.sends.later, value_dtype, self.state_max, self.n)
        self._row_max = np.zeros(self.n)
        self._factor = self.step_scale / self.n  # x^{t+1} = x^t - factor g_sum (next_iterate)
        self._x_top_cache: float | None = None
        # This round's updates taken and refused: a round whose every update was refused is the
        # run diverging (honest workers' updates all leaving the range), not a hostile peer.
        self._taken_round = 0
        self._refused_round = 0
        self._scratch = np.empty(min(self.d, BLOCK))  # a block of new - old of a dense message
        self.t = 0
        self.meters = [WorkerMeter() for _ in range(self.n)]
        self.skips_round = 0
        self._grad_sum: np.ndarray | None = None
        self._loss_sum = 0.0
        self._diag_count = 0

    def expects(self, worker_id: int) -> Expect:
        """What worker_id's next message may be (the codec refuses anything else): its method's
        first message while the mirror holds nothing of it (its Restore says so), else a later one."""
        return self._expect_later if self.holds(worker_id) else self._expect_first

    def holds(self, worker_id: int) -> bool:
        """Whether the mirror holds something of worker_id: a Restore carries it, and the worker
        goes on from it (else it starts afresh with its method's first message)."""
        return self.meters[worker_id].messages > 0 and self.x_prev is not None

    def apply(self, worker_id: int, message: Message, diagnostics: Diagnostics | None = None) -> None:
        """mirror_i <- message.apply(mirror_i), and the meters; `diagnostics` (f_i(x^t),
        grad f_i(x^t)) are folded into the round's figures here, so that both transports add
        them in worker-id order, as they add the messages.

        RefusedUpdate, and nothing changed (mirrors, g_sum, meters, the round's figures, the
        delta downlink's marks), if the message would make the mirror or g_sum non-finite:
        finite parts can still sum past float64's range, or round past the state dtype's."""
        if not message.is_skip:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused, not warned about
                self._update_mirror(worker_id, message)
        self._taken_round += 1
        meter = self.meters[worker_id]
        meter.bits += message.bits()
        meter.value_bits += message.value_bits()
        meter.messages += 1
        if message.is_skip:
            meter.skips += 1
            self.skips_round += 1
        if diagnostics is not None:
            self._add_diagnostics(*diagnostics)

    def _update_mirror(self, worker_id: int, message: Message) -> None:
        """The mirror and g_sum moved by a message that is not a skip; checked before either changes."""
        old = self.mirrors[worker_id]
        indices = None if self.sums_mirrors else message.sparse_indices(self.d)
        if indices is not None:
            # In place, touching only the k coordinates the message changes: the same float64
            # additions as message.apply(old) at those coordinates, so the mirror still equals
            # the worker's h bit for bit (tested against the dense path). Checked by the rows'
            # bounds (`_fits`), else exactly: g_sum stays finite (it is checked at every change),
            # so a non-finite new value shows in its new sum, and that in the step it makes.
            old_values = old[indices]
            new_values = (old_values + np.asarray(message.parts[0].values, dtype=np.float64)).astype(old.dtype)
            new_sum = self.g_sum[indices] + np.subtract(new_values, old_values, dtype=np.float64)
            top = float(self._row_max[worker_id])
            if new_values.size:
                top = float(np.maximum(top, largest_magnitude(new_values)))  # NaN stays NaN
            if not (self._fits(worker_id, top) or self._steps_fit(self.x[indices], new_sum)):
                raise self._refused(worker_id, indices.size)
            self.g_sum[indices] = new_sum
            old[indices] = new_values
            self._row_max[worker_id] = top
            if self.tracks_change:
                self._touched[indices] = True
            return
        part = message.parts[0] if len(message.parts) == 1 else None
        dense_replace = message.mode is Mode.REPLACE and isinstance(part, DenseVector)
        # message.apply is a dense REPLACE's values rounded into the state dtype, which the
        # paths below do as they copy (no d-sized temporary whatever the dtypes).
        new = part.values if dense_replace else message.apply(old)  # type: ignore[union-attr]
        top = self._check_row(worker_id, new, part.largest if dense_replace else None)  # type: ignore[union-attr]
        if self.sums_mirrors:  # GD: g_sum is summed from the rows when the round closes
            np.copyto(old, new, casting="same_kind")  # rounded as astype rounds
            self._resum = True
        else:
            self._replace_dense(old, new)
        self._row_max[worker_id] = top
        if not self.tracks_change:
            return
        support = message.support(self.d) if message.mode is Mode.DELTA else None
        if support is None:
            self._touched_all = True  # a dense change: every coordinate may have moved
        else:
            self._touched[support] = True

    def _check_row(self, worker_id: int, new: np.ndarray, top: float | None = None) -> float:
        """The largest |value| of worker_id's new mirror `new`; RefusedUpdate if it does not fit
        the state dtype, or if g_sum, or the step it makes, could then leave its range.

        One pass over d: while the rows' largest |values| (`_row_max`) sum to a quarter of
        float64's range, no sum or difference of them overflows (always, for float32 state:
        n 3.4e38 is far from 1.8e308), and while the step they can make keeps x within half the
        state dtype's range, x^{t+1} is finite. Beyond that (values near the dtype's largest),
        the new g_sum and x^{t+1} are computed as the round will compute them. `top`: max |new|
        where the decoder has it already."""
        top = largest_magnitude(new) if top is None else top
        if not top <= self.state_max:  # NaN too
            raise self._refused(worker_id, self.d, f"a value of {top:.7g} for state of |x| <= {self.state_max:.7g}")
        if not (self._fits(worker_id, top) or self._sum_and_step_fit(worker_id, new)):
            raise self._refused(worker_id, self.d)
        return top

    def _fits(self, worker_id: int, top: float) -> bool:
        """Whether worker_id's mirror with largest |value| `top` keeps g_sum and x^{t+1} far
        inside their ranges, by the rows' bounds alone (no pass over d)."""
        bound = float(self._row_max.sum()) - float(self._row_max[worker_id]) + top
        within = top <= self.state_max and bound <= _SAFE_SUM  # False for NaN
        return within and self._factor * bound + self._x_top() <= self.state_max / 2

    def _sum_and_step_fit(self, worker_id: int, new: np.ndarray) -> bool:
        """Whether g_sum stays finite, and x^{t+1} within the state dtype's range, with worker_id's
        mirror `new` (rare: only for values near the dtype's largest)."""
        mirror = self.mirrors[worker_id]
        if self.sums_mirrors:
            kept = mirror.copy()
            np.copyto(mirror, new, casting="same_kind")
            try:
                total = self.mirrors.sum(axis=0, dtype=np.float64)  # as _sum_mirrors sums them
            finally:
                np.copyto(mirror, kept)
            return self._steps_fit(self.x, total)
        for block in blocks(self.d):
            difference = np.subtract(new[block].astype(mirror.dtype), mirror[block], dtype=np.float64)
            if not self._steps_fit(self.x[block], self.g_sum[block] + difference):
                return False
        return True

    def _steps_fit(self, x: np.ndarray, g_sum: np.ndarray) -> bool:
        """Whether x - (gamma / n) g_sum, in float64 as `next_iterate` computes it, stays within
        the state dtype's range (it is rounded into it); False too where g_sum is not finite."""
        return bool((np.abs(x - g_sum * self._factor) <= self.state_max).all())

    def _x_top(self) -> float:
        """max |x^t|, computed once a round, where a bound needs it."""
        if self._x_top_cache is None:
            self._x_top_cache = largest_magnitude(self.x)
        return self._x_top_cache

    def _refused(self, worker_id: int, touched: int, why: str = "") -> RefusedUpdate:
        self._refused_round += 1
        reason = why or "a new mirror value, their sum or the next iterate would not be finite"
        return RefusedUpdate(
            f"worker {worker_id}'s update for round {self.t} would make the aggregate non-finite "
            f"({reason}; {touched} coordinates)"
        )

    def _replace_dense(self, mirror: np.ndarray, new: np.ndarray) -> None:
        """mirror <- new rounded into the mirror's dtype, and g_sum += (that) - mirror in float64,
        block by block: each block's difference stays in cache instead of a d-sized scratch
        (1.9 -> 1.3 ms at d = 1e6); every coordinate gets the very same operations."""
        for block in blocks(self.d):
            rounded = new[block].astype(mirror.dtype, copy=False)
            difference = self._scratch[: block.stop - block.start]
            np.subtract(rounded, mirror[block], out=difference, dtype=np.float64)
            self.g_sum[block] += difference
            mirror[block] = rounded

    def _sum_mirrors(self) -> None:
        """g_sum <- the sum of the mirrors in float64, in worker-id order, block by block."""
        def sum_block(block: slice) -> None:
            np.sum(self.mirrors[:, block], axis=0, dtype=np.float64, out=self.g_sum[block])

        in_two_threads(sum_block, self.d)
        self._resum = False

    def _add_diagnostics(self, loss: float, grad: np.ndarray) -> None:
        """A worker's f_i(x^t) and grad f_i(x^t), for the round's figures (never in the bits)."""
        if self._grad_sum is None:
            self._grad_sum = np.array(grad, dtype=np.float64)
        else:
            self._grad_sum += grad
        self._loss_sum += loss
        self._diag_count += 1

    def finish_round(self, absent: Collection[int] = ()) -> dict[str, float | int | None]:
        """Close round t: its figures, then x^{t+1} = x^t - gamma g^t.

        `absent`: workers whose message did not come this round. Their mirrors stay; for a
        method that needs every worker under the "drop" policy, g^t is the mean of the mirrors
        of the workers present (rescaled), and their stale mirrors are left out.
        DivergedError if updates came and every one was refused (`apply`): no worker's update
        fits any more, as when a stepsize too large makes x^{t+1} overflow.
        """
        if self._refused_round and not self._taken_round:
            raise DivergedError(
                f"the run diverged at round {self.t}: each of its {self._refused_round} updates would have made "
                "the aggregate non-finite, and none could be applied"
            )
        row: dict[str, float | int | None] = {"round": self.t}
        for worker_id in absent:
            self.meters[worker_id].absent += 1
        if self._diag_count and self._grad_sum is not None:
            # Over the workers whose figures came (all n, but for an absent worker): the mean of
            # their f_i and grad f_i, with their count beside it.
            grad_f = self._grad_sum / self._diag_count
            row["grad_norm_sq"] = float(grad_f @ grad_f)
            row["loss"] = self._loss_sum / self._diag_count
        else:
            row["grad_norm_sq"] = None
            row["loss"] = None
        row["diag_workers"] = self._diag_count
        row["bits_up_per_worker"] = sum(m.bits for m in self.meters) / self.n
        row["value_bits_up_per_worker"] = sum(m.value_bits for m in self.meters) / self.n
        row["skips"] = self.skips_round
        row["absent"] = len(absent)
        self.x_prev = self.x
        if self._resum:
            self._sum_mirrors()
        changed = self._changed()  # g_sum's coordinates this round changed (None: maybe all)
        if absent and self.needs_all and self.absent_policy == "drop":
            present = [i for i in range(self.n) if i not in set(absent)]
            total = self.mirrors[present].sum(axis=0, dtype=np.float64)
            self.x = next_iterate(self.x, total, self.step_scale, max(len(present), 1))
            self.change = None  # not a function of g_sum alone: followers need a dense resync
        else:
            self.x = next_iterate(self.x, self.g_sum, self.step_scale, self.n)
            if not self.tracks_change:
                self.change = None  # the dense downlink broadcasts x itself
            else:
                self.change = (None, self.g_sum) if changed is None else (changed, self.g_sum[changed])
        self._x_top_cache = None
        self._taken_round = self._refused_round = 0
        if not np.isfinite(self.x).all():
            raise DivergedError(f"the run diverged at round {self.t}: the iterate is no longer finite")
        self.t += 1
        self.skips_round = 0
        self._grad_sum, self._loss_sum, self._diag_count = None, 0.0, 0
        return row

    def _changed(self) -> np.ndarray | None:
        """The sorted coordinates of g_sum this round's messages changed, and none marked for the
        next round; None: any of them (a dense round: round 0, GD, MARINA's full rounds; and
        whenever the change is not tracked)."""
        if not self.tracks_change:
            return None
        if self._touched_all:
            self._touched_all = False
            self._touched.fill(False)
            return None
        changed = np.flatnonzero(self._touched)  # empty when every worker skipped
        self._touched[changed] = False
        return changed

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs, as arrays (np.savez-able; no pickles)."""
        meters = np.array([[m.bits, m.value_bits, m.messages, m.skips, m.absent] for m in self.meters], np.int64)
        state = {"x": self.x, "mirrors": self.mirrors, "g_sum": self.g_sum, "t": np.array(self.t), "meters": meters}
        if self.x_prev is not None:
            state["x_prev"] = self.x_prev
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` saved (shapes checked)."""
        if state["mirrors"].shape != self.mirrors.shape:
            raise ConfigError(
                f"checkpoint has {state['mirrors'].shape} mirrors, this run needs {self.mirrors.shape}"
            )
        self.x = state["x"].astype(self.state_dtype)
        self.mirrors = state["mirrors"].astype(self.state_dtype)
        self.g_sum = state["g_sum"].astype(np.float64)
        self._row_max = np.maximum(self.mirrors.max(axis=1), -self.mirrors.min(axis=1)).astype(np.float64)
        self._x_top_cache = None
        self._resum = False
        self.t = int(state["t"])
        self.x_prev = state["x_prev"].astype(self.state_dtype) if "x_prev" in state else None
        for meter, row in zip(self.meters, state["meters"]):
            meter.bits, meter.value_bits, meter.messages, meter.skips, meter.absent = map(int, row)


class IterateFollower:
    """A worker's copy of x^t and of the coordinator's g_sum, rebuilt from what changed.

    The coordinator broadcasts `Aggregator.change` (the coordinates of g_sum its round changed
    and their new values, exactly) instead of x; the follower writes them into its g_sum and
    steps x <- x - scale (g_sum / n) with `next_iterate`, as `Aggregator.finish_round` does, so
    x stays bit-identical (a digest travels with each broadcast to prove it).
    """

    def __init__(self, x: np.ndarray, g_sum: np.ndarray, n: int, step_scale: float):
        self.n = n
        self.step_scale = step_scale
        self.reset(x, g_sum)

    def reset(self, x: np.ndarray, g_sum: np.ndarray) -> None:
        """A dense resync: the coordinator's x and g_sum as they are."""
        self.x = np.array(x)
        self.g_sum = np.array(g_sum, dtype=np.float64)
        self.x64 = self.x if self.x.dtype == np.float64 else self.x.astype(np.float64)  # for the gradient

    def follow(self, indices: np.ndarray | None, values: np.ndarray) -> np.ndarray:
        """x^{t+1} from g_sum's new values at `indices` (None: at every coordinate); `x64`
        then holds it in float64."""
        if indices is None:
            np.copyto(self.g_sum, values)
        else:
            self.g_sum[indices] = values
        if self.x.dtype == np.float64:
            self.x = self.x64 = next_iterate(self.x, self.g_sum, self.step_scale, self.n)
        else:
            self.x = next_iterate(self.x, self.g_sum, self.step_scale, self.n, self.x64)
        return self.x


def next_iterate(
    x: np.ndarray, g_sum: np.ndarray, scale: float, count: int, widened_out: np.ndarray | None = None
) -> np.ndarray:
    """x^{t+1} = x^t - (scale / count) g_sum: the one formula the coordinator and every follower of
    the delta downlink run, so that their iterates are equal bit for bit.

    Each coordinate is x[j] - g_sum[j] * (scale / count) in float64, rounded once into x's dtype
    (a new array). Block by block: the step's float64 block stays in cache, and no d-sized
    float64 array is kept or made for it (at d = 1e6 1.3 ms, against 2.1 for a kept step vector).
    A float32 x is widened into a block of its own first: numpy's mixed-dtype subtract casts
    in small buffers (1.0-1.1 ms against 1.2-1.4 at d = 1e6). `widened_out` (float64, x's shape),
    if given, also receives x^{t+1} in float64 from the same pass: what a worker's gradient reads,
    without a pass of its own over the new x.
    """
    factor = scale / count
    new = np.empty_like(x)
    steps = np.empty(min(x.size, BLOCK))
    widened = np.empty_like(steps) if x.dtype != steps.dtype else None
    for block in blocks(x.size):
        step = steps[: block.stop - block.start]
        np.multiply(g_sum[block], factor, out=step)
        if widened is None:
            np.subtract(x[block], step, out=new[block])
        else:
            wide = widened[: step.size]
            np.copyto(wide, x[block])
            np.subtract(wide, step, out=wide)
            np.copyto(new[block], wide, casting="same_kind")
        if widened_out is not None:
            np.copyto(widened_out[block], new[block])
    return new


def digest(x: np.ndarray) -> bytes:
    """A short checksum of an iterate's bytes (XXH3-64, 8 bytes), equal on every machine.

    Every worker hashes x every round under the delta downlink: XXH3 reads 4 MB in ~0.15 ms
    where blake2b took ~8 ms (no adversary here: it guards against drift, not forgery)."""
    return xxhash.xxh3_64_digest(np.ascontiguousarray(x))


RoundCallback = Callable[[dict], None]


@dataclass
class RunResult:
    rows: list[dict] = field(default_factory=list)
    x: np.ndarray | None = None
    per_worker: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0


def run_in_process(plan_: Plan, on_round: RoundCallback | None = None) -> RunResult:
    """The reference engine: every worker and the coordinator as function calls, no transport."""
    config = plan_.resolved
    full = load_data(config)
    nodes = [
        WorkerNode(config, i, local_problem(config, load_shard(config, i, full), i))
        for i in range(config.workers)
    ]
    agg = Aggregator(plan_)
    result = RunResult()
    start = time.perf_counter()
    refused: list[int] = []  # workers whose update the last round refused (as the coordinator does)
    for t in range(config.rounds):
        for i in refused:  # their state goes back to the mirror, as a Restore does over gRPC
            if agg.holds(i):
                nodes[i].restore(agg.mirrors[i], agg.x_prev)  # type: ignore[arg-type]
            else:
                nodes[i].state = None
        refused = []
        for node in nodes:
            message, diagnostics = node.round(t, agg.x)
            try:
                agg.apply(node.worker_id, message, diagnostics)
            except RefusedUpdate:
                refused.append(node.worker_id)  # absent this round; all refused: finish_round ends the run
        row = agg.finish_round(refused)
        row.update(wire_bytes_up=None, wire_bytes_down=None, elapsed_s=time.perf_counter() - start)
        result.rows.append(row)
        if on_round:
            on_round(row)
    result.x = agg.x
    result.per_worker = [vars(m).copy() for m in agg.meters]
    result.elapsed_s = time.perf_counter() - start
    return result
