"""RawSource: layout parsing, memory-mapped reads across files, and errors that name the file."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.raw import RawSource, parse_layout

DTYPES = ["<i4", ">i4", "uint16", "int8", "<f8", ">f4", "float16", "bool", "int64", ">u8"]


def _write(
    path: Path, record: np.dtype, fields: dict[str, np.ndarray], header: bytes = b""
) -> None:
    n = len(next(iter(fields.values())))
    rec = np.zeros(n, dtype=record)
    for name, values in fields.items():
        rec[name] = values
    path.write_bytes(header + rec.tobytes())


def _layout_text(spec: list[tuple[str, str, tuple[int, ...]]]) -> str:
    parts = []
    for name, dt, shape in spec:
        dims = f"[{','.join(map(str, shape))}]" if shape else ""
        parts.append(f"{name}:{dt}{dims}")
    return ",".join(parts)


shapes = st.sampled_from([(), (1,), (3,), (2, 3), (4, 4)])


@settings(max_examples=30, deadline=None)
@given(
    spec=st.lists(st.tuples(st.sampled_from(DTYPES), shapes), min_size=1, max_size=3),
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=3),
    header=st.integers(0, 9),
    data=st.data(),
)
def test_read_and_take_match_written(spec, counts, header, data):
    fields = [(f"f{i}", dt, shape) for i, (dt, shape) in enumerate(spec)]
    layout = _layout_text(fields)
    parsed = parse_layout(layout)
    record = np.dtype([(n, d, s) for n, d, s in parsed])
    rng = np.random.default_rng(sum(counts) + header)
    expected = {
        n: rng.integers(0, 100, size=(sum(counts), *s)).astype(np.dtype(d).newbyteorder("="))
        for n, d, s in parsed
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths, pos = [], 0
        for i, c in enumerate(counts):
            p = Path(tmp) / f"part{i}.bin"
            _write(p, record, {n: a[pos : pos + c] for n, a in expected.items()}, b"H" * header)
            paths.append(str(p))
            pos += c
        src = RawSource(paths, layout=layout, header_bytes=header)
        assert src.num_records == sum(counts)
        assert src.record_bytes == record.itemsize
        for n, _, s in parsed:
            assert src.columns[n].shape == s
            assert src.columns[n].dtype.isnative
        n = src.num_records
        start = data.draw(st.integers(0, n))
        stop = data.draw(st.integers(start, n))
        got = src.read(start, stop)
        idx = np.array(data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=10 if n else 0)))
        taken = pickle.loads(pickle.dumps(src)).take(idx)
        for name, want in expected.items():
            assert got[name].dtype == src.columns[name].dtype
            np.testing.assert_array_equal(got[name], want[start:stop])
            assert taken[name].shape == (len(idx), *src.columns[name].shape)
            np.testing.assert_array_equal(taken[name], want[idx.astype(np.int64)])


def test_token_stream_uint16(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    (tmp_path / "train.bin").write_bytes(tokens.tobytes())
    src = RawSource([tmp_path / "train.bin"], layout="uint16")
    assert dict(src.columns)["input_ids"].shape == ()
    np.testing.assert_array_equal(src.read(10, 20)["input_ids"], tokens[10:20])


def test_header_and_big_endian(tmp_path):
    values = np.arange(24, dtype=">f8").reshape(3, 2, 4)
    ids = np.array([7, 8, 9], dtype="<i8")
    rec = np.dtype([("x", ">f8", (2, 4)), ("id", "<i8")])
    _write(tmp_path / "d.bin", rec, {"x": values, "id": ids}, header=b"\0" * 256)
    src = RawSource([str(tmp_path / "d.bin")], layout="x:>f8[2,4],id:int64", header_bytes=256)
    got = src.read(0, 3)
    assert got["x"].dtype == np.float64 and got["x"].dtype.isnative
    np.testing.assert_array_equal(got["x"], values)
    np.testing.assert_array_equal(got["id"], ids)


def test_pickle_round_trip_after_read(tmp_path):
    (tmp_path / "a.bin").write_bytes(np.arange(64, dtype="<i4").tobytes())
    src = RawSource([str(tmp_path / "a.bin")], layout="int32[8]")
    src.read(0, 1)  # opens the memmap, which must not travel
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read(7, 8)["input_ids"], np.arange(56, 64)[None])
    assert clone.fingerprint() == src.fingerprint()


def test_truncated_file_names_file_and_offset(tmp_path):
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(b"\0" * (16 + 2 * 9))  # header and two 9-byte records
    bad.write_bytes(b"\0" * 16 + np.zeros(10, "<i4").tobytes() + b"\1\2\3")
    with pytest.raises(FormatError) as info:
        RawSource([str(good), str(bad)], layout="a:int32[2],b:int8", header_bytes=16)
    err = info.value
    # 40 bytes are 4 records of 9 bytes and 4 extra bytes, plus 3 more -> 7 extra after 4 records
    assert err.path == str(bad) and err.offset == 16 + 4 * 9
    assert str(bad) in str(err) and "--header-bytes" in str(err)


def test_file_shorter_than_header(tmp_path):
    (tmp_path / "s.bin").write_bytes(b"abc")
    with pytest.raises(FormatError, match="s.bin"):
        RawSource([str(tmp_path / "s.bin")], layout="uint8", header_bytes=10)


@pytest.mark.parametrize(
    ("layout", "token"),
    [
        ("int33[128]", "int33[128]"),
        ("a:int32[0]", "a:int32[0]"),
        ("a:int32,int32", "int32"),
        ("a:int32,a:int8", "a:int8"),
        ("text:S16", "text:S16"),
        ("a:int32[x]", "a:int32[x]"),
        ("a:int32,,b:int8", "''"),
        ("a:b:int32", "a:b:int32"),
    ],
)
def test_bad_layout_names_token_and_example(tmp_path, layout, token):
    (tmp_path / "a.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError) as info:
        RawSource([str(tmp_path / "a.bin")], layout=layout)
    assert token in str(info.value) and "input_ids:int32[128]" in str(info.value)


@pytest.mark.parametrize("layout", ["", "a:int32[4", "   "])
def test_empty_or_unbalanced_layout(layout):
    with pytest.raises(ConfigError, match="valid example"):
        parse_layout(layout)


def test_parse_layout_defaults():
    assert parse_layout("int32[128]") == [("input_ids", np.dtype("<i4"), (128,))]
    fields = parse_layout("input_ids:int32[128], labels:float32[2], id:>i8, m:f4[4,4]")
    assert [(n, d.str, s) for n, d, s in fields] == [
        ("input_ids", "<i4", (128,)),
        ("labels", "<f4", (2,)),
        ("id", ">i8", ()),
        ("m", "<f4", (4, 4)),
    ]


def test_bad_header_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * 4)
    with pytest.raises(ConfigError, match="header-bytes"):
        RawSource([str(tmp_path / "a.bin")], layout="int32", header_bytes=-1)


def test_out_of_range_read(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * 8)
    src = RawSource([str(tmp_path / "a.bin")], layout="int32")
    with pytest.raises(IndexError):
        src.read(0, 3)
    with pytest.raises(IndexError):
        src.take(np.array([2]))
