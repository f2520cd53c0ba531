"""Fast paths of the Example decoder for files where every record shares one layout.

Records written by one writer usually differ only in list lengths and values. ``plan`` reads
record 0's layout; ``same_bytes`` slices values at fixed offsets when every record also has the
same length and identical non-value bytes; ``follow_plan`` walks all records through the layout
in lockstep when only lengths vary. Either returns None when a record breaks the layout, and
the caller falls back to the general walk (which also finds and reports errors).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dlpipe.errors import FormatError
from dlpipe.formats.tfrecord.protowire import RecordErrors, varints_at


# Fast path: records written by one writer from padded data share one layout (same features in
# the same order, one packed field per list) and differ only in lengths. The layout of the first
# record becomes a plan of steps that every record follows in lockstep; any departure falls back
# to the general walk, which also finds and reports errors.
def plan(rec: bytes) -> list[tuple[str, int, list]] | None:
    """[(name, kind, steps)] for a canonical record, else None.

    Steps: ("fix", bytes) must match; ("len", None) reads a length varint and opens a message;
    ("end", None) closes it; ("val", (a, b)) reads a length varint and takes that many value bytes
    (``rec[a:b]`` in this record).
    """

    def field(p, tag):  # (start, stop) of a length-delimited field with this tag at p, or None
        if p >= len(rec) or rec[p] != tag:
            return None
        v, shift, p = 0, 0, p + 1
        while p < len(rec) and shift < 64:
            v, p, shift = v | (rec[p] & 0x7F) << shift, p + 1, shift + 7
            if rec[p - 1] < 0x80:
                return (p, p + v) if p + v <= len(rec) else None
        return None

    body, out = field(0, 0x0A), []
    if body is None or body[1] != len(rec):
        return None
    pos = body[0]
    while pos < len(rec):
        entry = field(pos, 0x0A)
        key = entry and field(entry[0], 0x0A)
        value = key and field(key[1], 0x12)
        kind = value and value[0] < len(rec) and rec[value[0]] >> 3
        lst = kind in (1, 2, 3) and field(value[0], kind << 3 | 2)
        if not lst or lst[1] != value[1] or value[1] != entry[1]:
            return None
        steps = [
            ("fix", b"\x0a"),
            ("len", None),
            ("fix", rec[entry[0] : key[1]] + b"\x12"),
            ("len", None),
            ("fix", bytes([kind << 3 | 2])),
            ("len", None),
        ]
        u = lst[0]
        while u < lst[1]:
            val = field(u, 0x0A)
            if not val or val[1] > lst[1] or (kind != 1 and val[1] != lst[1]):
                return None
            steps += [("fix", b"\x0a"), ("val", val)]
            u = val[1]
        name = bytes(rec[key[0] : key[1]]).decode("utf-8", "backslashreplace")
        out.append((name, kind, steps + [("end", None)] * 3))
        pos = entry[1]
    names = [name for name, _, _ in out]
    return out if len(set(names)) == len(names) else None


def same_bytes(buf, starts, ends, first, plan):
    """Spans as for _follow_plan when every record has the first one's length and all its bytes
    outside the values (tags, lengths, keys); then every value sits at the same offset."""
    if np.any(ends - starts != len(first)):
        return None
    vals = [[arg for op, arg in steps if op == "val"] for _, _, steps in plan]
    edges = [0, *(x for v in vals for ab in v for x in ab), len(first)]
    for a, b in zip(edges[::2], edges[1::2]):
        head = np.frombuffer(first[a:b], np.uint8)
        if b > a and not np.all(sliding_window_view(buf, b - a)[starts + a] == head):
            return None
    rec = np.arange(len(starts), dtype=np.int64)
    out = []
    for v in vals:
        a, b = np.array(v, dtype=np.int64).reshape(-1, 2).T
        out.append(
            ((starts[:, None] + a).ravel(), (starts[:, None] + b).ravel(), np.repeat(rec, len(v)))
        )
    return out


def follow_plan(buf, starts, ends, plan):
    """Per feature, the value rows (start, stop, record) of every record, or None on a departure."""
    if np.any(ends - starts < 2) or np.any(buf[starts] != 0x0A):
        return None
    pos = starts + 1
    rec = np.arange(len(starts), dtype=np.int64)
    ok, opened = _read_len(buf, pos, ends, pos)
    if not ok or not np.array_equal(opened, ends):
        return None
    spans = []
    for _, _, steps in plan:
        stack, vals = [], []
        for op, arg in steps:
            if op == "fix":
                if np.any(pos + len(arg) > ends):
                    return None
                got = buf[pos] if len(arg) == 1 else sliding_window_view(buf, len(arg))[pos]
                if not np.all(got == np.frombuffer(arg, np.uint8)):
                    return None
                pos += len(arg)
            elif op == "end":
                if not np.array_equal(pos, stack.pop()):
                    return None
            else:
                ok, stop = _read_len(buf, pos, ends, pos)
                if not ok:
                    return None
                if op == "len":
                    stack.append(stop)
                else:
                    vals.append((pos.copy(), stop))
                    pos[:] = stop
        if vals:
            s, t = (
                np.stack([v[0] for v in vals], 1).ravel(),
                np.stack([v[1] for v in vals], 1).ravel(),
            )
            spans.append((s, t, np.repeat(rec, len(vals))))
        else:
            spans.append((rec[:0], rec[:0], rec[:0]))
    return spans if np.array_equal(pos, ends) else None


def _read_len(buf, pos, ends, out):
    """Read a length varint at every ``pos`` into ``out`` (in place, past the varint); return
    (ok, pos + length); ok is False on a truncated or overlong varint or one past ``ends``."""
    if np.any(pos >= ends):
        return False, None
    b = buf[pos]
    if b.max() < 0x80:
        out += 1
        stop = out + b
        return bool(np.all(stop <= ends)), stop
    try:
        val, nxt = varints_at(buf, pos, ends, np.zeros_like(pos), RecordErrors(None, pos[:1]))
    except FormatError:
        return False, None
    out[:] = nxt
    stop = nxt + np.minimum(val, np.uint64(1 << 62)).astype(np.int64)
    return bool(np.all(stop <= ends)), stop
