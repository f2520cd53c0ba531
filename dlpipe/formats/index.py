"""The ``.index`` file beside every shard, whatever its format: one ``"offset size"`` line per
record (the byte span of its frame or tar sample in the uncompressed stream), as DALI's
``tfrecord2idx`` and the ``tfrecord`` package write them. Written with the shard, read before it."""

from __future__ import annotations

import os
import warnings

import numpy as np

from dlpipe.errors import FormatError
from dlpipe.storage import Location

__all__ = ["index_bytes", "index_lines", "parse_index", "read_index"]


def index_lines(record_offsets: np.ndarray, base: int = 0) -> str:
    """The index lines of records at ``record_offsets`` (n + 1 of them), shifted by ``base``."""
    n = len(record_offsets) - 1
    if n <= 0:
        return ""
    offsets = np.asarray(record_offsets, dtype=np.int64)
    starts = offsets[:-1] + base
    sizes = np.diff(offsets)
    if int(starts.min()) < 0 or int(sizes.min()) < 0:  # not a real index; printf writes the signs
        return ("%d %d\n" * n) % tuple(np.stack([starts, sizes], axis=1).ravel().tolist())
    # every line is laid out in fixed columns (digits right-aligned, zero-filled), then the
    # leading zeros are dropped by one mask: no per-line Python. Columns are built as rows of a
    # transposed block, so that every step is a contiguous pass.
    a, b = _digits(int(starts.max())), _digits(int(sizes.max()))
    cols = np.empty((a + b + 2, n), dtype=np.uint8)
    keep = np.ones((a + b + 2, n), dtype=bool)
    _decimal(starts, cols[:a], keep[:a])
    cols[a] = ord(" ")
    _decimal(sizes, cols[a + 1 : a + 1 + b], keep[a + 1 : a + 1 + b])
    cols[-1] = ord("\n")
    return cols.T.copy()[keep.T.copy()].tobytes().decode("ascii")


def _digits(hi: int) -> int:
    return len(str(hi))


def _decimal(values: np.ndarray, digits: np.ndarray, keep: np.ndarray) -> None:
    """Decimal digits (ASCII) of non-negative ints into ``digits`` (one row per decimal place,
    right-aligned, zero-filled), and in ``keep`` which to write (not the leading zeros)."""
    width = len(digits)
    kind = np.uint32 if int(values.max()) < 2**32 else np.uint64
    ten = kind(10)
    rest = values.astype(kind)
    for j in range(width - 1, -1, -1):  # scalar divisors: numpy divides by multiplying
        q = rest // ten
        digits[j] = rest - q * ten
        rest = q
        if j:
            keep[j - 1] = q > 0
    digits += np.uint8(ord("0"))


def read_index(path: str | os.PathLike[str] | Location) -> np.ndarray:
    """An "offset size" index file as an (n, 2) int64 array."""
    loc = path if isinstance(path, Location) else Location(path)
    return parse_index(index_bytes(loc), loc.url)


def parse_index(data: bytes, where: str) -> np.ndarray:
    # fromstring parses ~5x faster than split() + array (which a loader pays per shard at start),
    # but stops quietly at the first bad token: the count tells, and split() then says so
    lines = data.count(b"\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # older numpy: "could not be read to its end"
            values = np.fromstring(data, dtype=np.int64, sep=" ") if data else np.empty(0, np.int64)
    except ValueError:  # numpy 2.x raises at the first bad token
        values = np.empty(0, np.int64)
    if lines and len(values) == 2 * lines and data.count(b" ") == lines and data.endswith(b"\n"):
        return values.reshape(-1, 2)
    try:
        return np.array(data.split(), dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        raise FormatError(where, "index is not 'offset size' lines", hint="rerun dlpipe reshard") from None


def index_bytes(loc: Location) -> bytes:
    """The raw bytes of the index file at ``loc``; a FormatError if it is missing or unreadable."""
    try:
        return loc.read_bytes()
    except FileNotFoundError:
        raise FormatError(loc.url, "index file is missing", hint="rerun dlpipe reshard") from None
    except OSError as e:
        raise FormatError(loc.url, f"cannot read the index ({e.strerror or e})",
                          hint="check the connection and --storage-option credentials") from None
