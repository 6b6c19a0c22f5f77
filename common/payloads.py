"""Typed payloads: what a compressor returns and what a worker's message carries.

A compressor returns one *vector payload* (`DenseVector`, `SparseVector`, ...), which knows its
decoded value (`dense(d)`) and its exact size on the wire in bits (`bits()`), counted by the
encodings of `threepc.common.bitpack`. A worker's round message is a `Message`: its new estimate
`g_i^{t+1}` relative to the coordinator's mirror `g_i^t` as a sum of parts (3PC paper, Alg. 1).

Payloads are frozen and their arrays are read-only: the values in a payload are exactly the
values that cross the wire (already cast to the wire dtype), so a worker that updates its own
state from `payload.dense(d)` stays bit-identical with the coordinator's mirror.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from threepc.common import bitpack

FloatArray = npt.NDArray[np.floating]
IndexArray = npt.NDArray[np.int64]

# Wire dtypes of values, by config name. bfloat16 has no numpy dtype: it travels as the upper
# 16 bits of a float32 and is held here as a float32 whose lower 16 bits are zero.
VALUE_DTYPES = ("float64", "float32", "float16", "bfloat16")
_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16}
SCALE_BITS = 32  # a norm, scale or range endpoint travels as one float32-sized figure


def value_bits(dtype: str) -> int:
    """Bits of one value of a wire dtype."""
    return _BITS[dtype]


def to_wire_dtype(values: npt.ArrayLike, dtype: str) -> np.ndarray:
    """Round `values` to what the wire dtype can carry (numpy array of that precision)."""
    arr = np.asarray(values)
    if dtype == "bfloat16":
        # Round to nearest even on the upper half of the float32 bit pattern.
        as_f32 = np.ascontiguousarray(arr, dtype=np.float32)
        bits = as_f32.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = rounded.astype(np.uint32).view(np.float32)
        return np.where(np.isfinite(as_f32), out, as_f32)
    return np.ascontiguousarray(arr, dtype=np.dtype(dtype))


def largest_magnitude(values: np.ndarray) -> float:
    """max |values| (NaN if any is NaN, 0 if there are none), in two reductions without a
    d-sized |values| (0.22 against 0.24 ms at d = 1e6 float32, 0.46 against 0.91 float64)."""
    if not values.size:
        return 0.0
    return float(np.maximum(values.max(), -values.min()))


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def union_sorted(pieces: list[np.ndarray]) -> np.ndarray:
    """The sorted union of index arrays (np.unique is ~10x slower on 1e5 indices in numpy 2).

    The pieces are mostly sorted already (a message's indices are), and a stable sort (timsort)
    merges sorted runs: 0.85 ms against 4.8 for quicksort on 8 runs of 1e4 indices."""
    merged = np.sort(np.concatenate(pieces), kind="stable")
    if merged.size < 2:
        return merged
    keep = np.empty(merged.size, dtype=bool)
    keep[0] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return merged[keep]


class IndexRule(enum.IntEnum):
    """How both ends draw the coordinates of a seeded sparse payload."""

    RAND_K = 1  # k coordinates uniformly without replacement
    PERM_K = 2  # slice `block` of `blocks` of a shared random permutation


class Grid(enum.IntEnum):
    """Level grids of `QuantizedVector`."""

    UNIFORM = 1  # QSGD: level / s
    NATURAL = 2  # natural dithering: 0 or 2^(level - s), level in [0, s]
    EXPONENT = 3  # natural compression: level is a biased 8-bit exponent, value 2^(level - 127)
    RANGE = 4  # IQ, CQ: offset + scale * level / (levels - 1), unsigned


def perm_k_block(d: int, seed: int, block: int, blocks: int) -> tuple[IndexArray, float]:
    """PermK (Szlendak et al. 2021): worker `block` of `blocks`' sorted coordinates and the factor
    its values are scaled by, drawn identically on both ends from the round's shared seed.

    blocks = n <= d: the paper's d = q n case, generalized by padding d with zero coordinates to
    q n, q = ceil(d / n): a permutation of the q n slots, worker i takes slots [i q, (i + 1) q)
    and keeps those that are real coordinates (< d), scaled by n. Every coordinate lies in
    exactly one block and in worker i's with probability q / (q n) = 1/n, so each worker is
    unbiased and the mean of the n outputs is exact on equal inputs. For n | d it is the paper's
    definition (blocks of q, scale n).
    blocks = n > d: the paper's n = q d case (each coordinate sent by q workers, scaled by d),
    generalized to n = q d + r: a permutation pi of the n workers and sigma of the d coordinates;
    worker i takes slot s = pi(i) mod d, i.e. coordinate sigma(s), which c_s = q + [s < r]
    workers share, scaled by n / c_s. Unbiased: sum_s P(slot s) P(sigma(s) = j) n / c_s
    = sum_s (c_s / n)(1 / d)(n / c_s) = 1; the mean is exact on equal inputs.
    """
    if not (0 < blocks and 0 <= block < blocks):
        raise ValueError(f"perm_k: block {block} of {blocks} invalid")
    rng = np.random.default_rng(seed)
    if blocks <= d:
        q = -(-d // blocks)
        slots = rng.permutation(q * blocks)[block * q : (block + 1) * q]
        return _readonly(np.sort(slots[slots < d]).astype(np.int64)), float(blocks)
    worker_slot = rng.permutation(blocks)
    coordinate = rng.permutation(d)
    slot = int(worker_slot[block]) % d
    holders = blocks // d + (1 if slot < blocks % d else 0)
    return _readonly(np.array([coordinate[slot]], dtype=np.int64)), blocks / holders


def seeded_indices(
    rule: IndexRule, d: int, seed: int, k: int, block: int, blocks: int
) -> IndexArray:
    """The sorted coordinates of a seeded sparse payload, drawn identically on both ends."""
    if rule is IndexRule.RAND_K:
        rng = np.random.default_rng(seed)
        return _readonly(np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64))
    if rule is IndexRule.PERM_K:
        return perm_k_block(d, seed, block, blocks)[0]
    raise ValueError(f"unknown index rule {rule!r}")


@dataclass(frozen=True, eq=False)
class DenseVector:
    """All d values."""

    values: FloatArray
    dtype: str = "float32"
    # max |values| where the decoder has it (it reads every value to check it is finite): the
    # coordinator's own check of a dense update then needs no pass of its own (engine.Aggregator).
    largest: float | None = None

    def dense(self, d: int) -> np.ndarray:
        return self.values.astype(np.float64)

    def bits(self) -> int:
        return int(self.values.size) * value_bits(self.dtype)

    def value_bits(self) -> int:
        return self.bits()


@dataclass(frozen=True, eq=False)
class SparseVector:
    """k values at explicit, strictly increasing coordinates in [0, size) (TopK, HardThreshold)."""

    size: int
    indices: IndexArray
    values: FloatArray
    dtype: str = "float32"

    def dense(self, d: int) -> np.ndarray:
        out = np.zeros(d)
        out[self.indices] = self.values
        return out

    def bits(self) -> int:
        return bitpack.index_bits(self.indices, self.size) + self.value_bits()

    def value_bits(self) -> int:
        return int(self.values.size) * value_bits(self.dtype)


@dataclass(frozen=True, eq=False)
class SeededSparseVector:
    """k values at coordinates both ends draw from a shared seed (RandK, PermK): no indices."""

    rule: IndexRule
    seed: int
    values: FloatArray
    block: int = 0
    blocks: int = 0
    dtype: str = "float32"

    def indices(self, d: int) -> IndexArray:
        return seeded_indices(
            self.rule, d, self.seed, int(self.values.size), self.block, self.blocks
        )

    def dense(self, d: int) -> np.ndarray:
        out = np.zeros(d)
        out[self.indices(d)] = self.values
        return out

    def bits(self) -> int:
        return int(self.values.size) * value_bits(self.dtype)

    def value_bits(self) -> int:
        return self.bits()


@dataclass(frozen=True, eq=False)
class QuantizedVector:
    """Per-coordinate levels on a grid: value_j = offset + scale * sign_j * grid(level_j).

    `negative` is None for unsigned grids (RANGE). `level_bits` is the width each level is
    packed at on the wire (ceil(log2(levels + 1)) for QSGD and natural dithering, 8 for natural
    compression, ceil(log2 levels) for IQ/CQ: 1 bit for two levels).
    """

    grid: Grid
    levels: int
    scale: float
    level_codes: npt.NDArray[np.uint32]
    level_bits: int
    negative: npt.NDArray[np.bool_] | None = None
    offset: float = 0.0
    seed: int = 0

    def magnitudes(self) -> np.ndarray:
        lv = self.level_codes.astype(np.float64)
        if self.grid is Grid.UNIFORM:
            return lv / self.levels
        if self.grid is Grid.NATURAL:
            return np.where(lv == 0, 0.0, np.exp2(lv - self.levels))
        if self.grid is Grid.EXPONENT:
            return np.where(lv == 0, 0.0, np.exp2(lv - 127.0))
        if self.grid is Grid.RANGE:
            return lv / max(self.levels - 1, 1)
        raise ValueError(f"unknown grid {self.grid!r}")

    def dense(self, d: int) -> np.ndarray:
        mag = self.scale * self.magnitudes()
        if self.negative is not None:
            mag = np.where(self.negative, -mag, mag)
        return self.offset + mag

    def bits(self) -> int:
        d = int(self.level_codes.size)
        header = SCALE_BITS * (2 if self.grid is Grid.RANGE else 1)
        if self.grid is Grid.EXPONENT:
            header = 0
        signs = d if self.negative is not None else 0
        return header + signs + d * self.level_bits

    def value_bits(self) -> int:
        return self.bits()


@dataclass(frozen=True, eq=False)
class SignVector:
    """scale * sign(x), optionally after a seeded randomized Hadamard rotation (DRIVE).

    Unrotated: d signs. Rotated: d' = threepc.common.hadamard.padded_size(d) signs (the rotation
    pads d to a power of two) that `dense(d)` rotates back and truncates to d; the wire carries
    only the seed of the rotation.
    """

    scale: float
    negative: npt.NDArray[np.bool_]
    rotation_seed: int = 0
    rotated: bool = False

    def dense(self, d: int) -> np.ndarray:
        signed = np.where(self.negative, -self.scale, self.scale)
        if not self.rotated:
            return signed
        from threepc.common.hadamard import inverse_rotation  # shared-randomness transform

        return inverse_rotation(signed, self.rotation_seed, d)

    def bits(self) -> int:
        return SCALE_BITS + int(self.negative.size)

    def value_bits(self) -> int:
        return self.bits()


@dataclass(frozen=True, eq=False)
class SeededQuantizedVector:
    """A quantized block at seeded coordinates (PermK + CQ, Algorithm 3 of the CQ paper).

    The coordinates are PermK's block `block` of `blocks` drawn from `seed` (`perm_k_block`),
    and `quantized` holds one level per coordinate of that block, in increasing coordinate
    order. On the wire: the seed, block and blocks (like `SeededSparseVector`) and the
    quantized block (like `QuantizedVector`, whose count is the block's size).
    """

    rule: IndexRule
    seed: int
    block: int
    blocks: int
    quantized: QuantizedVector

    def indices(self, d: int) -> IndexArray:
        k = int(self.quantized.level_codes.size)
        return seeded_indices(self.rule, d, self.seed, k, self.block, self.blocks)

    def dense(self, d: int) -> np.ndarray:
        out = np.zeros(d)
        idx = self.indices(d)
        out[idx] = self.quantized.dense(int(idx.size))
        return out

    def bits(self) -> int:
        return self.quantized.bits()

    def value_bits(self) -> int:
        return self.bits()


@dataclass(frozen=True, eq=False)
class Chosen:
    """A payload preceded by a wrapper's choice (Bernoulli: x sent exactly, or compressed).

    The choice costs `flag_bits` on the wire (ALGORITHMS.md: "one flag + payload").
    """

    payload: DenseVector | SparseVector | SeededSparseVector | QuantizedVector | SignVector | SeededQuantizedVector
    flag_bits: int = 1

    def dense(self, d: int) -> np.ndarray:
        return self.payload.dense(d)

    def bits(self) -> int:
        return self.flag_bits + self.payload.bits()

    def value_bits(self) -> int:
        return self.payload.value_bits()


VectorPayload = (
    DenseVector
    | SparseVector
    | SeededSparseVector
    | QuantizedVector
    | SignVector
    | SeededQuantizedVector
    | Chosen
)


class Mode(enum.IntEnum):
    """How a message's parts relate to the coordinator's mirror of the worker's estimate."""

    DELTA = 0  # g_i^{t+1} = g_i^t + sum(parts); no parts is a skip
    REPLACE = 1  # g_i^{t+1} = sum(parts)


@dataclass(frozen=True, eq=False)
class Message:
    """A worker's round message: its new estimate relative to the coordinator's mirror.

    `flag_bits` is what the method spends to say which case it took (LAG's skip, EF21+'s
    choice): 0 for methods without a choice.
    """

    mode: Mode
    parts: tuple[VectorPayload, ...] = ()
    flag_bits: int = 0

    @property
    def is_skip(self) -> bool:
        return self.mode is Mode.DELTA and not self.parts

    def dense(self, d: int) -> np.ndarray:
        """sum(parts) as a float64 d-vector (a new array)."""
        if len(self.parts) == 1:
            return self.parts[0].dense(d)
        out = np.zeros(d)
        for part in self.parts:
            out += part.dense(d)
        return out

    def bits(self) -> int:
        """Payload bits the method sends: every part plus the choice flag (the papers' x-axis)."""
        return self.flag_bits + sum(part.bits() for part in self.parts)

    def value_bits(self) -> int:
        """The papers' convention: values only, indices and flags not counted."""
        return sum(part.value_bits() for part in self.parts)

    def apply(self, mirror: np.ndarray) -> np.ndarray:
        """g_i^t -> g_i^{t+1}, as the worker keeps it and the coordinator mirrors it (a new array
        of the mirror's dtype, the run's state dtype: sums in float64, rounded once into it).

        A one-part sparse DELTA adds its k values at their k coordinates and leaves the rest as
        they are: the coordinator's in-place path (engine.Aggregator.apply) does the very same.
        """
        if self.mode is Mode.REPLACE:
            if len(self.parts) == 1 and isinstance(self.parts[0], DenseVector):
                # Rounding the values into the mirror's dtype directly is what the float64 detour
                # gives, without two d-sized temporaries; same dtype: the values themselves
                # (states are replaced, never mutated).
                return self.parts[0].values.astype(mirror.dtype, copy=False)
            return self.dense(mirror.size).astype(mirror.dtype, copy=False)
        if not self.parts:
            return mirror
        indices = self.sparse_indices(mirror.size)
        if indices is not None:
            out = mirror.copy()
            out[indices] += np.asarray(self.parts[0].values, dtype=np.float64)  # type: ignore[union-attr]
            return out
        return (mirror + self.dense(mirror.size)).astype(mirror.dtype, copy=False)

    def support(self, d: int) -> IndexArray | None:
        """The coordinates the parts can change (union of sparse parts), None if any is dense."""
        pieces = []
        for part in self.parts:
            if isinstance(part, SparseVector):
                pieces.append(part.indices)
            elif isinstance(part, SeededSparseVector):
                pieces.append(part.indices(d))
            else:
                return None
        return union_sorted(pieces) if pieces else np.zeros(0, np.int64)

    def sparse_indices(self, d: int) -> IndexArray | None:
        """The coordinates of a one-part sparse DELTA message (TopK, RandK, PermK), else None."""
        if self.mode is not Mode.DELTA or len(self.parts) != 1:
            return None
        part = self.parts[0]
        if isinstance(part, SparseVector):
            return part.indices
        if isinstance(part, SeededSparseVector):
            return part.indices(d)
        return None


def skip(flag_bits: int = 1) -> Message:
    """The lazy-aggregation skip: the mirror stays, and the message costs its flag."""
    return Message(Mode.DELTA, (), flag_bits)


# ----------------------------------------------------------------------------- what a method sends


@dataclass(frozen=True)
class PartKind:
    """The kind of a message part: its payload class, and whether a wrapper's choice precedes it
    (`Chosen`, the Bernoulli wrapper's coin). A compressor declares the kinds it returns
    (`Compressor.emits`), and a mechanism the message forms it sends from them (`Form`)."""

    payload: type
    chosen: bool = False

    @classmethod
    def of(cls, part: VectorPayload) -> PartKind:
        if isinstance(part, Chosen):
            return cls(type(part.payload), True)
        return cls(type(part))

    def __str__(self) -> str:
        return f"Chosen[{self.payload.__name__}]" if self.chosen else self.payload.__name__


Kinds = frozenset[PartKind]
DENSE: Kinds = frozenset({PartKind(DenseVector)})


@dataclass(frozen=True)
class Form:
    """One shape of message a mechanism may send: its mode and, part by part, the kinds each
    part may be (EF21 with TopK: DELTA of one SparseVector; a lazy skip: DELTA of no parts)."""

    mode: Mode
    parts: tuple[Kinds, ...] = ()

    def then(self, kinds: Kinds) -> Form:
        """This form with one more part (a composition's correction, 3PCv3)."""
        return Form(self.mode, self.parts + (kinds,))

    def admits(self, mode: Mode, kinds: tuple[PartKind, ...]) -> bool:
        return (
            mode is self.mode
            and len(kinds) == len(self.parts)
            and all(kind in allowed for kind, allowed in zip(kinds, self.parts))
        )

    def __str__(self) -> str:
        parts = ", ".join("|".join(sorted(map(str, allowed))) for allowed in self.parts)
        return f"{self.mode.name}({parts})"


@dataclass(frozen=True)
class Expect:
    """What the coordinator takes from a worker in a round; the codec refuses anything else
    (`codec.message_from_proto`), so a hostile or broken message never reaches the aggregate.

    `forms`: the shapes the run's method may send now (its first message, or a later one);
    `value_dtype`: the dtype every value travels in (the run's wire.value_dtype);
    `bound`: the largest |value| the state dtype holds (mirrors are kept in wire.iterate_dtype,
    so a float64 value of 1e39 cannot be a float32 run's); `workers`: n, the most blocks a
    PermK payload may cut d into."""

    forms: frozenset[Form]
    value_dtype: str
    bound: float
    workers: int

    def admits(self, mode: Mode, kinds: tuple[PartKind, ...]) -> bool:
        return any(form.admits(mode, kinds) for form in self.forms)

    def describe(self) -> str:
        return " or ".join(sorted(map(str, self.forms)))
