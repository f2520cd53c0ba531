"""TFRecordSource: padded tf.train.Example files, plain and compressed, read without TensorFlow."""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protowire import ld, varint

from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.tfrecord.framing import frame_records
from dlpipe.sources.tfrecord import TFRecordSource, compression_of

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def example(ids=None, weights=None, blob=None) -> bytes:
    """A padded Example, encoded by hand: ids int64 list, weights float list, blob one bytes value."""
    entries = []
    if ids is not None:
        entries.append((b"ids", ld(3, ld(1, b"".join(varint(int(v)) for v in ids)))))
    if weights is not None:
        entries.append((b"weights", ld(2, ld(1, struct.pack(f"<{len(weights)}f", *weights)))))
    if blob is not None:
        entries.append((b"blob", ld(1, b"".join(ld(1, b) for b in blob))))
    return ld(1, b"".join(ld(1, ld(1, k) + ld(2, v)) for k, v in entries))


def write(path, records: list[bytes], compression: str | None = None) -> str:
    payload = np.frombuffer(b"".join(records), np.uint8)
    offsets = np.cumsum([0, *map(len, records)])
    data = frame_records(payload, offsets)[0].tobytes() if records else b""
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zlib":
        data = zlib.compress(data)
    Path(path).write_bytes(data)
    return str(path)


def table(n: int, width: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "blob": rng.integers(0, 256, size=(n, 3), dtype=np.uint8),
        "ids": rng.integers(-(2**62), 2**62, size=(n, width)),
        "weights": rng.random((n, 2)).astype(np.float32),
    }


def encode_table(t: dict[str, np.ndarray]) -> list[bytes]:
    return [
        example(t["ids"][i], t["weights"][i], [t["blob"][i].tobytes()])
        for i in range(len(t["ids"]))
    ]


def assert_rows(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rows) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name][rows])


@given(
    st.lists(st.sampled_from([0, 1, 2, 7, 40]), min_size=1, max_size=4),
    st.sampled_from([1, 3, 128]),
    st.sampled_from([None, "gzip", "zlib"]),
    st.data(),
)
@SETTINGS
def test_records_map_across_files_in_order(tmp_path_factory, counts, width, compression, data):
    if sum(counts) == 0:
        counts[-1] = 1
    d = tmp_path_factory.mktemp("src")
    t = table(sum(counts), width)
    paths, at = [], 0
    for i, n in enumerate(counts):
        part = {k: v[at : at + n] for k, v in t.items()}
        suffix = {None: "", "gzip": ".gz", "zlib": ".zz"}[compression]
        paths.append(write(d / f"part{i}.tfrecord{suffix}", encode_table(part), compression))
        at += n
    src = TFRecordSource(paths)
    assert src.num_records == at
    assert {n: (c.dtype, c.shape) for n, c in src.columns.items()} == {
        "blob": (np.uint8, (3,)),
        "ids": (np.int64, (width,)),
        "weights": (np.float32, (2,)),
    }
    start = data.draw(st.integers(0, at))
    stop = data.draw(st.integers(start, at))
    assert_rows(src.read(start, stop), t, slice(start, stop))
    idx = np.array(data.draw(st.lists(st.integers(0, at - 1), max_size=20)), dtype=np.int64)
    assert_rows(pickle.loads(pickle.dumps(src)).take(idx), t, idx)


def test_pickled_source_reopens_lazily(tmp_path):
    t = table(50)
    src = TFRecordSource([write(tmp_path / "a.tfrecord", encode_table(t))])
    src.read(0, 5)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._maps is None and clone._inflated is None
    assert_rows(clone.read(10, 50), t, slice(10, 50))
    assert clone.fingerprint() == src.fingerprint()


def test_compression_is_taken_from_the_suffix_or_given():
    assert compression_of("x.tfrecord") is None
    assert compression_of("x.tfrecord.gz") == "gzip"
    assert compression_of("x.tfrecord.ZZ") == "zlib"
    assert compression_of("x.tfrecord.zlib") == "zlib"
    assert compression_of("x.tfrecord", "gzip") == "gzip"
    assert compression_of("x.tfrecord.gz", "none") is None
    with pytest.raises(ConfigError, match="compression='lz4'"):
        compression_of("x", "lz4")


def test_explicit_compression_for_unsuffixed_file(tmp_path):
    t = table(5)
    path = write(tmp_path / "a.tfrecord", encode_table(t), "gzip")
    assert_rows(TFRecordSource([path], compression="gzip").read(0, 5), t, slice(0, 5))
    with pytest.raises(FormatError, match="CRC"):
        TFRecordSource([path])


def test_out_of_range_reads_are_config_errors(tmp_path):
    src = TFRecordSource([write(tmp_path / "a.tfrecord", encode_table(table(3)))])
    with pytest.raises(ConfigError, match="read\\(2, 4\\)"):
        src.read(2, 4)
    with pytest.raises(ConfigError, match="record index 3"):
        src.take(np.array([0, 3]))
    assert src.take(np.array([], dtype=np.int64))["ids"].shape == (0, 8)


# Errors name the file, the byte offset of the frame and the record.


def test_truncated_file(tmp_path):
    records = encode_table(table(4))
    path = write(tmp_path / "a.tfrecord", records)
    Path(path).write_bytes(Path(path).read_bytes()[:-3])
    offset = 16 * 3 + sum(map(len, records[:3]))
    with pytest.raises(
        FormatError, match=rf"a\.tfrecord at byte {offset} \(record 3\): truncated record"
    ):
        TFRecordSource([path])


def test_flipped_byte_fails_the_crc(tmp_path):
    path = write(tmp_path / "a.tfrecord", encode_table(table(4)))
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 4 + 20] ^= 0x01
    Path(path).write_bytes(bytes(data))
    with pytest.raises(
        FormatError, match=r"a\.tfrecord at byte \d+ \(record 1\): record data CRC mismatch"
    ):
        TFRecordSource([path])


def test_truncated_gzip_stream(tmp_path):
    path = write(tmp_path / "a.tfrecord.gz", encode_table(table(40)), "gzip")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"a\.tfrecord\.gz.*decompress"):
        TFRecordSource([path])


@pytest.mark.parametrize(
    ("odd", "message"),
    [
        (example(np.arange(7), [1.0, 2.0], [b"abc"]), "'ids' has length 7, expected 8"),
        (example(np.arange(8), [1.0, 2.0], [b"ab"]), "'blob' has length 2, expected 3"),
        (example(np.arange(8), [1.0, 2.0], [b"abc", b"abc"]), "'blob' holds 2 bytes values"),
        (example(np.arange(8), None, [b"abc"]), "'weights' is missing"),
        (
            example(np.arange(8), [1.0, 2.0], [b"abc"]) + ld(1, ld(1, ld(1, b"z") + ld(2, b""))),
            "'z' is not in",
        ),
    ],
)
def test_a_record_that_differs_is_named(tmp_path, odd, message):
    records = encode_table(table(5))
    records.insert(3, odd)
    path = write(tmp_path / "a.tfrecord", records)
    src = TFRecordSource([write(tmp_path / "first.tfrecord", encode_table(table(2))), path])
    src.read(0, 5)  # records before the odd one are fine
    with pytest.raises(FormatError) as e:
        src.read(3, 8)
    offset = 16 * 3 + sum(map(len, records[:3]))
    assert e.value.path == path and e.value.record == 3 and e.value.offset == offset
    assert f"a.tfrecord at byte {offset} (record 3): " in str(e.value) and message in str(e.value)
    assert "FixedLenFeature" in e.value.hint
    with pytest.raises(FormatError, match=message):
        src.take(np.array([6, 0, 5]))


def test_bad_first_record_fails_on_open(tmp_path):
    many = write(tmp_path / "m.tfrecord", [example(blob=[b"a", b"b"])])
    with pytest.raises(
        FormatError, match="'blob' holds 2 bytes values; a column needs exactly one"
    ):
        TFRecordSource([many])
    with pytest.raises(FormatError, match="holds no records"):
        TFRecordSource([write(tmp_path / "e.tfrecord", [])])
    with pytest.raises(FormatError, match="no features"):
        TFRecordSource([write(tmp_path / "n.tfrecord", [b""])])


# Files written by TensorFlow itself, and read back by it.


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def tf_write(tf, path, t: dict[str, np.ndarray], options=None) -> str:
    with tf.io.TFRecordWriter(str(path), options=options) as writer:
        for i in range(len(t["ids"])):
            feature = {
                "ids": tf.train.Feature(int64_list=tf.train.Int64List(value=t["ids"][i])),
                "weights": tf.train.Feature(float_list=tf.train.FloatList(value=t["weights"][i])),
                "blob": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[t["blob"][i].tobytes()])
                ),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    return str(path)


@pytest.mark.tf
@pytest.mark.parametrize(("suffix", "options"), [("", None), (".gz", "GZIP"), (".zz", "ZLIB")])
def test_reads_files_written_by_tensorflow(tf, tmp_path, suffix, options):
    t = table(300, width=128, seed=1)
    t["ids"][::3] %= 30000
    paths = [
        tf_write(
            tf,
            tmp_path / f"p{i}.tfrecord{suffix}",
            {k: v[i * 100 : i * 100 + 100] for k, v in t.items()},
            options,
        )
        for i in range(3)
    ]
    paths.insert(
        1,
        tf_write(
            tf, tmp_path / f"empty.tfrecord{suffix}", {k: v[:0] for k, v in t.items()}, options
        ),
    )
    src = TFRecordSource(paths)
    assert src.num_records == 300 and src.kind == "tfrecord"
    assert_rows(src.read(0, 300), t, slice(0, 300))
    assert_rows(src.read(99, 101), t, slice(99, 101))
    idx = np.random.default_rng(0).integers(0, 300, 64)
    assert_rows(src.take(idx), t, idx)


@pytest.mark.tf
def test_agrees_with_tensorflow_fixed_len_parsing(tf, tmp_path):
    t = table(64, width=16, seed=2)
    path = tf_write(tf, tmp_path / "a.tfrecord", t)
    spec = {
        "ids": tf.io.FixedLenFeature([16], tf.int64),
        "weights": tf.io.FixedLenFeature([2], tf.float32),
        "blob": tf.io.FixedLenFeature([], tf.string),
    }
    parsed = next(
        iter(tf.data.TFRecordDataset(path).batch(64).map(lambda x: tf.io.parse_example(x, spec)))
    )
    ours = TFRecordSource([path]).read(0, 64)
    np.testing.assert_array_equal(ours["ids"], parsed["ids"].numpy())
    np.testing.assert_array_equal(ours["weights"], parsed["weights"].numpy())
    assert [r.tobytes() for r in ours["blob"]] == list(parsed["blob"].numpy())
