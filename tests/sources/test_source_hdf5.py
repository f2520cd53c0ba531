"""HDF5Source: every dataset or a named selection, several files, and errors that name the file."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.hdf5 import HDF5Source, column_name

h5py = pytest.importorskip("h5py")

DTYPES = ["<i4", ">i4", "uint8", "<f8", ">f4", "float16", "int64", "bool"]
NAMES = ["input_ids", "labels", "g/mask", "g/sub/w"]


@settings(max_examples=30, deadline=None)
@given(
    cols=st.lists(
        st.tuples(
            st.sampled_from(NAMES), st.sampled_from(DTYPES), st.sampled_from([(), (3,), (2, 4)])
        ),
        min_size=1,
        max_size=4,
        unique_by=lambda c: c[0],
    ),
    counts=st.lists(st.integers(0, 25), min_size=1, max_size=3),
    chunked=st.booleans(),
    explicit=st.booleans(),
    data=st.data(),
)
def test_read_and_take_match_written(cols, counts, chunked, explicit, data):
    n = sum(counts)
    rng = np.random.default_rng(n)
    expected = {name: rng.integers(0, 100, size=(n, *shape)).astype(dt) for name, dt, shape in cols}
    with tempfile.TemporaryDirectory() as tmp:
        specs, pos = [], 0
        for i, c in enumerate(counts):
            path = str(Path(tmp) / f"part{i}.h5")
            with h5py.File(path, "w") as f:
                for name, dt, shape in cols:
                    chunks = (max(1, min(c, 4)), *shape) if chunked and c else None
                    f.create_dataset(
                        name, data=expected[name][pos : pos + c], dtype=dt, chunks=chunks
                    )
                f["scalar_attribute_like"] = 7  # 0-d: not a column
            specs.append(f"{path}:{','.join(name for name, _, _ in cols)}" if explicit else path)
            pos += c
        src = pickle.loads(pickle.dumps(HDF5Source(specs)))
        assert src.num_records == n
        assert set(src.columns) == {column_name(name) for name in expected}
        start = data.draw(st.integers(0, n))
        stop = data.draw(st.integers(start, n))
        got = src.read(start, stop)
        idx = np.array(data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=10 if n else 0)))
        taken = src.take(idx)
        for name, want in expected.items():
            col = src.columns[column_name(name)]
            assert col.dtype.isnative and col.shape == want.shape[1:]
            assert got[col.name].dtype == col.dtype
            np.testing.assert_array_equal(got[col.name], want[start:stop])
            np.testing.assert_array_equal(taken[col.name], want[idx.astype(np.int64)])


def _file(path: Path, **arrays: np.ndarray) -> str:
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f[name] = a
    return str(path)


def test_pickle_round_trip_after_read(tmp_path):
    path = _file(tmp_path / "a.h5", x=np.arange(12).reshape(6, 2))
    src = HDF5Source([path])
    src.read(0, 1)  # opens the file, which must not travel
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read(4, 6)["x"], [[8, 9], [10, 11]])
    assert clone.fingerprint() == src.fingerprint()
    src.close()


def test_explicit_selection_and_names(tmp_path):
    path = _file(
        tmp_path / "a.h5", **{"x": np.zeros((5, 2)), "grp/y": np.arange(5), "meta": np.arange(3)}
    )
    src = HDF5Source([f"{path}:grp/y"])
    assert list(src.columns) == ["grp_y"]
    assert src.describe().endswith("a.h5:grp/y")
    np.testing.assert_array_equal(src.read(1, 3)["grp_y"], [1, 2])


def test_disagreeing_datasets_listed_with_suggestion(tmp_path):
    path = _file(tmp_path / "a.h5", x=np.zeros((5, 2)), y=np.zeros(5), meta=np.arange(3))
    with pytest.raises(FormatError) as info:
        HDF5Source([path])
    msg = str(info.value)
    assert path in msg and "/meta (3,)" in msg and f"{path}:x,y" in msg


def test_missing_dataset_name(tmp_path):
    path = _file(tmp_path / "a.h5", x=np.zeros(5))
    with pytest.raises(FormatError) as info:
        HDF5Source([f"{path}:x,nope"])
    assert (
        info.value.path == path and "'nope'" in str(info.value) and "datasets: x" in str(info.value)
    )


def test_group_is_not_a_dataset(tmp_path):
    path = _file(tmp_path / "a.h5", **{"g/x": np.zeros(5)})
    with pytest.raises(FormatError, match="group"):
        HDF5Source([f"{path}:g"])


def test_string_dataset_rejected_when_named(tmp_path):
    path = _file(tmp_path / "a.h5", x=np.zeros(2), s=np.array([b"a", b"b"]))
    assert list(HDF5Source([path]).columns) == ["x"]  # skipped when taking every dataset
    with pytest.raises(FormatError, match="'s'"):
        HDF5Source([f"{path}:s"])


def test_files_with_different_columns(tmp_path):
    a = _file(tmp_path / "a.h5", x=np.zeros((2, 3), np.int32))
    b = _file(tmp_path / "b.h5", x=np.zeros((2, 4), np.int32))
    with pytest.raises(FormatError, match="b.h5"):
        HDF5Source([a, b])


def test_missing_file_and_not_hdf5(tmp_path):
    with pytest.raises(FormatError, match="nope.h5"):
        HDF5Source([str(tmp_path / "nope.h5:x")])
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(FormatError, match="bad.h5"):
        HDF5Source([str(tmp_path / "bad.h5")])


def test_colliding_column_names(tmp_path):
    path = _file(tmp_path / "a.h5", **{"a/b": np.zeros(2), "a_b": np.zeros(2)})
    with pytest.raises(ConfigError, match="a_b"):
        HDF5Source([path])
