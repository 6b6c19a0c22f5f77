"""Data sets: LibSVM files, synthetic sets, and the split across workers.

A data set is found by path, by name among the sets scikit-learn ships (`SKLEARN_SETS`:
"breast_cancer"), or by name in the data directories (the config's `data_dir`, then
`$THREEPC_DATA_DIR`, then `shared/data` beside the project). LibSVM files are read with
scikit-learn's `load_svmlight_file` (bz2 included) and cached parsed. Labels are mapped smallest -> -1, largest -> +1
(ALGORITHMS.md section 6). A named data set that is not found is an error naming every place
looked in, unless the caller asks for a stand-in by name (`fallback="synthetic"`, the config's
`data.fallback`): then a seeded synthetic set of the same shape, marked `stand_in`, with a warning.
Values that are not finite, and widths or sizes that would not fit in memory, are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
import xxhash

from threepc.common.errors import DataError

# Shapes of the LibSVM sets the papers use (rows, features), for loading with the right width
# and for a synthetic stand-in of the same shape when the file is absent.
KNOWN_SHAPES: dict[str, tuple[int, int]] = {
    "a9a": (32561, 123),
    "a9a.t": (16281, 123),
    "w8a": (49749, 300),
    "w8a.t": (14951, 300),
    "mushrooms": (8124, 112),
    "phishing": (11055, 68),
    "australian": (690, 14),
    "australian_scale": (690, 14),
    "german.numer": (1000, 24),
    "german.numer_scale": (1000, 24),
    "splice": (1000, 60),
    "madelon": (2000, 500),
    "ijcnn1": (49990, 22),
    "breast_cancer": (569, 30),  # scikit-learn's copy (SKLEARN_SETS), never a file
}

# Sets the papers use that scikit-learn ships inside its package (no download): name -> the
# loader in sklearn.datasets. Found by name before any file, like "synthetic".
SKLEARN_SETS: dict[str, str] = {
    "breast_cancer": "load_breast_cancer",  # Wisconsin diagnostic (WDBC): 0 malignant, 1 benign
}

SYNTHETIC = "synthetic"
Fallback = Literal["error", "synthetic"]  # what to do where a named data set is not found


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features A (rows x d, CSR) and labels y in {-1, +1}."""

    features: sp.csr_matrix
    labels: np.ndarray
    name: str
    source: str  # the file read, or "synthetic(...)"
    synthetic: bool = False  # seeded synthetic data, not read from a file
    stand_in: bool = False  # ... standing in for a named set that was not found (fallback)
    # The run's rule for missing data, kept with its data: a problem that reads files of its
    # own (the autoencoder's MNIST images) follows the same rule.
    fallback: Fallback = "error"

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def data_dirs(data_dir: str | None = None) -> list[Path]:
    """Where named data sets are looked for, in order, each folder once (the working directory's
    sibling shared/ is often the project's own)."""
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get("THREEPC_DATA_DIR"):
        dirs.append(Path(os.environ["THREEPC_DATA_DIR"]).expanduser())
    project = Path(__file__).resolve().parent.parent
    dirs += [Path.cwd().parent / "shared" / "data", project.parent / "shared" / "data"]
    return _once(dirs)


def _once(paths: list[Path]) -> list[Path]:
    """`paths` absolute, without repeats (equal once resolved), in order."""
    seen: set[Path] = set()
    kept = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path.absolute())
    return kept


def _candidates(name: str, data_dir: str | None) -> list[Path]:
    """The files `find_file` tries, in order: the path as given, then `name` and `name.bz2` in
    each data directory."""
    found = [Path(name).expanduser()]
    for folder in data_dirs(data_dir):
        found += [folder / name, folder / f"{name}.bz2"]
    return _once(found)


def find_file(name: str, data_dir: str | None = None) -> Path | None:
    """A path as given, or `name`, `name.bz2` in a data directory; None if nowhere."""
    for candidate in _candidates(name, data_dir):
        if candidate.is_file():
            return candidate
    return None


def not_found(what: str, name: str, data_dir: str | None = None) -> str:
    """'<what> not found: looked for ...', every place `find_file` tried, each once."""
    return f"{what} not found; looked for {', '.join(map(str, _candidates(name, data_dir)))}"


def synthetic(rows: int, dim: int, seed: int = 0, density: float = 0.1, name: str = SYNTHETIC) -> Dataset:
    """A seeded logistic-regression set: sparse binary features, labels from a planted model.

    The same (rows, dim, seed) gives the same set on every machine.
    """
    if rows < 1 or dim < 1:
        raise DataError(f"synthetic data needs rows >= 1 and dim >= 1, got {rows} x {dim}")
    # The nonzeros' values and column indices (12 bytes each), and sp.random's draw of them.
    check_fits(int(2 * 12 * density * rows * dim), f"synthetic data of {rows} rows x {dim} features (data.rows, data.dim)")
    rng = np.random.default_rng([seed, rows, dim])
    # Only the nonzeros are drawn (a dense rows x dim draw costs gigabytes at d = 1e6).
    features = sp.random(rows, dim, density=density, format="csr", random_state=rng, data_rvs=np.ones)
    planted = rng.normal(0.0, 1.0, dim)
    margin = features @ planted + rng.normal(0.0, 1.0, rows)
    labels = np.where(margin > np.median(margin), 1.0, -1.0)
    source = f"synthetic(rows={rows}, dim={dim}, seed={seed})"
    return Dataset(features, labels, name, source, synthetic=True)


def load(
    name: str,
    *,
    data_dir: str | None = None,
    dim: int | None = None,
    rows: int | None = None,
    seed: int = 0,
    fallback: Fallback = "error",
) -> Dataset:
    """Load a data set by name or path (see the module docstring for the search).

    Not found: a DataError naming every place looked in; with `fallback="synthetic"`, a seeded
    synthetic stand-in of the set's shape (a known set's, or `rows` x `dim`), marked `stand_in`.
    """
    if name == SYNTHETIC:
        return dataclasses.replace(synthetic(rows or 1000, dim or 20, seed), fallback=fallback)
    if name in SKLEARN_SETS:
        return dataclasses.replace(from_sklearn(name, dim), fallback=fallback)
    path = find_file(name, data_dir)
    base = Path(name).name.removesuffix(".bz2")
    if path is None:
        missing = not_found(f"data set {name!r}", name, data_dir)
        if fallback != SYNTHETIC:
            raise DataError(missing)
        known_rows, known_dim = KNOWN_SHAPES.get(base, (rows, dim))
        if known_rows is None or known_dim is None:
            raise DataError(f"{missing}; a synthetic stand-in needs its shape: give data.rows and data.dim")
        warnings.warn(
            f"{missing}; using a synthetic stand-in of its shape ({known_rows} x {dim or known_dim}), "
            f"as data.fallback = 'synthetic' asks",
            DataFallbackWarning,
            stacklevel=2,
        )
        stand_in = synthetic(known_rows, dim or known_dim, seed, name=f"{base} (synthetic stand-in)")
        return dataclasses.replace(stand_in, stand_in=True, fallback=fallback)
    return dataclasses.replace(read_libsvm(path, dim or KNOWN_SHAPES.get(base, (0, None))[1]), fallback=fallback)


def from_sklearn(name: str, dim: int | None = None) -> Dataset:
    """A set scikit-learn ships (SKLEARN_SETS), as its loader returns it (features unscaled),
    labels mapped smallest -> -1, largest -> +1 as the LibSVM sets' (breast_cancer: malignant
    -1, benign +1); `dim` wider than the set pads zero columns, as for a LibSVM file."""
    import sklearn
    from sklearn import datasets

    loader = SKLEARN_SETS[name]
    bunch = getattr(datasets, loader)()
    raw = np.asarray(bunch.target)
    classes = np.unique(raw)
    if classes.size != 2:  # the sets listed are binary; a new entry that is not is a bug here
        raise DataError(f"{name}: expected two label values, found {classes.size}")
    features = sp.csr_matrix(np.asarray(bunch.data, dtype=np.float64))
    width = int(features.shape[1])
    if dim is not None and dim != width:
        if dim < width:
            raise DataError(f"{name} has {width} features; data.dim = {dim} is narrower")
        features = sp.csr_matrix((features.data, features.indices, features.indptr), shape=(features.shape[0], dim))
    labels = np.where(raw == classes[1], 1.0, -1.0)
    return Dataset(features, labels, name, f"sklearn.datasets.{loader} (scikit-learn {sklearn.__version__})")


def read_libsvm(path: Path, n_features: int | None = None) -> Dataset:
    """Read a LibSVM file (plain or .bz2) with scikit-learn; labels mapped to {-1, +1}.

    The parsed arrays are cached (`cache_dir()`), keyed by the file's path, size, mtime and the
    width asked for: the workers of a local cluster, and every later run, load them without
    parsing and without importing scikit-learn (~90 MB of RSS and ~1 s per process).
    """
    name = path.name.removesuffix(".bz2")
    cache = _cache_file(path, n_features)
    if cache is not None and cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return Dataset(cached[0], cached[1], name, str(path))
    from sklearn.datasets import load_svmlight_file

    try:
        features, raw = load_svmlight_file(str(path), n_features=n_features)
    except OverflowError:  # an index past the parser's int32: d could not be held anyway
        raise DataError(f"{path}: a feature index is too large (over 2^31 - 1): d would not fit in memory") from None
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read LibSVM file {path}: {err}") from err
    _check_finite(path, features, raw)
    width = "the width asked for: data.dim" if n_features else "its largest feature index"
    check_fits(8 * int(features.shape[1]), f"{path}: d = {features.shape[1]} ({width})")
    classes = np.unique(raw)
    if classes.size != 2:
        raise DataError(f"{path}: expected two label values, found {classes.size}")
    labels = np.where(raw == classes[1], 1.0, -1.0)
    features = sp.csr_matrix(features, dtype=np.float64)
    if cache is not None:
        _write_cache(cache, features, labels)
    return Dataset(features, labels, name, str(path))


def _check_finite(path: Path, features: sp.csr_matrix, labels: np.ndarray) -> None:
    """Refuse a NaN or an infinity: it would only surface rounds later, as a diverged run."""
    bad_labels = np.flatnonzero(~np.isfinite(labels))
    if bad_labels.size:
        row = int(bad_labels[0])
        raise DataError(f"{path}: row {row + 1}: the label {labels[row]} is not a finite number")
    bad = np.flatnonzero(~np.isfinite(features.data))
    if bad.size:
        row = int(np.searchsorted(features.indptr, bad[0], side="right")) - 1
        raise DataError(f"{path}: row {row + 1}: a feature value is {features.data[bad[0]]}, not a finite number")


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: int, what: str) -> None:
    """Refuse, before allocating, something that needs more bytes than this machine's memory
    (a DataError: a process that asks for it is killed, or thrashes, instead of saying why)."""
    total = memory_bytes()
    if total is not None and needed > total:
        raise DataError(f"{what} needs {needed / 1e9:.3g} GB, more than this machine's memory ({total / 1e9:.3g} GB)")


def fingerprint(data: Dataset) -> bytes:
    """XXH3-64 (8 bytes) of a data set's features (CSR data, indices, indptr, shape) and labels,
    in a fixed layout (float64, int64, little-endian, sorted column indices): equal wherever the
    same rows were loaded, whatever the dtypes scipy picked there."""
    features = data.features if data.features.has_sorted_indices else data.features.sorted_indices()
    h = xxhash.xxh3_64()
    for array, dtype in (
        (np.array(features.shape), "<i8"), (features.indptr, "<i8"), (features.indices, "<i8"),
        (features.data, "<f8"), (data.labels, "<f8"),
    ):
        h.update(np.ascontiguousarray(array, dtype=dtype))
    return h.digest()


def cache_dir() -> Path:
    """Where parsed data sets are cached: $THREEPC_CACHE_DIR, else $XDG_CACHE_HOME/threepc,
    else ~/.cache/threepc. THREEPC_CACHE_DIR="" turns the cache off."""
    if "THREEPC_CACHE_DIR" in os.environ:
        return Path(os.environ["THREEPC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "threepc"


def _cache_file(path: Path, n_features: int | None) -> Path | None:
    if os.environ.get("THREEPC_CACHE_DIR") == "":
        return None
    try:
        stat = path.resolve().stat()
    except OSError:
        return None
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{n_features}"
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    return cache_dir() / "data" / f"{path.name.removesuffix('.bz2')}-{digest}.npz"


def _write_cache(cache: Path, features: sp.csr_matrix, labels: np.ndarray) -> None:
    """Best effort and atomic: a cache that cannot be written is only a slower next start."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f, data=features.data, indices=features.indices, indptr=features.indptr,
                shape=np.array(features.shape, np.int64), labels=labels,
            )
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_cache(cache: Path) -> tuple[sp.csr_matrix, np.ndarray] | None:
    """The cached arrays, or None (then the file is parsed again) if they do not hold together."""
    try:
        with open(cache, "rb") as f, np.load(f, allow_pickle=False) as saved:
            shape = tuple(int(v) for v in saved["shape"])
            features = sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=shape)
            labels = saved["labels"]
        features.check_format(full_check=False)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if labels.shape != (shape[0],) or not np.isin(labels, (-1.0, 1.0)).all():
        return None
    if not np.isfinite(features.data).all():  # written before values were checked: read the file again
        return None
    return features, labels


def shard_bounds(rows: int, n_workers: int, worker_id: int) -> tuple[int, int]:
    """Contiguous shard of worker i: rows // n each, the remainder to the last worker."""
    if n_workers > rows:
        raise DataError(f"{n_workers} workers but only {rows} data rows: each worker needs at least one")
    if not 0 <= worker_id < n_workers:
        raise DataError(f"worker id {worker_id} outside [0, {n_workers})")
    size = rows // n_workers
    start = worker_id * size
    stop = rows if worker_id == n_workers - 1 else start + size
    return start, stop


def shard(data: Dataset, n_workers: int, worker_id: int, split: str = "contiguous") -> Dataset:
    """The part of `data` worker `worker_id` holds: contiguous, or contiguous after sorting by label."""
    start, stop = shard_bounds(data.rows, n_workers, worker_id)
    if split == "contiguous":
        rows = np.arange(start, stop)
    elif split == "label_sorted":
        rows = np.argsort(data.labels, kind="stable")[start:stop]
    else:
        raise DataError(f"unknown split {split!r}; expected 'contiguous' or 'label_sorted'")
    return dataclasses.replace(data, features=data.features[rows], labels=data.labels[rows])


class DataFallbackWarning(UserWarning):
    """A named data set was not found and a synthetic stand-in is used instead."""
