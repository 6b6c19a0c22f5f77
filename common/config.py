"""A run's config: a TOML file that maps one-to-one onto frozen pydantic models.

Every field has a default that runs. Unknown fields and wrong types are refused with the field's
path (`ConfigError("config: compressor.k: ...")`). A component (method, compressor, problem) is a
name plus its parameters, written as a string (`compressor = "top_k"`) or a table
(`[compressor] name = "top_k"  k = 5`); its parameters are checked by the component's factory.

    workers = 20
    rounds = 2000
    method = "ef21"
    [compressor]
    name = "top_k"
    k = 1
    [data]
    dataset = "a9a"
"""

from __future__ import annotations

import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from threepc.common.errors import ConfigError

ValueDtype = Literal["float64", "float32", "float16", "bfloat16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Component(BaseModel):
    """A named component and its parameters (checked later by the component's factory)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Frozen):
    """Which data the workers train on and how it is split."""

    dataset: str = Field(
        "a9a",
        description="LibSVM file path, a name in the data dirs, 'synthetic', or a set scikit-learn ships ('breast_cancer')",
    )
    data_dir: str | None = Field(None, description="extra folder to look for named data sets in")
    split: Literal["contiguous", "label_sorted"] = "contiguous"
    rows: int | None = Field(None, ge=1, description="rows of the synthetic set")
    dim: int | None = Field(None, ge=1, description="features (width to load, or synthetic d)")
    seed: int = Field(0, description="seed of the synthetic set")
    fallback: Literal["error", "synthetic"] = Field(
        "error",
        description="where `dataset` names a file that is not found: 'error' (say where it was looked "
        "for), or 'synthetic': a seeded synthetic stand-in of its shape, for demos; the summary, the "
        "progress line and the dashboard then say 'synthetic stand-in'. Only `threepc run` uses it: "
        "`serve` and `worker` never train on a stand-in",
    )


class WireConfig(_Frozen):
    """How vectors travel."""

    value_dtype: ValueDtype = Field("float32", description="dtype of values in compressed messages")
    iterate_dtype: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the iterate and of the coordinator's state"
    )
    max_message_bytes: int | None = Field(
        None,
        ge=1 << 16,
        description="the largest message a worker may send (bytes); default: 64 MiB, or more where a "
        "worker's float64 gradient (8 d bytes) needs it",
    )
    downlink: Literal["auto", "dense", "delta"] = Field(
        "auto",
        description="broadcast x (dense) or the aggregate's change (delta: exact, fewer bytes for "
        "sparse methods); auto: delta where the compressor is sparse",
    )
    chunk_bytes: int | None = Field(
        None,
        ge=1 << 10,
        description="messages larger than this travel in chunks; default: 4 MiB (gRPC copies a "
        "broadcast into every stream, so larger frames cost the coordinator n copies in flight)",
    )
    read_ahead: int | None = Field(
        None,
        ge=1,
        description="updates the coordinator reads past the one it applies next (the others wait "
        "at their workers): fewer hold less memory in transit; default: all n while n dense updates "
        "fit in 64 MiB, else as many as fit there, from 1 to 4",
    )


class RunConfig(_Frozen):
    """Everything that defines a run (the seed included), so that two runs of it are equal."""

    workers: int = Field(4, ge=1, description="number of workers n")
    rounds: int = Field(300, ge=0, description="rounds after round 0")
    seed: int = Field(0, ge=0, description="seed of every random choice, and of x^0 unless x0_seed is given")
    method: Component = Component(name="ef21")
    compressor: Component = Component(name="top_k", k=1)  # type: ignore[call-arg]
    problem: Component = Component(name="logreg_nonconvex", lam=0.1)  # type: ignore[call-arg]
    gradient: Component = Field(
        Component(name="full"), description="full, sgd (batch, sampling) or lsvrg (batch, p, sampling)"
    )
    data: DataConfig = DataConfig()
    wire: WireConfig = WireConfig()
    stepsize: float | Literal["theory"] = Field("theory", description="gamma, or the theory's")
    stepsize_multiplier: float = Field(1.0, gt=0, description="scales gamma, as the papers' sweeps")
    x0: str = Field(
        "normal", description="'normal' (N(0, I) from x0_seed), 'zeros', 'problem' (its own start), or a .npy path"
    )
    x0_seed: int | None = Field(
        None,
        ge=0,
        strict=True,  # x0_seed = "7" or 2.0 is refused, not read as 7 or 2
        description="seed of x^0 alone ('normal', 'problem'): fixed, a sweep over `seed` keeps x^0, as the "
        "papers do; default: `seed`",
    )
    init: Literal["full", "compressed"] = Field("full", description="g_i^0 = grad f_i(x^0) or C of it")
    diagnostics_every: int = Field(
        1, ge=0, description="rounds between loss/||grad f||^2 figures, and the last round; 0: none (benchmarks)"
    )
    round_timeout_s: float = Field(120.0, gt=0, description="how long a round waits for updates")
    absent_policy: Literal["wait", "drop"] = Field(
        "wait",
        description="methods that need every worker (EF, MARINA): wait for a missing one, or drop it and rescale",
    )
    checkpoint_every: int = Field(0, ge=0, description="rounds between coordinator checkpoints (0: only on SIGTERM)")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if isinstance(self.stepsize, float) and not self.stepsize > 0:
            raise ValueError("stepsize must be > 0 or 'theory'")
        return self

    def diagnostic_round(self, t: int) -> bool:
        """Whether round t's workers send their figures: every `diagnostics_every` rounds, and
        the last round, so that a run's final row (and summary) has them; never where it is 0."""
        every = self.diagnostics_every
        return every > 0 and (t % every == 0 or t == self.rounds - 1)


def _format(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{source}: {where}: {what}{more}"


def parse(data: dict[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from parsed TOML/JSON, or a one-line ConfigError naming the field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config file; `overrides` (top-level fields) win over the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 (a file saved as Latin-1 or UTF-16, or not text)
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse({**data, **(overrides or {})}, str(path))


def to_json(config: RunConfig) -> str:
    return config.model_dump_json()


def from_json(text: str) -> RunConfig:
    import json

    return parse(json.loads(text), "coordinator's config")


_PLAIN = (bool, int, float, str)


def check_types(factory: Callable[..., Any], params: Mapping[str, Any], what: str) -> None:
    """Refuse a component parameter whose value is not of the plain type (bool, int, float,
    str, or a union of them) the factory's signature gives it: `k = 2.5` or `lam = "x"` would
    otherwise fail deep inside numpy, as a traceback. Parameters of other types are left to
    the factory."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError, AttributeError):  # an annotation that does not resolve here: the factory checks
        return
    for key, value in params.items():
        hint = hints.get(key)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        if not allowed or not all(t in _PLAIN or t is type(None) for t in allowed):
            continue
        # An int is a float (k = 1 where 1.0 is meant); a bool is only a bool.
        ok = any(
            (type(value) is bool) == (t is bool) and isinstance(value, (int, float) if t is float else t)
            for t in allowed if t is not type(None)
        ) or (value is None and type(None) in allowed)
        if not ok:
            names = " or ".join(
                "an integer" if t is int else "a number" if t is float else t.__name__
                for t in allowed if t is not type(None)
            )
            raise ConfigError(f"{what}: {key} must be {names}, got {value!r}")
