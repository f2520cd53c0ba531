"""WebDataset tar members: our bytes read by tarfile, webdataset and HF datasets, and by dlpipe."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.webdataset.layout import TAR_END
from dlpipe.formats.webdataset.reader import read_samples
from dlpipe.formats.webdataset.writer import encode_samples

# (logical dtype, storage dtype): bool is stored as uint8, as columns.narrowest_dtype does.
DTYPES = [
    ("uint8", "uint8"),
    ("int16", "int16"),
    ("int32", "int32"),
    ("int64", "int64"),
    ("float32", "float32"),
    ("float64", "float64"),
    ("bool", "uint8"),
]


def make_column(rng, name, dtype, storage, shape, n, width):
    """A column batch plus the per-record values it should decode to (padding removed)."""
    inner = int(np.prod([d for d in shape if d is not None], dtype=np.int64))
    variable = bool(shape) and shape[0] is None
    cols = width * inner if variable else inner
    if dtype == "bool":
        data = rng.integers(0, 2, (n, cols)).astype(bool)
    elif np.dtype(dtype).kind == "f":
        data = rng.normal(size=(n, cols)).astype(dtype)
    else:  # values within the storage dtype, as the narrowest-dtype scan guarantees
        info = np.iinfo(storage)
        data = rng.integers(info.min, info.max, (n, cols), dtype=storage, endpoint=True).astype(
            dtype
        )
    if variable:
        steps = rng.integers(0, width + 1, n)
        if n:
            steps[0], steps[-1] = 0, width  # edge lengths: empty and full
        elems = steps * inner
        records = [data[i, : elems[i]].reshape(-1, *shape[1:]) for i in range(n)]
    else:
        elems = None
        records = [data[i].reshape(shape) for i in range(n)]
    enc = ColumnEncoding(name, dtype, tuple(shape), storage)
    return enc, ColumnBatch(data.astype(storage), elems), records


def deepcal(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = make_column(rng, "input_ids", "int64", "uint8", (None,), n, 40)
    lab = make_column(rng, "labels", "float32", "float32", (2,), n, 1)
    encs = {"input_ids": ids[0], "labels": lab[0]}
    batch = {"input_ids": ids[1], "labels": lab[1]}
    expected = {"input_ids": ids[2], "labels": lab[2]}
    return encs, batch, expected


def write_shard(path, buf, *, gz=False):
    data = buf.tobytes() + TAR_END
    path.write_bytes(gzip.compress(data, 6, mtime=0) if gz else data)
    return path


def check_read(encs, keys, expected, got_keys, cols):
    assert np.array_equal(got_keys, keys)
    for name, enc in encs.items():
        values, splits = cols[name]
        assert values.dtype == np.dtype(enc.dtype)
        assert splits.dtype == np.int64 and len(splits) == len(keys) + 1
        for i, want in enumerate(expected[name]):
            got = values[splits[i] : splits[i + 1]]
            assert np.array_equal(got, want.ravel())


@pytest.fixture
def shards(tmp_path):
    encs, batch, expected = deepcal(60)
    keys = np.arange(1000, 1060, dtype=np.int64)
    buf, offsets = encode_samples(batch, encs, keys)
    raw = write_shard(tmp_path / "a.tar", buf)
    gz = write_shard(tmp_path / "b.tar.gz", buf, gz=True)
    return {
        "encs": encs,
        "keys": keys,
        "expected": expected,
        "buf": buf,
        "offsets": offsets,
        "paths": [raw, gz],
    }


def test_tarfile_reads_members_and_fields(shards):
    for path in shards["paths"]:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert len(members) == 2 * len(shards["keys"])
            for j, m in enumerate(members):
                key = shards["keys"][j // 2]
                col = ["input_ids", "labels"][j % 2]
                assert m.name == f"{key:010d}.{col}.npy"
                assert (m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname) == (0o644, 0, 0, 0, "", "")
                assert m.isreg()
                arr = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
                assert np.array_equal(arr, shards["expected"][col][j // 2])
    offsets = shards["offsets"]
    assert offsets[0] == 0 and offsets[-1] == len(shards["buf"]) and (offsets % 512 == 0).all()


def test_encoding_is_deterministic(shards):
    encs, batch, _ = deepcal(60)
    again, offsets = encode_samples(batch, encs, shards["keys"])
    assert np.array_equal(again, shards["buf"]) and np.array_equal(offsets, shards["offsets"])


# webdataset leaves its shard file to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_webdataset_reads_equal_values(shards):
    wds = pytest.importorskip("webdataset")
    for path in shards["paths"]:
        samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
        assert [s["__key__"] for s in samples] == [f"{k:010d}" for k in shards["keys"]]
        for i, s in enumerate(samples):
            for col, records in shards["expected"].items():
                got = s[f"{col}.npy"]
                assert got.dtype == np.dtype(shards["encs"][col].storage_dtype)
                assert got.shape == records[i].shape and np.array_equal(got, records[i])


def test_hf_datasets_reads_equal_values(shards, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    ds = datasets.load_dataset(
        "webdataset",
        data_files={"train": [str(p) for p in shards["paths"]]},
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    keys = [f"{k:010d}" for k in shards["keys"]]
    assert ds["__key__"] == keys + keys  # the same samples in the raw and the gzip shard
    for i, row in enumerate(ds):
        for col, records in shards["expected"].items():
            want = records[i % len(keys)]
            assert np.array_equal(np.asarray(row[f"{col}.npy"]).reshape(want.shape), want)


def test_read_samples_roundtrip(shards, tmp_path):
    encs, keys, expected = shards["encs"], shards["keys"], shards["expected"]
    with gzip.open(shards["paths"][1]) as f:
        unzipped = np.frombuffer(f.read(), np.uint8)
    mapped = np.memmap(shards["paths"][0], np.uint8, mode="r")
    for buf in (shards["buf"], unzipped, mapped, np.asarray(unzipped.tobytes())):
        check_read(encs, keys, expected, *read_samples(buf, encs))
        check_read(encs, keys, expected, *read_samples(buf, encs, sample_offsets=shards["offsets"]))


def test_empty_and_single_sample():
    encs, batch, expected = deepcal(1)
    buf, offsets = encode_samples(batch, encs, np.array([7]))
    check_read(encs, [7], expected, *read_samples(buf, encs))
    empty = {
        k: ColumnBatch(v.data[:0], None if v.elems is None else v.elems[:0])
        for k, v in batch.items()
    }
    buf, offsets = encode_samples(empty, encs, np.zeros(0, np.int64))
    assert len(buf) == 0 and offsets.tolist() == [0]
    keys, cols = read_samples(np.frombuffer(TAR_END, np.uint8), encs)
    assert len(keys) == 0 and all(len(v) == 0 and s.tolist() == [0] for v, s in cols.values())


def test_long_keys_and_multidim_columns():
    rng = np.random.default_rng(3)
    a = make_column(rng, "xy", "int16", "int16", (None, 3), 5, 4)
    b = make_column(rng, "m", "float64", "float64", (2, 2), 5, 1)
    encs, batch = {"xy": a[0], "m": b[0]}, {"xy": a[1], "m": b[1]}
    keys = np.array([0, 9_999_999_999, 10_000_000_000, 2**63 - 1, 5], np.int64)
    buf, offsets = encode_samples(batch, encs, keys)
    with tarfile.open(fileobj=io.BytesIO(buf.tobytes() + TAR_END)) as tar:
        assert tar.getnames()[2 * 3] == f"{2**63 - 1}.m.npy"
    check_read(
        encs, keys, {"xy": a[2], "m": b[2]}, *read_samples(buf, encs, sample_offsets=offsets)
    )


column_specs = st.lists(
    st.tuples(
        st.sampled_from(DTYPES),
        st.sampled_from([(None,), (None, 2), (), (3,), (2, 2)]),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=30, deadline=None)
@given(
    specs=column_specs,
    n=st.integers(0, 12),
    width=st.integers(0, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_roundtrip(specs, n, width, seed):
    rng = np.random.default_rng(seed)
    encs, batch, expected = {}, {}, {}
    for j, ((dtype, storage), shape) in enumerate(specs):
        name = f"c{j}"
        encs[name], batch[name], expected[name] = make_column(
            rng, name, dtype, storage, shape, n, width
        )
    keys = rng.permutation(10 * n + 1)[:n].astype(np.int64)
    buf, offsets = encode_samples(batch, encs, keys)
    assert len(offsets) == n + 1 and offsets[-1] == len(buf)
    check_read(encs, keys, expected, *read_samples(buf, encs))
    check_read(encs, keys, expected, *read_samples(buf, encs, sample_offsets=offsets))
    with tarfile.open(fileobj=io.BytesIO(buf.tobytes() + TAR_END)) as tar:
        assert len(tar.getmembers()) == n * len(specs)


def test_corrupt_checksum_names_member_offset(shards):
    buf = shards["buf"].copy()
    second = 512 * 2  # the first sample's input_ids member is one data block long
    assert bytes(buf[second : second + 10]) == b"0000001000"
    buf[second + 3] ^= 1
    for offsets in (None, shards["offsets"]):
        with pytest.raises(FormatError, match="checksum") as e:
            read_samples(buf, shards["encs"], path="x.tar", sample_offsets=offsets)
        assert (
            e.value.offset == second
            and e.value.path == "x.tar"
            and "x.tar at byte 1024" in str(e.value)
        )


def test_corrupt_size_field_blames_the_member(shards):
    buf = shards["buf"].copy()
    at = int(shards["offsets"][5])
    buf[at + 133] = ord("7")  # still octal: the walk goes astray, the checksum names the culprit
    with pytest.raises(FormatError) as e:
        read_samples(buf, shards["encs"])
    assert e.value.offset == at


@pytest.mark.parametrize("cut", [100, 600, 1500])
def test_truncated_stream(shards, cut):
    offsets = shards["offsets"]
    end = int(offsets[-1])
    buf = shards["buf"][: end - cut]
    with pytest.raises(FormatError, match="truncated") as e:
        read_samples(buf, shards["encs"], path="t.tar")
    assert e.value.offset is not None and e.value.offset <= end - cut
    assert e.value.offset >= int(offsets[-2]) - 1024  # a member of the last sample or two
    with pytest.raises((FormatError, ConfigError)):
        read_samples(buf, shards["encs"], sample_offsets=offsets)


def test_truncated_at_member_start_is_a_missing_column(shards):
    buf = shards["buf"][: int(shards["offsets"][-1]) - 1024]  # the last labels member is gone
    with pytest.raises(FormatError, match="lacks or repeats") as e:
        read_samples(buf, shards["encs"])
    assert e.value.offset == int(shards["offsets"][-2])


def test_wrong_encoding_is_reported(shards):
    encs = dict(shards["encs"])
    encs["labels"] = ColumnEncoding("labels", "float32", (3,), "float32")
    with pytest.raises(FormatError, match="labels"):
        read_samples(shards["buf"], encs)


def test_bad_arguments():
    encs, batch, _ = deepcal(3)
    with pytest.raises(ConfigError, match="non-negative"):
        encode_samples(batch, encs, np.array([0, -1, 2]))
    batch["input_ids"].elems[1] = 41
    with pytest.raises(ConfigError, match="elems"):
        encode_samples(batch, encs, np.arange(3))
    with pytest.raises(ConfigError, match="too long"):
        name = "x" * 90
        enc = ColumnEncoding(name, "int32", (), "int32")
        encode_samples(
            {name: ColumnBatch(np.zeros((1, 1), np.int32), None)}, {name: enc}, np.arange(1)
        )
