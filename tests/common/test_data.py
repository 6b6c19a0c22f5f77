import numpy as np
import pytest

from tests.conftest import SHARED_DATA, requires_shared_data
from threepc.common import data
from threepc.common.errors import DataError


def test_shards_are_contiguous_and_cover_every_row() -> None:
    bounds = [data.shard_bounds(10, 3, i) for i in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]


def test_more_workers_than_rows_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="5 workers but only 4 data rows"):
        data.shard_bounds(4, 5, 0)


def test_synthetic_is_seeded() -> None:
    a, b = data.synthetic(50, 7, seed=3), data.synthetic(50, 7, seed=3)
    assert (a.features != b.features).nnz == 0 and np.array_equal(a.labels, b.labels)
    assert set(np.unique(a.labels)) == {-1.0, 1.0}


@requires_shared_data("a9a")
def test_a9a_loads_with_its_published_shape() -> None:
    ds = data.load("a9a", data_dir=str(SHARED_DATA))
    assert (ds.rows, ds.dim) == (32561, 123)
    assert set(np.unique(ds.labels)) == {-1.0, 1.0}


def test_missing_named_set_falls_back_with_a_warning(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "data_dirs", lambda data_dir=None: [tmp_path])
    with pytest.warns(data.DataFallbackWarning):
        ds = data.load("mushrooms")
    assert (ds.rows, ds.dim) == data.KNOWN_SHAPES["mushrooms"]


def test_unknown_file_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "data_dirs", lambda data_dir=None: [tmp_path])
    with pytest.raises(DataError, match="not found"):
        data.load("no-such-set")


def test_libsvm_labels_are_mapped(tmp_path) -> None:
    f = tmp_path / "tiny.svm"
    f.write_text("1 1:0.5 3:1\n2 2:1\n1 1:1\n")
    ds = data.read_libsvm(f)
    assert ds.labels.tolist() == [-1.0, 1.0, -1.0] and ds.dim == 3


def _same(a: data.Dataset, b: data.Dataset) -> bool:
    return (a.features != b.features).nnz == 0 and a.features.shape == b.features.shape and np.array_equal(a.labels, b.labels)


def test_a_parsed_file_is_cached_and_read_back_without_parsing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THREEPC_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "tiny.svm"
    f.write_text("1 1:0.5 3:1\n2 2:1\n1 1:1 4:2.5\n")
    parsed = data.read_libsvm(f, 5)
    assert len(list((tmp_path / "cache" / "data").glob("tiny.svm-*.npz"))) == 1
    import sklearn.datasets

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(sklearn.datasets, "load_svmlight_file", no_parsing)
    assert _same(data.read_libsvm(f, 5), parsed)
    with pytest.raises(AssertionError, match="parsed again"):  # another width: another key
        data.read_libsvm(f, 6)
    f.write_text("1 1:0.5 3:1\n2 2:1\n")  # the file changed: its size and mtime
    with pytest.raises(AssertionError, match="parsed again"):
        data.read_libsvm(f, 5)


def test_a_damaged_cache_is_parsed_again_and_an_empty_dir_turns_it_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THREEPC_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "tiny.svm"
    f.write_text("1 1:0.5 3:1\n2 2:1\n1 1:1\n")
    parsed = data.read_libsvm(f)
    (cache,) = (tmp_path / "cache" / "data").glob("tiny.svm-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    assert _same(data.read_libsvm(f), parsed)
    monkeypatch.setenv("THREEPC_CACHE_DIR", "")
    cache.unlink()
    assert _same(data.read_libsvm(f), parsed)
    assert not (tmp_path / "cache" / "data" / cache.name).exists()


def test_a_cached_set_loads_without_importing_scikit_learn(tmp_path) -> None:
    """What keeps a worker process ~90 MB smaller and ~1 s faster to start."""
    import os
    import subprocess
    import sys

    f = tmp_path / "tiny.svm"
    f.write_text("1 1:0.5 3:1\n2 2:1\n1 1:1\n")
    env = {**os.environ, "THREEPC_CACHE_DIR": str(tmp_path / "cache")}
    probe = (
        "import sys; from pathlib import Path; from threepc.common import data; "
        f"ds = data.read_libsvm(Path({str(f)!r})); print(ds.rows, 'sklearn' in sys.modules)"
    )
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["3", "True"]
    assert second.stdout.split() == ["3", "False"]
