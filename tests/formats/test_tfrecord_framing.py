import gzip
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.errors import FormatError
from dlpipe.formats.compression import open_compressed_writer, read_decompressed
from dlpipe.formats.tfrecord import framing

payloads = st.lists(st.binary(max_size=300), max_size=40)


def _frame(records):
    flat = np.frombuffer(b"".join(records), dtype=np.uint8)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in records], out=offsets[1:])
    return framing.frame_records(flat, offsets)


@settings(max_examples=60, deadline=None)
@given(payloads)
def test_frame_then_scan_round_trips(records):
    buf, offsets = _frame(records)
    assert np.array_equal(framing.scan_frames(buf), offsets)
    framing.check_frame_crcs(buf, offsets)
    starts, ends = framing.payload_bounds(offsets)
    assert [bytes(buf[a:b]) for a, b in zip(starts, ends)] == records


@pytest.mark.tf
def test_framing_is_byte_identical_to_tensorflow(tf, tmp_path):
    records = [b"", b"x", b"hello world" * 50, bytes(range(256))]
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    buf, _ = _frame(records)
    with open(path, "rb") as f:
        assert f.read() == buf.tobytes()


@pytest.mark.tf
@pytest.mark.parametrize("compression", ["gzip", "zlib"])
def test_compressed_streams_read_by_tensorflow(tf, tmp_path, compression):
    records = [b"a" * i for i in range(50)]
    buf, _ = _frame(records)
    path = tmp_path / f"x.{compression}"
    with open(path, "wb") as raw:
        w = open_compressed_writer(raw, compression)
        w.write(buf.tobytes())
        w.close()
    got = list(tf.data.TFRecordDataset(str(path), compression_type=compression.upper()).as_numpy_iterator())
    assert got == records
    assert bytes(read_decompressed(path, compression)) == buf.tobytes()


def test_corruption_is_located():
    buf, offsets = _frame([b"abc", b"defgh", b"ij"])
    bad = buf.copy()
    bad[offsets[1] + 13] ^= 0xFF  # a data byte of record 1
    with pytest.raises(FormatError, match=f"at byte {offsets[1]} \\(record 1\\).*CRC"):
        framing.scan_frames(bad, path="s.tfrecord")
    with pytest.raises(FormatError, match="CRC"):
        framing.check_frame_crcs(bad, offsets, path="s.tfrecord")
    with pytest.raises(FormatError, match="truncated"):
        framing.scan_frames(buf[:-3], path="s.tfrecord")


def test_decompress_errors_are_format_errors(tmp_path):
    path = tmp_path / "x.tfrecord.gz"
    path.write_bytes(gzip.compress(b"abcdef")[:-5])
    with pytest.raises(FormatError, match="decompress"):
        read_decompressed(path, "gzip")
    path.write_bytes(zlib.compress(b"abc")[:3])
    with pytest.raises(FormatError):
        read_decompressed(path, "zlib")


def test_length_crc_is_checked_given_offsets():
    buf, offsets = _frame([b"abc", b"defgh"])
    bad = buf.copy()
    bad[offsets[1] + 9] ^= 0x01  # inside record 1's length CRC
    with pytest.raises(FormatError, match=r"\(record 1\).*length CRC"):
        framing.check_frame_crcs(bad, offsets, path="s.tfrecord")
