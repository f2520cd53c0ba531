"""ArrowSource: HF save_to_disk directories, Parquet and Arrow IPC files, ragged data errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.arrow import ArrowSource

datasets = pytest.importorskip("datasets")

DTYPES = ["int8", "int16", "int32", "int64", "uint16", "float16", "float32", "float64", "bool"]


def _arrow_column(values: np.ndarray, fixed: bool) -> pa.Array:
    """(n, *shape) numpy -> nested list (or fixed_size_list) Arrow array, built without Python rows."""
    arr = pa.array(values.reshape(-1))
    for d in reversed(values.shape[1:]):
        if fixed:
            arr = pa.FixedSizeListArray.from_arrays(arr, d)
        else:
            offsets = pa.array(np.arange(0, len(arr) + 1, d, dtype=np.int32))
            arr = pa.ListArray.from_arrays(offsets, arr)
    return arr


def _write(fmt: str, path: Path, table: pa.Table, chunk: int) -> None:
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=chunk)
    else:
        opener = pa.ipc.new_stream if fmt == "stream" else pa.ipc.new_file
        with opener(str(path), table.schema) as w:
            for b in table.to_batches(max_chunksize=chunk):
                w.write_batch(b)


@settings(max_examples=30, deadline=None)
@given(
    cols=st.lists(
        st.tuples(
            st.sampled_from(DTYPES), st.sampled_from([(), (1,), (5,), (2, 3)]), st.booleans()
        ),
        min_size=1,
        max_size=3,
    ),
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=3),
    fmt=st.sampled_from(["parquet", "stream", "file"]),
    chunk=st.integers(1, 8),
    data=st.data(),
)
def test_read_and_take_match_written(cols, counts, fmt, chunk, data):
    n = sum(counts)
    rng = np.random.default_rng(n)
    expected = {
        f"c{i}": rng.integers(0, 100, size=(n, *shape)).astype(dt)
        for i, (dt, shape, _) in enumerate(cols)
    }
    fixed = {f"c{i}": f for i, (_, _, f) in enumerate(cols)}
    with tempfile.TemporaryDirectory() as tmp:
        paths, pos = [], 0
        for i, c in enumerate(counts):
            table = pa.table(
                {k: _arrow_column(v[pos : pos + c], fixed[k]) for k, v in expected.items()}
            )
            p = Path(tmp) / f"part{i}.{'parquet' if fmt == 'parquet' else 'arrow'}"
            _write(fmt, p, table, chunk)
            paths.append(str(p))
            pos += c
        src = ArrowSource(paths)
        for r in src._readers:  # tiny batches exercise the Parquet cursor across boundaries
            r.batch_rows = chunk
        assert src.num_records == n
        if n:
            for name, want in expected.items():
                assert src.columns[name].shape == want.shape[1:]
                assert src.columns[name].dtype == want.dtype
        for _ in range(3):
            start = data.draw(st.integers(0, n))
            stop = data.draw(st.integers(start, n))
            got = src.read(start, stop)
            for name, want in expected.items():
                assert got[name].dtype == want.dtype
                assert got[name].shape == (stop - start, *src.columns[name].shape)
                if n:  # with no rows a variable list length cannot be known (it reads as 0)
                    np.testing.assert_array_equal(got[name], want[start:stop])
        idx = np.array(data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=10 if n else 0)))
        taken = pickle.loads(pickle.dumps(src)).take(idx)
        for name, want in expected.items():
            assert taken[name].shape == (len(idx), *src.columns[name].shape)
            if n:
                np.testing.assert_array_equal(taken[name], want[idx.astype(np.int64)])


def test_sequential_parquet_reads_resume(tmp_path):
    values = np.arange(1000 * 4, dtype=np.int32).reshape(1000, 4)
    pq.write_table(
        pa.table({"x": _arrow_column(values, False)}), tmp_path / "a.parquet", row_group_size=100
    )
    src = ArrowSource([tmp_path / "a.parquet"])
    src._readers[0].batch_rows = 33
    got = np.concatenate([src.read(s, min(s + 70, 1000))["x"] for s in range(0, 1000, 70)])
    np.testing.assert_array_equal(got, values)


def _tokenized(n: int, max_length: int) -> dict[str, list]:
    """What a tokenizer with padding="max_length" returns: equal-length lists."""
    rng = np.random.default_rng(0)
    ids, mask = [], []
    for _ in range(n):
        k = int(rng.integers(1, max_length + 1))
        ids.append(list(rng.integers(1, 1000, k)) + [0] * (max_length - k))
        mask.append([1] * k + [0] * (max_length - k))
    return {"input_ids": ids, "attention_mask": mask, "label": list(range(n))}


def test_hf_save_to_disk_tokenized(tmp_path):
    cols = _tokenized(50, 16)
    ds = datasets.Dataset.from_dict({**cols, "text": [f"row {i}" for i in range(50)]})
    ds = ds.map(lambda b: {"input_ids": b["input_ids"]}, batched=True, batch_size=7)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert len(json.loads((tmp_path / "ds" / "state.json").read_text())["_data_files"]) == 3
    src = ArrowSource([str(tmp_path / "ds")], columns=["input_ids", "attention_mask", "label"])
    assert src.num_records == 50
    assert src.columns["input_ids"].shape == (16,) and src.columns["label"].shape == ()
    got = src.read(0, 50)
    np.testing.assert_array_equal(got["input_ids"], np.array(cols["input_ids"]))
    np.testing.assert_array_equal(got["attention_mask"], np.array(cols["attention_mask"]))
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(src)).read(17, 40)["label"], np.arange(17, 40)
    )
    assert src.num_bytes > 0


def test_hf_fixed_length_features(tmp_path):
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32"), length=4),
            "m": datasets.Sequence(
                datasets.Sequence(datasets.Value("float32"), length=2), length=3
            ),
        }
    )
    ids = np.arange(40, dtype=np.int32).reshape(10, 4)
    m = np.arange(60, dtype=np.float32).reshape(10, 3, 2)
    datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "m": m.tolist()}, features=features
    ).save_to_disk(str(tmp_path / "ds"))
    src = ArrowSource([tmp_path / "ds"])
    assert src.columns["m"].shape == (3, 2) and src.columns["input_ids"].dtype == np.int32
    got = src.take(np.array([9, 0, 4]))
    np.testing.assert_array_equal(got["m"], m[[9, 0, 4]])
    np.testing.assert_array_equal(got["input_ids"], ids[[9, 0, 4]])


def test_hf_dataset_dict_asks_for_a_split(tmp_path):
    ds = datasets.Dataset.from_dict({"x": [1, 2]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match="split") as info:
        ArrowSource([tmp_path / "dd"])
    assert str(tmp_path / "dd" / "train") in str(info.value) or "train" in str(info.value)


def test_string_column_is_named_with_usable_columns(tmp_path):
    datasets.Dataset.from_dict({"x": [[1, 2]], "text": ["hi"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(FormatError) as info:
        ArrowSource([tmp_path / "ds"])
    msg = str(info.value)
    assert "'text'" in msg and "data-00000-of-00001.arrow" in msg and "columns=['x']" in msg
    assert ArrowSource([tmp_path / "ds"], columns=["x"]).read(0, 1)["x"].tolist() == [[1, 2]]


def test_unknown_column_selection(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match="'nope'"):
        ArrowSource([tmp_path / "a.parquet"], columns=["nope"])


def test_ragged_column_found_on_open(tmp_path):
    pq.write_table(pa.table({"x": [[1, 2], [3, 4], [5], [6, 7]]}), tmp_path / "r.parquet")
    with pytest.raises(FormatError) as info:
        ArrowSource([tmp_path / "r.parquet"])
    err = info.value
    assert err.path == str(tmp_path / "r.parquet") and err.record == 2
    assert "'x'" in str(err) and "row 2" in str(err) and "pad" in str(err)


def test_ragged_row_past_the_first_rows_found_on_read(tmp_path):
    rows = [[i, i] for i in range(3000)]
    rows[2500] = [1, 2, 3]
    _write("stream", tmp_path / "r.arrow", pa.table({"x": rows}), 1000)
    src = ArrowSource([tmp_path / "r.arrow"])
    src.read(0, 2000)
    with pytest.raises(FormatError, match="row 2500") as info:
        src.read(2400, 2600)
    assert info.value.path == str(tmp_path / "r.arrow")


def test_ragged_inner_list(tmp_path):
    rows = [[[1, 2], [3, 4]], [[5, 6], [7]]]
    pq.write_table(pa.table({"m": rows}), tmp_path / "m.parquet")
    with pytest.raises(FormatError, match="row 1"):
        ArrowSource([tmp_path / "m.parquet"])


def test_nulls_are_named(tmp_path):
    pq.write_table(pa.table({"y": pa.array([1, None, 3])}), tmp_path / "n.parquet")
    with pytest.raises(FormatError, match="row 1 holds a null"):
        ArrowSource([tmp_path / "n.parquet"])


def test_directory_of_parquet_files_and_2d_lists(tmp_path):
    m = np.arange(2 * 12, dtype=np.float64).reshape(4, 3, 2)
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"m": _arrow_column(m[:3], False)}), d / "0.parquet", row_group_size=2)
    pq.write_table(pa.table({"m": _arrow_column(m[3:], False)}), d / "1.parquet")
    src = ArrowSource([d])
    assert src.columns["m"].shape == (3, 2)
    np.testing.assert_array_equal(src.read(1, 4)["m"], m[1:4])


def test_mismatched_files(tmp_path):
    pq.write_table(pa.table({"x": pa.array([1], pa.int32())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([1], pa.int64())}), tmp_path / "b.parquet")
    with pytest.raises(FormatError, match="b.parquet"):
        ArrowSource([tmp_path / "a.parquet", tmp_path / "b.parquet"])


def test_not_an_arrow_file(tmp_path):
    (tmp_path / "x.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(FormatError, match="x.arrow"):
        ArrowSource([tmp_path / "x.arrow"])


def test_empty_directory(tmp_path):
    with pytest.raises(FormatError, match="no .parquet or .arrow"):
        ArrowSource([tmp_path])


def test_module_does_not_import_datasets():
    code = "import sys, dlpipe.sources.arrow; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
