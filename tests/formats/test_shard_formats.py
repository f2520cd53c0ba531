"""Every shard format object keeps the ``ShardFormat`` contract: names and compressions, and
records written by ``encode_batch`` come back from ``decode`` (whole or in runs, as the index
cuts them) and from ``verify`` unchanged."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.formats import FORMATS, ShardFormat, get_format
from dlpipe.formats.index import index_lines, parse_index

ALL = sorted(FORMATS)


def test_get_format_is_the_registry():
    assert ALL == ["tfrecord", "webdataset"]
    for name in ALL:
        fmt = get_format(name)
        assert isinstance(fmt, ShardFormat) and fmt.name == name and fmt is FORMATS[name]
        assert pickle.loads(pickle.dumps(fmt)) == fmt  # readers travel to loader workers
    with pytest.raises(ConfigError, match="use one of tfrecord, webdataset"):
        get_format("parquet")


@pytest.mark.parametrize("name", ALL)
def test_names_and_compressions(name):
    fmt = get_format(name)
    assert None in fmt.compressions and fmt.auto_compression in fmt.compressions
    assert fmt.resolve_compression("auto") == fmt.auto_compression
    assert fmt.resolve_compression("none") is None
    assert fmt.resolve_compression("gzip") == "gzip"
    suffixes = {fmt.suffix(c) for c in fmt.compressions}
    assert len(suffixes) == len(fmt.compressions) and all(s.startswith(fmt.extension) for s in suffixes)
    for c in fmt.compressions:
        fmt.check_compression(c)
    with pytest.raises(ConfigError, match=f"not valid for {name}"):
        fmt.check_compression("brotli")
    with pytest.raises(ConfigError):
        fmt.suffix("brotli")


def test_names_and_compressions_as_the_manifest_and_cli_know_them():
    assert tuple(FORMATS) == ("tfrecord", "webdataset")
    assert {n: f.compressions for n, f in FORMATS.items()} == {
        "tfrecord": (None, "gzip", "zlib"), "webdataset": (None, "gzip")}
    assert get_format("webdataset").resolve_compression("auto") == "gzip"
    assert get_format("tfrecord").resolve_compression("auto") is None
    assert get_format("tfrecord").suffix("zlib") == ".tfrecord.zz"
    assert get_format("webdataset").suffix("gzip") == ".tar.gz"
    assert get_format("tfrecord").trailer == b"" and get_format("webdataset").trailer == bytes(1024)
    with pytest.raises(ConfigError, match="format='csv'; use one of"):
        get_format("csv")
    with pytest.raises(ConfigError, match="not valid for webdataset"):
        get_format("webdataset").check_compression("zlib")


@st.composite
def batches(draw):
    """A batch of 1..12 records: a variable int column (shape [None, k]), a fixed float column."""
    n = draw(st.integers(1, 12))
    inner = draw(st.sampled_from([1, 3]))
    width = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    steps = rng.integers(0, width + 1, n)
    ids = rng.integers(0, 70_000, (n, width * inner)).astype(np.uint32)
    labels = rng.standard_normal((n, 2)).astype(np.float32)
    int_enc = draw(st.sampled_from(["raw", "int64_list"]))
    float_enc = draw(st.sampled_from(["raw", "float_list"]))
    encodings = {
        "ids": ColumnEncoding("ids", "int64", (None, inner) if inner > 1 else (None,), "uint32", int_enc),
        "label": ColumnEncoding("label", "float32", (2,), "float32", float_enc),
    }
    batch = {"ids": ColumnBatch(ids, steps * inner), "label": ColumnBatch(labels, None)}
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True))) if n > 1 else []
    return batch, encodings, steps, cuts


def _expected(batch):
    ids = batch["ids"]
    values = np.concatenate([row[:k] for row, k in zip(ids.data, ids.elems)]).astype(np.int64)
    splits = np.concatenate([[0], np.cumsum(ids.elems)])
    labels = batch["label"].data
    return {"ids": (values, splits), "label": (labels.ravel(), np.arange(len(labels) + 1) * 2)}


def _same(got, want):
    assert set(got) == set(want)
    for name, (values, splits) in want.items():
        assert got[name][0].dtype == values.dtype, name
        assert np.array_equal(got[name][0], values), name
        assert np.array_equal(got[name][1], splits), name


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(case=batches())
def test_encode_then_decode_round_trips(name, case):
    fmt = get_format(name)
    batch, encodings, steps, cuts = case
    n = len(steps)
    buf, offsets = fmt.encode_batch(batch, encodings, np.arange(100, 100 + n))
    assert offsets[0] == 0 and offsets[-1] == len(buf) and len(offsets) == n + 1
    # the index records each record's span; a reader finds the records through it
    table = parse_index(index_lines(offsets).encode(), "x.index")
    offsets = np.append(table[:, 0], table[-1, 0] + table[-1, 1])
    want = _expected(batch)
    _same(fmt.decode(buf, [offsets], encodings, path="x", check_crc=fmt.record_crcs), want)
    bounds = [0, *cuts, n]  # runs as a shuffle's blocks cut them: decoded one after another
    runs = [offsets[a : b + 1] for a, b in zip(bounds[:-1], bounds[1:])]
    _same(fmt.decode(buf, runs, encodings, path="x", check_crc=True), want)

    whole = np.concatenate([buf, np.frombuffer(fmt.trailer, np.uint8)])
    tokens, found = fmt.verify(whole, encodings, path="x")
    assert tokens.tolist() == steps.tolist()
    assert found is None or np.array_equal(found, offsets)

    if fmt.supports_serialized:
        starts, ends = fmt.payloads(buf, offsets, path="x", check_crc=True)
        _same(fmt.decode_serialized(buf, starts, ends, encodings, path="x", frames=starts), want)
    else:
        with pytest.raises(ConfigError, match="serialized"):
            fmt.payloads(buf, offsets, path="x")
        with pytest.raises(ConfigError, match="serialized"):
            fmt.decode_serialized(buf, offsets[:-1], offsets[1:], encodings, path="x", frames=offsets)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_column_subset_reads_from_every_format(tmp_path, name):
    """Selecting some columns reads them alone, equal to the source, whatever the shard layout
    (a WebDataset sample holds one member per stored column, the walk must still find them)."""
    import dlpipe

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=40)
    ids = np.where(np.arange(8)[None, :] < lengths[:, None], rng.integers(1, 50, size=(40, 8)), 0)
    labels = rng.normal(size=(40, 2)).astype(np.float32)
    np.save(tmp_path / "input_ids.npy", ids.astype(np.int32))
    np.save(tmp_path / "labels.npy", labels)
    dlpipe.reshard([str(tmp_path / "input_ids.npy"), str(tmp_path / "labels.npy")], tmp_path / "out",
                   pad_id=0, num_shards=2, workers=1, progress=False, format=name)
    for wanted in (["labels"], ["input_ids"]):
        rows = list(dlpipe.load_dataset(str(tmp_path / "out"), columns=wanted))
        assert [sorted(r) for r in rows] == [wanted] * 40
        if wanted == ["labels"]:
            np.testing.assert_array_equal(np.stack([r["labels"] for r in rows]), labels)
        else:
            for r, ln, row in zip(rows, lengths, ids):
                np.testing.assert_array_equal(r["input_ids"], row[:ln])
