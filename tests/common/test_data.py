import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_DATA, requires_shared_data
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


def test_a_missing_named_set_is_an_error_naming_each_place_looked_in_once(tmp_path, monkeypatch) -> None:
    """No stand-in unless asked for: training on made-up data was the only sign a worker had lost
    its data volume (issue 19, item 1)."""
    monkeypatch.setenv("THREEPC_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data set 'phishing' not found; looked for ") as caught:
        data.load("phishing", data_dir=str(tmp_path))  # a set of known shape, not in shared/data
    looked = str(caught.value).split("looked for ", 1)[1].split(", ")
    assert looked[:3] == [str(tmp_path / "phishing"), str(tmp_path / "phishing.bz2"),
                          str(tmp_path.parent / "shared" / "data" / "phishing")]
    assert len(looked) == len(set(looked))  # data_dir, THREEPC_DATA_DIR and the cwd: one folder, named once


def test_data_dirs_name_each_folder_once(tmp_path, monkeypatch) -> None:
    """The working directory's ../shared/data is the project's own when run from the project."""
    monkeypatch.chdir(ROOT)  # cwd.parent is the project's parent
    monkeypatch.setenv("THREEPC_DATA_DIR", str(tmp_path))
    dirs = data.data_dirs(str(tmp_path) + "/")
    assert len(dirs) == len({d.resolve() for d in dirs}) and dirs[0] == tmp_path


def test_a_stand_in_only_where_asked_for_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "data_dirs", lambda data_dir=None: [tmp_path])
    with pytest.warns(data.DataFallbackWarning, match="mushrooms"):
        ds = data.load("mushrooms", fallback="synthetic")
    assert (ds.rows, ds.dim) == data.KNOWN_SHAPES["mushrooms"]
    assert ds.stand_in and ds.synthetic and ds.source.startswith("synthetic(")
    shard = data.shard(ds, 4, 1)
    assert shard.stand_in and shard.synthetic and shard.fallback == "synthetic"
    with pytest.raises(DataError, match="needs its shape: give data.rows and data.dim"):
        data.load("no-such-set", fallback="synthetic")
    real = data.load("synthetic", rows=30, dim=4)
    assert real.synthetic and not real.stand_in


def test_the_fingerprint_is_of_the_rows_whatever_the_dtypes(tmp_path, monkeypatch) -> None:
    f = tmp_path / "tiny.svm"
    f.write_text("1 1:0.5 3:1\n2 2:1\n1 1:1 4:2.5\n2 3:1\n")
    monkeypatch.setenv("THREEPC_CACHE_DIR", str(tmp_path / "cache"))
    parsed, cached = data.read_libsvm(f), data.read_libsvm(f)
    assert data.fingerprint(parsed) == data.fingerprint(cached) and len(data.fingerprint(parsed)) == 8
    wide = data.Dataset(parsed.features.astype(np.float32).tocsr(), parsed.labels, "x", "y")
    wide.features.indices = wide.features.indices.astype(np.int64)
    assert data.fingerprint(wide) == data.fingerprint(parsed)
    shards = [data.fingerprint(data.shard(parsed, 2, i)) for i in range(2)]
    assert shards[0] != shards[1]
    flipped = data.Dataset(parsed.features, -parsed.labels, "x", "y")
    assert data.fingerprint(flipped) != data.fingerprint(parsed)


@pytest.mark.parametrize(
    "text, words",
    [
        ("1 1:0.5 2:nan\n2 1:1\n", "row 1: a feature value is nan, not a finite number"),
        ("1 1:0.5\n2 1:1 2:-inf\n", "row 2: a feature value is -inf, not a finite number"),
        ("1 1:1\n2 2:1\nnan 1:1\n", "row 3: the label nan is not a finite number"),
        ("1 1:0.5\n2 99999999999:1\n", "a feature index is too large"),
    ],
    ids=["nan", "inf", "nan-label", "huge-index"],
)
def test_a_file_with_values_that_cannot_be_trained_on_is_refused(tmp_path, monkeypatch, text, words) -> None:
    monkeypatch.setenv("THREEPC_CACHE_DIR", "")
    f = tmp_path / "bad.svm"
    f.write_text(text)
    with pytest.raises(DataError, match=f"{f}: {words}"):
        data.read_libsvm(f)


def test_sizes_past_this_machines_memory_are_refused_before_allocating() -> None:
    with pytest.raises(DataError, match=r"synthetic data of 10000000 rows x 10000000 features \(data.rows, data.dim\) needs"):
        data.synthetic(10**7, 10**7)
    with pytest.raises(DataError, match="more than this machine's memory"):
        data.check_fits(1 << 62, "it")


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


def test_the_plan_says_stand_in_and_its_workers_fall_back_only_where_it_did(tmp_path, monkeypatch) -> None:
    """A local run's workers get the plan's resolved config: they take the same stand-in where
    the coordinator took one, and error where it found the file."""
    from threepc.common import config as config_mod
    from threepc.common import engine

    monkeypatch.chdir(tmp_path)
    wanted = {"workers": 2, "rounds": 1, "data": {"dataset": str(tmp_path / "a9a"), "fallback": "synthetic"}}
    with pytest.warns(data.DataFallbackWarning):
        stood_in = engine.plan(config_mod.parse(wanted))
    assert stood_in.stand_in and stood_in.synthetic and stood_in.dataset.startswith("synthetic(rows=32561")
    assert stood_in.resolved.data.fallback == "synthetic" and stood_in.config.data.fallback == "synthetic"
    with pytest.warns(data.DataFallbackWarning):
        full = engine.load_data(stood_in.resolved)
    assert [data.fingerprint(engine.load_shard(stood_in.resolved, i, full)) for i in range(2)] == list(stood_in.shard_hashes)
    with pytest.raises(DataError, match="a coordinator never uses a stand-in"):
        engine.plan(config_mod.parse(wanted), stand_in_allowed=False)

    (tmp_path / "a9a").write_text("".join(f"{1 + i % 2} {1 + i % 7}:1\n" for i in range(10)))
    found = engine.plan(config_mod.parse(wanted))
    assert not found.stand_in and not found.synthetic and found.dataset == str(tmp_path / "a9a")
    assert found.resolved.data.fallback == "error"  # a worker without the file errors, never stands in
    (tmp_path / "a9a").unlink()
    with pytest.raises(DataError, match="not found"):
        engine.load_data(found.resolved)


def test_breast_cancer_is_scikit_learns_copy_with_labels_minus_one_plus_one() -> None:
    """The papers' breast cancer set by name, from the scikit-learn package (no file, no download)."""
    from sklearn.datasets import load_breast_cancer

    ds = data.load("breast_cancer", data_dir="/nonexistent")
    assert (ds.rows, ds.dim) == (569, 30) == data.KNOWN_SHAPES["breast_cancer"]
    assert set(np.unique(ds.labels)) == {-1.0, 1.0}
    shipped = load_breast_cancer()
    assert np.array_equal(ds.features.toarray(), shipped.data)
    assert np.array_equal(ds.labels, np.where(shipped.target == 1, 1.0, -1.0))  # benign +1
    assert ds.source.startswith("sklearn.datasets.load_breast_cancer (scikit-learn ")
    assert not ds.synthetic and not ds.stand_in
    assert data.load("breast_cancer", dim=40).dim == 40  # padded, as a LibSVM file read wider
    with pytest.raises(DataError, match="^breast_cancer has 30 features; data.dim = 10 is narrower$"):
        data.load("breast_cancer", dim=10)
