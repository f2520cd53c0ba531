"""Protocol-buffer wire helpers shared by the Example decoder and its layout fast path:
varints read for many records at once (one per position, or whole packed lists), and errors that
name the record they came from."""

from __future__ import annotations

import numpy as np

from dlpipe.errors import FormatError

HINT = "the record is not a valid serialized tf.train.Example (corrupt, or another message type)"


class RecordErrors:
    """Turns a failing record (or the first of several) into a FormatError."""

    def __init__(self, path, offsets: np.ndarray) -> None:
        self.path = path
        self.offsets = offsets

    def fail(self, recs, message: str, hint: str = HINT):
        i = int(np.min(recs))
        raise FormatError(self.path, message, offset=int(self.offsets[i]), record=i, hint=hint)


def varints_at(buf, p, e, r, w):
    """The varint starting at each ``p`` (bounded by ``e``), and the position after it."""
    b = buf[p]
    val = (b & 0x7F).astype(np.uint64)
    size = np.ones(len(p), dtype=np.int64)
    more = np.flatnonzero(b & 0x80)
    shift = 7
    while len(more):
        if shift > 63:
            w.fail(r[more], "varint longer than 10 bytes")
        q = p[more] + size[more]
        if np.any(q >= e[more]):
            w.fail(r[more][q >= e[more]], "truncated varint (runs past the end of its message)")
        b = buf[q]
        val[more] |= (b & 0x7F).astype(np.uint64) << np.uint64(shift)
        size[more] += 1
        more = more[(b & 0x80) != 0]
        shift += 7
    return val, p + size


def packed_varints(b, offs, rrec, w, name) -> tuple[np.ndarray, np.ndarray]:
    """Decode the varints in each piece ``b[offs[i]:offs[i+1]]``; return values and counts per piece."""
    sizes = np.diff(offs)
    if len(b) == 0 or b.max() < 0x80:  # every value below 128: one byte each
        return b.astype(np.int64), sizes
    last = np.maximum(offs[1:] - 1, 0)
    cut = (sizes > 0) & (b[last] >= 0x80)
    if cut.any():
        w.fail(rrec[cut], f"feature {name!r}: truncated varint in a packed int64 list")
    # Decode in cache-sized chunks cut after a terminator byte, so no varint straddles two.
    # rank[j]: how many varints end before offs[j]; its differences are the counts per piece.
    out, rank = [], np.empty(len(offs), dtype=np.int64)
    lo = j = done = 0
    while lo < len(b):
        hi = min(lo + _CHUNK, len(b))
        if hi < len(b):
            hi += int(np.argmax(b[hi - 1 : hi + 10] < 0x80))
        c = b[lo:hi]
        ends = np.flatnonzero(c < 0x80)
        k = int(np.searchsorted(offs, hi))
        rank[j:k] = done + np.searchsorted(ends, offs[j:k] - lo)
        out.append(_varint_chunk(c, ends, lo, offs, rrec, w, name))
        lo, j, done = hi, k, done + len(ends)
    rank[j:] = done
    return np.concatenate(out).view(np.int64), np.diff(rank)


_CHUNK = 1 << 18


def _varint_chunk(c, ends, base, offs, rrec, w, name) -> np.ndarray:
    """Varints of a chunk that starts and ends on a varint boundary (``ends``: terminator bytes)."""
    padded = np.concatenate([np.zeros(10, np.uint8), c])  # a terminator before every chunk
    val = (c[ends] & 0x7F).astype(np.uint32)
    more = np.ones(len(ends), dtype=bool)
    # Walk back from each terminator (the most significant group), Horner style; 32-bit sums
    # while they fit (4 bytes, 28 bits: every token id), 64-bit beyond.
    for k in range(1, 11):
        byte = padded[10 - k :][ends]
        more &= byte >= 0x80
        if not more.any():
            return val.astype(np.uint64)
        if k == 4:
            val = val.astype(np.uint64)
        low = (byte & 0x7F).astype(val.dtype)
        val = np.where(more, (val << val.dtype.type(7)) | low, val)
    piece = np.searchsorted(offs, base + ends[more], side="right") - 1
    w.fail(rrec[piece], f"feature {name!r}: varint longer than 10 bytes")
