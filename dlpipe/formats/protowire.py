"""Protocol-buffer wire helpers shared by the Example decoder and its layout fast path:
varints read for many records at once, and errors that name the record they came from."""

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
