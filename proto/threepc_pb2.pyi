from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    FLOAT64: _ClassVar[Dtype]
    FLOAT32: _ClassVar[Dtype]
    FLOAT16: _ClassVar[Dtype]
    BFLOAT16: _ClassVar[Dtype]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELTA: _ClassVar[Mode]
    REPLACE: _ClassVar[Mode]
DTYPE_UNSPECIFIED: Dtype
FLOAT64: Dtype
FLOAT32: Dtype
FLOAT16: Dtype
BFLOAT16: Dtype
DELTA: Mode
REPLACE: Mode

class WorkerMessage(_message.Message):
    __slots__ = ("join", "ready", "update", "diagnostics", "chunk", "resync", "diverged")
    JOIN_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_FIELD_NUMBER: _ClassVar[int]
    join: Join
    ready: Ready
    update: Update
    diagnostics: Diagnostics
    chunk: Chunk
    resync: Resync
    diverged: Diverged
    def __init__(self, join: _Optional[_Union[Join, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., update: _Optional[_Union[Update, _Mapping]] = ..., diagnostics: _Optional[_Union[Diagnostics, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., resync: _Optional[_Union[Resync, _Mapping]] = ..., diverged: _Optional[_Union[Diverged, _Mapping]] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "round", "done", "chunk", "restore")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    round: Round
    done: Done
    chunk: Chunk
    restore: Restore
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., round: _Optional[_Union[Round, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., restore: _Optional[_Union[Restore, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "last", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    last: bool
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., last: _Optional[bool] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("requested_id", "token", "version")
    REQUESTED_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    requested_id: int
    token: str
    version: str
    def __init__(self, requested_id: _Optional[int] = ..., token: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker_id", "n_workers", "config_json", "start_round", "restore")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    N_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    START_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    n_workers: int
    config_json: str
    start_round: int
    restore: Restore
    def __init__(self, worker_id: _Optional[int] = ..., n_workers: _Optional[int] = ..., config_json: _Optional[str] = ..., start_round: _Optional[int] = ..., restore: _Optional[_Union[Restore, _Mapping]] = ...) -> None: ...

class Restore(_message.Message):
    __slots__ = ("round", "has_state", "mirror_dtype", "mirror", "x_prev_dtype", "x_prev")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    MIRROR_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    X_PREV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    X_PREV_FIELD_NUMBER: _ClassVar[int]
    round: int
    has_state: bool
    mirror_dtype: Dtype
    mirror: bytes
    x_prev_dtype: Dtype
    x_prev: bytes
    def __init__(self, round: _Optional[int] = ..., has_state: _Optional[bool] = ..., mirror_dtype: _Optional[_Union[Dtype, str]] = ..., mirror: _Optional[bytes] = ..., x_prev_dtype: _Optional[_Union[Dtype, str]] = ..., x_prev: _Optional[bytes] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("rows", "dimension", "shard_hash", "data_source", "synthetic")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    rows: int
    dimension: int
    shard_hash: bytes
    data_source: str
    synthetic: bool
    def __init__(self, rows: _Optional[int] = ..., dimension: _Optional[int] = ..., shard_hash: _Optional[bytes] = ..., data_source: _Optional[str] = ..., synthetic: _Optional[bool] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round", "dtype", "iterate", "delta", "change_count", "change_coding", "change_indices", "change_values", "aggregate_sum", "digest", "aggregate_zero")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ITERATE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CHANGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHANGE_CODING_FIELD_NUMBER: _ClassVar[int]
    CHANGE_INDICES_FIELD_NUMBER: _ClassVar[int]
    CHANGE_VALUES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_SUM_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_ZERO_FIELD_NUMBER: _ClassVar[int]
    round: int
    dtype: Dtype
    iterate: bytes
    delta: bool
    change_count: int
    change_coding: int
    change_indices: bytes
    change_values: bytes
    aggregate_sum: bytes
    digest: bytes
    aggregate_zero: bool
    def __init__(self, round: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., iterate: _Optional[bytes] = ..., delta: _Optional[bool] = ..., change_count: _Optional[int] = ..., change_coding: _Optional[int] = ..., change_indices: _Optional[bytes] = ..., change_values: _Optional[bytes] = ..., aggregate_sum: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., aggregate_zero: _Optional[bool] = ...) -> None: ...

class Diverged(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Resync(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("rounds", "reason")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    reason: str
    def __init__(self, rounds: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("round", "worker_id", "mode", "parts", "flag_bits")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    FLAG_BITS_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: int
    mode: Mode
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    flag_bits: int
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ..., flag_bits: _Optional[int] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("dense", "sparse", "seeded", "quantized", "sign", "seeded_quantized", "choice_bits")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    SEEDED_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    SEEDED_QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    CHOICE_BITS_FIELD_NUMBER: _ClassVar[int]
    dense: DenseVector
    sparse: SparseVector
    seeded: SeededSparseVector
    quantized: QuantizedVector
    sign: SignVector
    seeded_quantized: SeededQuantizedVector
    choice_bits: int
    def __init__(self, dense: _Optional[_Union[DenseVector, _Mapping]] = ..., sparse: _Optional[_Union[SparseVector, _Mapping]] = ..., seeded: _Optional[_Union[SeededSparseVector, _Mapping]] = ..., quantized: _Optional[_Union[QuantizedVector, _Mapping]] = ..., sign: _Optional[_Union[SignVector, _Mapping]] = ..., seeded_quantized: _Optional[_Union[SeededQuantizedVector, _Mapping]] = ..., choice_bits: _Optional[int] = ...) -> None: ...

class DenseVector(_message.Message):
    __slots__ = ("dtype", "values")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    values: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., values: _Optional[bytes] = ...) -> None: ...

class SparseVector(_message.Message):
    __slots__ = ("count", "index_coding", "indices", "dtype", "values")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_CODING_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    count: int
    index_coding: int
    indices: bytes
    dtype: Dtype
    values: bytes
    def __init__(self, count: _Optional[int] = ..., index_coding: _Optional[int] = ..., indices: _Optional[bytes] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., values: _Optional[bytes] = ...) -> None: ...

class SeededSparseVector(_message.Message):
    __slots__ = ("rule", "seed", "count", "block", "blocks", "dtype", "values")
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rule: int
    seed: int
    count: int
    block: int
    blocks: int
    dtype: Dtype
    values: bytes
    def __init__(self, rule: _Optional[int] = ..., seed: _Optional[int] = ..., count: _Optional[int] = ..., block: _Optional[int] = ..., blocks: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., values: _Optional[bytes] = ...) -> None: ...

class QuantizedVector(_message.Message):
    __slots__ = ("grid", "levels", "scale", "offset", "signed", "signs", "level_bits", "level_codes", "seed")
    GRID_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_BITS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_CODES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    grid: int
    levels: int
    scale: float
    offset: float
    signed: bool
    signs: bytes
    level_bits: int
    level_codes: bytes
    seed: int
    def __init__(self, grid: _Optional[int] = ..., levels: _Optional[int] = ..., scale: _Optional[float] = ..., offset: _Optional[float] = ..., signed: _Optional[bool] = ..., signs: _Optional[bytes] = ..., level_bits: _Optional[int] = ..., level_codes: _Optional[bytes] = ..., seed: _Optional[int] = ...) -> None: ...

class SeededQuantizedVector(_message.Message):
    __slots__ = ("rule", "seed", "block", "blocks", "quantized")
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    rule: int
    seed: int
    block: int
    blocks: int
    quantized: QuantizedVector
    def __init__(self, rule: _Optional[int] = ..., seed: _Optional[int] = ..., block: _Optional[int] = ..., blocks: _Optional[int] = ..., quantized: _Optional[_Union[QuantizedVector, _Mapping]] = ...) -> None: ...

class SignVector(_message.Message):
    __slots__ = ("scale", "signs", "rotation_seed", "rotated")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    ROTATED_FIELD_NUMBER: _ClassVar[int]
    scale: float
    signs: bytes
    rotation_seed: int
    rotated: bool
    def __init__(self, scale: _Optional[float] = ..., signs: _Optional[bytes] = ..., rotation_seed: _Optional[int] = ..., rotated: _Optional[bool] = ...) -> None: ...

class Diagnostics(_message.Message):
    __slots__ = ("round", "worker_id", "loss", "dtype", "gradient")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: int
    loss: float
    dtype: Dtype
    gradient: bytes
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[int] = ..., loss: _Optional[float] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., gradient: _Optional[bytes] = ...) -> None: ...
