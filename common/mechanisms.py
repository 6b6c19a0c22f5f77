"""Three point compressors (3PC paper, Algorithm 1; ALGORITHMS.md section 2) as worker mechanisms.

A 3PC maps (h, y, x) = (g_i^t, grad f_i(x^t), grad f_i(x^{t+1})) to g_i^{t+1} = C_{h,y}(x) and
satisfies E||C_{h,y}(x) - x||^2 <= (1 - A)||h - y||^2 + B||x - y||^2. Here a 3PC returns the
*message* that says how g_i^{t+1} differs from the coordinator's mirror of h, and the new estimate
is always `message.apply(h)`: the worker and the coordinator run that same function, so the
worker's h and the coordinator's mirror stay bit-identical.

A `Mechanism` is a NamedTuple of pure functions (Optax's `(init, update)`):
`first(grad, r) -> (message, state)` for round 0 and `step(state, grad, r) -> (message, state)`
for every later round. Compositions (3PCv2, 3PCv3, 3PCv4) wrap 3PC functions; LAG and CLAG wrap
a 3PC in a trigger.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from threepc.common.compressors import Compressor, sqrt_one_minus
from threepc.common.errors import ConfigError
from threepc.common.payloads import DENSE, DenseVector, Form, Message, Mode, skip, to_wire_dtype
from threepc.common.randomness import Randomness

ThreePointFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Randomness], Message]


class WorkerState(NamedTuple):
    """What a worker keeps between rounds."""

    h: np.ndarray  # g_i^t: the estimate the coordinator mirrors
    y: np.ndarray | None  # grad f_i(x^t): the last true local gradient; None where never read


class Constants(NamedTuple):
    """The 3PC constants (A, B) of a mechanism for dimension d."""

    A: float
    B: float


class Sends(NamedTuple):
    """The message forms a mechanism may send: its first message (a worker whose mirror holds
    nothing yet: `first`), and every later one (`step`'s: `later`). The coordinator refuses any other."""

    first: frozenset[Form]
    later: frozenset[Form]


FULL = Form(Mode.REPLACE, (DENSE,))  # g_i sent in full (`dense_message`)
SKIP = Form(Mode.DELTA)  # the mirror stays (a lazy skip; MARINA's unchosen worker)


class Mechanism(NamedTuple):
    """A worker mechanism: first round, later rounds, its 3PC constants, and what it sends."""

    name: str
    first: Callable[[np.ndarray, Randomness], tuple[Message, WorkerState]]
    step: Callable[[WorkerState, np.ndarray, Randomness], tuple[Message, WorkerState]]
    constants: Callable[[int], Constants]
    skips: bool = False  # whether messages can be lazy skips (metered as a skip rate)
    worker_scales: bool = False  # True: messages are already scaled by gamma (EF); the coordinator steps by 1
    needs_all: bool = False  # True: a round needs every worker's message (EF; MARINA's full rounds)
    restores_exactly: bool = True  # the state is (h, y), rebuilt from the mirror and x^{t-1}
    reads_y: bool = True  # False: y is never read, so not kept (a d-vector of float64 less: GD, EF21)
    reset: Callable[[int], Any] | None = None  # a fresh state of dimension d, where not exact
    whole: bool = False  # every message is g_i itself, dense (GD): the coordinator sums the mirrors once a round
    sends: Sends = Sends(frozenset(), frozenset())  # the forms of its messages (every constructor sets them)


def minus(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """x - h, as numpy computes it, but h widened in one pass first: numpy's own subtract of a
    float32 h from a float64 x casts in small buffers, and took 0.8-1.0 ms at d = 1e6 against
    0.45-0.55 ms this way."""
    if x.dtype == h.dtype:
        return x - h
    out = np.empty(x.shape, np.result_type(x, h))
    np.copyto(out, h)
    return np.subtract(x, out, out=out)


def dense_message(x: np.ndarray, dtype: str) -> Message:
    """g_i = x, sent in full."""
    return Message(Mode.REPLACE, (DenseVector(to_wire_dtype(x, dtype), dtype),))


def three_point(
    name: str,
    c3pc: ThreePointFn,
    constants: Callable[[int], Constants],
    dtype: str,
    init: str = "full",
    initial: Compressor | None = None,
    skips: bool = False,
    state_dtype: str = "float64",
    reads_y: bool = True,
    whole: bool = False,
    forms: frozenset[Form] = frozenset(),
) -> Mechanism:
    """A mechanism from a 3PC function: g_i^0 = grad f_i(x^0) (init "full") or C(grad) ("compressed").

    `state_dtype`: the dtype of h (and of the coordinator's mirror of it), the run's iterate dtype;
    message.apply keeps h in it. `reads_y`: False where `c3pc` never reads y (it gets None).
    `whole`: every message is dense g_i (`c3pc` and the first round both send the gradient).
    `forms`: the forms of `c3pc`'s messages (the first message's follow from `init`)."""

    def first(grad: np.ndarray, r: Randomness) -> tuple[Message, WorkerState]:
        if init == "compressed" and initial is not None:
            message = Message(Mode.REPLACE, (initial.compress(grad, r),))
        else:
            message = dense_message(grad, dtype)
        return message, WorkerState(message.apply(np.zeros(grad.size, state_dtype)), grad if reads_y else None)

    def step(state: WorkerState, grad: np.ndarray, r: Randomness) -> tuple[Message, WorkerState]:
        message = c3pc(state.h, state.y, grad, r)  # type: ignore[arg-type]  # None only where never read
        return message, WorkerState(message.apply(state.h), grad if reads_y else None)

    compressed = init == "compressed" and initial is not None
    opening = Form(Mode.REPLACE, (initial.emits,)) if compressed else FULL  # type: ignore[union-attr]
    sends = Sends(frozenset({opening}), forms)
    return Mechanism(name, first, step, constants, skips, reads_y=reads_y, whole=whole, sends=sends)


# ----------------------------------------------------------------------------- 3PC functions


def _alpha(c: Compressor, d: int) -> float:
    if c.alpha is None:
        raise ConfigError(f"{c.name} is not a contractive compressor; this method needs one")
    return c.alpha(d)


def _ef21_constants(alpha: float) -> Constants:
    """A = 1 - sqrt(1 - alpha), B = (1 - alpha) / (1 - sqrt(1 - alpha)) (EF21, Table 1)."""
    a = 1.0 - sqrt_one_minus(alpha)
    return Constants(a, (1.0 - alpha) / a if a > 0 else math.inf)


def gd_3pc(dtype: str) -> ThreePointFn:
    """C_{h,y}(x) = x."""
    return lambda h, y, x, r: dense_message(x, dtype)


def ef21_3pc(c: Compressor) -> ThreePointFn:
    """C_{h,y}(x) = h + C(x - h)."""
    return lambda h, y, x, r: Message(Mode.DELTA, (c.compress(minus(x, h), r),))


def naive_3pc(c: Compressor) -> ThreePointFn:
    """Naive compressed GD, C(x): no error feedback. Not a 3PC (E||C(x) - x||^2 does not vanish
    as the gradients converge); here to show why EF21 is needed: it can stall or diverge."""
    return lambda h, y, x, r: Message(Mode.REPLACE, (c.compress(x, r),))


def lazy(inner: ThreePointFn, zeta: float) -> ThreePointFn:
    """Run `inner` only if ||x - h||^2 > zeta ||x - y||^2 (strict), else keep h at a 1-bit skip."""

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        gap, change = minus(x, h), x - y
        if float(np.dot(gap, gap)) > zeta * float(np.dot(change, change)):
            sent = inner(h, y, x, r)
            return Message(sent.mode, sent.parts, sent.flag_bits + 1)
        return skip(1)

    return c3pc


def v1_3pc(c: Compressor, dtype: str) -> ThreePointFn:
    """3PCv1: y + C(x - y). The coordinator does not know y, so y travels dense."""

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        return Message(Mode.REPLACE, (DenseVector(to_wire_dtype(y, dtype), dtype), c.compress(x - y, r)))

    return c3pc


def v2_3pc(c: Compressor, q: Compressor) -> ThreePointFn:
    """3PCv2: b + C(x - b) with b = h + Q(x - y)."""

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        q_part = q.compress(x - y, r)
        b = Message(Mode.DELTA, (q_part,)).apply(h)
        return Message(Mode.DELTA, (q_part, c.compress(minus(x, b), r)))

    return c3pc


def v3_3pc(c: Compressor, inner: ThreePointFn) -> ThreePointFn:
    """3PCv3: b + C(x - b) with b = C1_{h,y}(x), any inner 3PC."""

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        first = inner(h, y, x, r)
        b = first.apply(h)
        return Message(first.mode, first.parts + (c.compress(minus(x, b), r),), first.flag_bits)

    return c3pc


def v4_3pc(c1: Compressor, c2: Compressor) -> ThreePointFn:
    """3PCv4: b + C1(x - b) with b = h + C2(x - h)."""

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        c2_part = c2.compress(minus(x, h), r)
        b = Message(Mode.DELTA, (c2_part,)).apply(h)
        return Message(Mode.DELTA, (c2_part, c1.compress(minus(x, b), r)))

    return c3pc


V5_COIN = 0xC055  # tag of 3PCv5's shared coin in the round's shared randomness


def v5_3pc(c: Compressor, p: float, dtype: str, shared_coin: bool = False) -> ThreePointFn:
    """3PCv5: x with probability p, else h + C(x - y); one flag bit says which.

    The coin is each worker's own (from its private rng), or with `shared_coin` one coin per
    round for every worker (from the round's shared randomness), as the authors' code draws
    it: then in a round either every worker sends x or none does. The 3PC inequality holds
    per worker either way (each worker's coin is Bernoulli(p)), so A and B are the same.
    """

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        coin = r.shared(V5_COIN).random() if shared_coin else r.rng.random()
        if coin < p:
            full = dense_message(x, dtype)
            return Message(full.mode, full.parts, 1)
        return Message(Mode.DELTA, (c.compress(x - y, r),), 1)

    return c3pc


def ef21_plus_3pc(c: Compressor) -> ThreePointFn:
    """EF21+: the better of b = C(x) and m = h + C(x - h) by distance to x; one flag bit."""

    def c3pc(h: np.ndarray, y: np.ndarray, x: np.ndarray, r: Randomness) -> Message:
        plain = Message(Mode.REPLACE, (c.compress(x, r),), 1)
        markov = Message(Mode.DELTA, (c.compress(minus(x, h), r),), 1)
        d = x.size
        err_plain = float(np.sum((plain.dense(d) - x) ** 2))
        err_markov = float(np.sum((markov.apply(h) - x) ** 2))
        return plain if err_plain < err_markov else markov

    return c3pc


# ----------------------------------------------------------------------------- beyond 3PC

COIN = 0xC011  # tag of MARINA's coin in the round's shared randomness


def marina(
    q: Compressor, p: float, dtype: str, sampling: tuple[float, ...] | None = None, state_dtype: str = "float64"
) -> Mechanism:
    """MARINA (Gorbunov et al. 2021; ALGORITHMS.md section 3).

    One coin c_t ~ Bernoulli(p) per round, the same for every worker (drawn from the round's
    shared randomness, so the coordinator knows it and no flag is sent). c_t = 1: send
    grad f_i(x^{t+1}) dense; else Q(grad f_i(x^{t+1}) - grad f_i(x^t)), added to the mirror.

    `sampling` = (q_1, ..., q_n): the importance-sampling combinatorial compressor (ISCC): in a
    compressed round one worker j ~ q (shared draw) sends Q(a_j / q_j), so its mirror moves by
    that and g by Q(a_j) / (n q_j); the others send nothing (the coordinator knows j: no flag).
    """

    def first(grad: np.ndarray, r: Randomness) -> tuple[Message, WorkerState]:
        message = dense_message(grad, dtype)
        return message, WorkerState(message.apply(np.zeros(grad.size, state_dtype)), grad)

    def step(state: WorkerState, grad: np.ndarray, r: Randomness) -> tuple[Message, WorkerState]:
        if r.shared(COIN).random() < p:
            message = dense_message(grad, dtype)
        elif sampling is None:
            message = Message(Mode.DELTA, (q.compress(grad - state.y, r),))
        else:
            chosen = int(r.shared(COIN, 1).choice(len(sampling), p=sampling))
            if chosen == r.worker_id:
                message = Message(Mode.DELTA, (q.compress((grad - state.y) / sampling[chosen], r),))
            else:
                message = Message(Mode.DELTA, (), 0)  # not chosen: nothing to send, nothing to flag
        return message, WorkerState(message.apply(state.h), grad)

    name = "marina" if sampling is None else "marina_iscc"
    later = {FULL, Form(Mode.DELTA, (q.emits,))} | ({SKIP} if sampling is not None else set())
    sends = Sends(frozenset({FULL}), frozenset(later))
    return Mechanism(name, first, step, lambda d: Constants(1.0, 0.0), needs_all=True, sends=sends)


class ErrorFeedbackState(NamedTuple):
    """EF's worker state."""

    e: np.ndarray  # e_i^k: what compression has left unsent so far


def error_feedback(c: Compressor, gamma: float) -> Mechanism:
    """EF / EC-SGD (Seide et al. 2014; Danilova and Gorbunov 2022; ALGORITHMS.md section 4).

    v_i = C(e_i + gamma g_i) is sent, e_i <- e_i + gamma g_i - v_i, and the coordinator steps
    x <- x - mean_i v_i: the stepsize is applied by the worker (`worker_scales`).
    """

    def step(state: ErrorFeedbackState, grad: np.ndarray, r: Randomness) -> tuple[Message, ErrorFeedbackState]:
        corrected = state.e + gamma * grad
        message = Message(Mode.REPLACE, (c.compress(corrected, r),))
        return message, ErrorFeedbackState(corrected - message.dense(grad.size))

    def first(grad: np.ndarray, r: Randomness) -> tuple[Message, ErrorFeedbackState]:
        return step(ErrorFeedbackState(np.zeros_like(grad)), grad, r)

    return Mechanism(
        "ef14",
        first,  # type: ignore[arg-type]
        step,  # type: ignore[arg-type]
        lambda d: Constants(1.0, 0.0),
        worker_scales=True,
        needs_all=True,
        restores_exactly=False,
        reset=lambda d: ErrorFeedbackState(np.zeros(d)),
        sends=Sends(*[frozenset({Form(Mode.REPLACE, (c.emits,))})] * 2),
    )
