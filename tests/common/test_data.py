import numpy as np
import pytest

from threepc.common import data
from threepc.common.errors import DataError
from tests.conftest import SHARED_DATA, requires_shared_data


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
