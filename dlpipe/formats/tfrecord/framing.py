"""TFRecord framing, written and read without TensorFlow.

A TFRecord file is a sequence of frames::

    uint64 length (little-endian)
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

GZIP and ZLIB compression wrap the whole stream (``formats/compression.py``).
Framing is done for many records per call: one numpy pass builds every header, and the only
per-record Python work is the C-implemented CRC of each payload.
"""

from __future__ import annotations

import os

import google_crc32c
import numpy as np

from dlpipe.errors import FormatError
from dlpipe.formats.pieces import Piece, RaggedPiece, assemble, constant

HEADER_BYTES = 12  # length + length-crc
FOOTER_BYTES = 4
_MASK_DELTA = np.uint32(0xA282EAD8)


def _mask(crc: np.ndarray) -> np.ndarray:
    crc = crc.astype(np.uint32)
    return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + _MASK_DELTA


def masked_crc32c(data: bytes | memoryview) -> int:
    return int(_mask(np.array([google_crc32c.value(data)], dtype=np.uint32))[0])


def crc32c_many(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Unmasked CRC32C of ``buf[starts[i]:ends[i]]`` for every i."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint32)
    # google_crc32c wants bytes: one copy of the span, then a bytes slice per record, is the
    # cheapest way to hand it many short records.
    base = int(starts.min())
    data = np.asarray(buf[base : int(ends.max())]).tobytes()
    value = google_crc32c.value
    return np.array(
        [value(data[a:b]) for a, b in zip((starts - base).tolist(), (ends - base).tolist())], dtype=np.uint32
    )


def frame_records(payload: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame N payloads (``payload[offsets[i]:offsets[i+1]]``) as TFRecords.

    Returns the framed bytes and the N+1 frame offsets within them.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    flat = np.asarray(payload, dtype=np.uint8)[offsets[0] : offsets[-1]] if len(offsets) else payload[:0]
    return frame_pieces([RaggedPiece(flat, lengths)], lengths)


def _length_crcs(lengths: np.ndarray) -> np.ndarray:
    raw = lengths.astype("<u8").view(np.uint8)
    at = np.arange(len(lengths), dtype=np.int64) * 8
    return _mask(crc32c_many(raw, at, at + 8))


def length_crcs(lengths: np.ndarray) -> np.ndarray:
    """The masked CRC32C of every frame's 8-byte length; each distinct length is hashed once."""
    hi = int(lengths.max()) if len(lengths) else 0
    if int(lengths.min()) >= 0 and hi < max(1 << 16, 4 * len(lengths)):
        seen = np.zeros(hi + 1, dtype=bool)  # the distinct lengths, without sorting
        seen[lengths] = True
        uniq = np.flatnonzero(seen)
        table = np.empty(hi + 1, dtype=np.uint32)
        table[uniq] = _length_crcs(uniq)
        return table[lengths]
    uniq, inverse = np.unique(lengths, return_inverse=True)
    return _length_crcs(uniq)[inverse.ravel()]


def frame_pieces(pieces: list[Piece], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame n records given as pieces (``lengths``: payload bytes of each).

    Headers are built before the pieces are assembled; only the data CRC is filled in afterwards.
    """
    n = len(lengths)
    if n == 0:
        return np.empty(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    header = np.empty((n, HEADER_BYTES), dtype=np.uint8)
    header[:, :8] = lengths.astype("<u8").view(np.uint8).reshape(n, 8)
    header[:, 8:] = length_crcs(lengths).astype("<u4").view(np.uint8).reshape(n, 4)
    out, frame_offsets = assemble([Piece(header, None), *pieces, constant(bytes(FOOTER_BYTES), n)], n)
    starts = frame_offsets[:-1] + HEADER_BYTES
    data_crc = _mask(crc32c_many(out, starts, starts + lengths))
    _scatter_rows(out, frame_offsets[1:] - FOOTER_BYTES, data_crc.astype("<u4").view(np.uint8).reshape(n, 4))
    return out, frame_offsets


def _scatter_rows(out: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> None:
    """out[starts[i] : starts[i] + w] = rows[i] for a (N, w) array of rows."""
    width = rows.shape[1]
    idx = starts[:, None] + np.arange(width, dtype=np.int64)[None, :]
    out[idx.ravel()] = rows.ravel()


def scan_frames(
    buf: np.ndarray | bytes,
    *,
    path: str | os.PathLike[str] | None = None,
    check_crc: bool = True,
    limit: int | None = None,
) -> np.ndarray:
    """Walk the frames of a TFRecord stream; return the N+1 frame offsets.

    Raises FormatError naming the byte offset of a truncated frame or a CRC mismatch.
    ``limit`` stops after that many records.
    """
    view = memoryview(buf).cast("B")
    size = len(view)
    value = google_crc32c.value
    offsets = [0]
    pos = 0
    while pos < size and (limit is None or len(offsets) <= limit):
        if pos + HEADER_BYTES > size:
            raise FormatError(path, f"truncated record header ({size - pos} of 12 bytes)", offset=pos,
                              record=len(offsets) - 1, hint="the file was cut short; re-create or re-copy it")
        length = int.from_bytes(view[pos : pos + 8], "little")
        if check_crc:
            got = int.from_bytes(view[pos + 8 : pos + 12], "little")
            if got != masked_crc32c(bytes(view[pos : pos + 8])):
                raise FormatError(path, "record length CRC mismatch (not a TFRecord file, or corrupt)",
                                  offset=pos, record=len(offsets) - 1,
                                  hint="check the file type and compression (gzip/zlib)")
        end = pos + HEADER_BYTES + length + FOOTER_BYTES
        if end > size:
            raise FormatError(path, f"truncated record: needs {length} data bytes, file ends first",
                              offset=pos, record=len(offsets) - 1,
                              hint="the file was cut short; re-create or re-copy it")
        if check_crc:
            data_start = pos + HEADER_BYTES
            got = int.from_bytes(view[end - 4 : end], "little")
            want = value(bytes(view[data_start : end - 4]))
            if got != int(_mask(np.array([want], dtype=np.uint32))[0]):
                raise FormatError(path, "record data CRC mismatch (corrupt data)", offset=pos,
                                  record=len(offsets) - 1, hint="re-create or re-copy the file")
        offsets.append(end)
        pos = end
    return np.asarray(offsets, dtype=np.int64)


def payload_bounds(frame_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each record's data within the stream, from frame offsets."""
    return frame_offsets[:-1] + HEADER_BYTES, frame_offsets[1:] - FOOTER_BYTES


def check_frame_crcs(buf: np.ndarray, frame_offsets: np.ndarray, *, path=None) -> None:
    """Vector check of every frame's length and data CRC, given known frame offsets (from an index)."""
    starts, ends = payload_bounds(frame_offsets)
    n = len(starts)
    if n == 0:
        return
    if frame_offsets[-1] > len(buf):
        raise FormatError(path, f"file is shorter ({len(buf)} bytes) than its index says",
                          offset=int(frame_offsets[-1]), hint="the shard is truncated; rerun the reshard")
    lengths = ends - starts
    hdr = buf[(frame_offsets[:-1, None] + np.arange(8)).ravel()].reshape(n, 8).copy().view("<u8").ravel()
    bad = np.flatnonzero(hdr != lengths.astype(np.uint64))
    if len(bad):
        i = int(bad[0])
        raise FormatError(path, "record length disagrees with the index", offset=int(frame_offsets[i]),
                          record=i, hint="the shard or its .index file is corrupt")
    length_crc = length_crcs(lengths)
    stored = buf[(frame_offsets[:-1, None] + np.arange(8, 12)).ravel()].reshape(n, 4).copy().view("<u4").ravel()
    bad = np.flatnonzero(stored != length_crc)
    if len(bad):
        i = int(bad[0])
        raise FormatError(path, "record length CRC mismatch (corrupt data)", offset=int(frame_offsets[i]),
                          record=i, hint="re-create the shard (rerun the reshard)")
    data_crc = _mask(crc32c_many(buf, starts, ends))
    stored = buf[(ends[:, None] + np.arange(4)).ravel()].reshape(n, 4).copy().view("<u4").ravel()
    bad = np.flatnonzero(stored != data_crc)
    if len(bad):
        i = int(bad[0])
        raise FormatError(path, "record data CRC mismatch (corrupt data)", offset=int(frame_offsets[i]),
                          record=i, hint="re-create the shard (rerun the reshard)")
