"""Decode serialized ``tf.train.Example`` protos without TensorFlow, many records per call.

Parsing one protobuf object per record costs microseconds of Python each; instead the wire format
is walked level by level (Example, Features, map entry, Feature, value list) and, at each level,
every message of every record advances in lockstep: one numpy step reads the next tag and length
at all current positions. Packed varints of all records are decoded at once. Python loops run per
nesting level, per field position and per feature name, never per record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.tfrecord.protowire import RecordErrors, packed_varints, varints_at

__all__ = ["DecodedFeature", "decode_examples"]

_KINDS = {1: "bytes", 2: "float", 3: "int64"}


@dataclass(frozen=True, eq=False)
class DecodedFeature:
    """One feature across N records as ragged arrays (the layout of ``tf.RaggedTensor``).

    ``values[row_splits[i]:row_splits[i+1]]`` are record i's values for int64 and float. For bytes,
    ``row_splits`` indexes elements and element j is ``values[value_splits[j]:value_splits[j+1]]``.
    """

    kind: str
    values: np.ndarray
    row_splits: np.ndarray
    value_splits: np.ndarray | None
    present: np.ndarray

    def single_bytes(
        self, *, path: str | os.PathLike[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(flat bytes, per-record byte offsets [N+1]) when every record holds exactly one bytes value,
        as a ``FixedLenFeature([], tf.string)`` writes it."""
        if self.kind != "bytes":
            raise FormatError(path, f"feature is {self.kind}, not bytes")
        counts = np.diff(self.row_splits)
        bad = np.flatnonzero(counts != 1)
        if len(bad):
            i = int(bad[0])
            raise FormatError(
                path,
                f"record holds {int(counts[i])} bytes values, expected exactly 1",
                record=i,
                hint="use row_splits/value_splits for lists of bytes",
            )
        return self.values, self.value_splits


def decode_examples(
    buf: np.ndarray | bytes,
    starts: np.ndarray,
    ends: np.ndarray,
    *,
    path: str | os.PathLike[str] | None = None,
    frame_offsets: np.ndarray | None = None,
) -> dict[str, DecodedFeature]:
    """Decode the Examples at ``buf[starts[i]:ends[i]]`` into one DecodedFeature per feature name.

    Spans may come in any order and repeat. Errors name ``path`` and the byte offset of the bad
    record (``frame_offsets[i]`` when given, else ``starts[i]``). Feature order is that of first
    appearance; a feature never given a list kind decodes as empty bytes.
    """
    buf = (
        np.frombuffer(buf, np.uint8)
        if isinstance(buf, (bytes, bytearray, memoryview))
        else np.asarray(buf)
    )
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ConfigError(f"buf must be a 1-D uint8 array, got {buf.dtype} with shape {buf.shape}")
    starts = np.asarray(starts, dtype=np.int64).ravel()
    ends = np.asarray(ends, dtype=np.int64).ravel()
    n = len(starts)
    if len(ends) != n:
        raise ConfigError(f"starts and ends differ in length ({n} and {len(ends)})")
    if n and (starts.min() < 0 or ends.max() > len(buf) or np.any(ends < starts)):
        raise ConfigError(f"record spans must satisfy 0 <= start <= end <= len(buf) = {len(buf)}")
    where = starts if frame_offsets is None else np.asarray(frame_offsets, dtype=np.int64)[:n]
    w = RecordErrors(path, where)
    first = buf[starts[0] : ends[0]].tobytes() if n else b""
    from dlpipe.formats.tfrecord.example_layout import follow_plan, same_bytes
    from dlpipe.formats.tfrecord.example_layout import plan as layout_plan

    plan = layout_plan(first)
    if plan is not None:
        spans = same_bytes(buf, starts, ends, first, plan) or follow_plan(buf, starts, ends, plan)
        if spans is not None:
            full = np.ones(n, dtype=bool)
            return {
                name: _decode_rows(buf, s, t, rec, kind, full, w, name)
                for (name, kind, _), (s, t, rec) in zip(plan, spans)
            }
    rec = np.arange(n, dtype=np.int64)

    # Example.features (field 1); repeated occurrences merge, which is what concatenation means.
    m, f, wt, s, t = _walk(buf, starts, ends, rec, w)
    sel = _fields(w, rec[m], f, wt, 1, "Example.features")
    fs, ft, frec = s[sel], t[sel], rec[m[sel]]
    # Features.feature (field 1): map entries, each its own message.
    m, f, wt, s, t = _walk(buf, fs, ft, frec, w)
    sel = _fields(w, frec[m], f, wt, 1, "Features.feature")
    es, et, erec = s[sel], t[sel], frec[m[sel]]
    # Map entry: key (field 1, last wins) and value (field 2, occurrences merge).
    m, f, wt, s, t = _walk(buf, es, et, erec, w)
    ks = es.copy()
    kt = es.copy()  # a missing key is the empty string
    kr = _fields(w, erec[m], f, wt, 1, "map entry key")
    last = _last_of_runs(m[kr])
    ks[m[kr][last]] = s[kr][last]
    kt[m[kr][last]] = t[kr][last]
    vr = _fields(w, erec[m], f, wt, 2, "map entry value")
    vs, vt, vown = s[vr], t[vr], m[vr]
    ids, names = _key_ids(buf, ks, kt)
    alive = _last_per_key(erec, ids, len(names))
    # Feature: oneof bytes_list=1, float_list=2, int64_list=3. A later different member replaces
    # the earlier; repeats of the same member merge.
    m, f, wt, s, t = _walk(buf, vs, vt, erec[vown], w)
    sel = np.flatnonzero((f >= 1) & (f <= 3))
    bad = sel[wt[sel] != 2]
    if len(bad):
        w.fail(
            erec[vown[m[bad]]], "Feature list has the wrong wire type (expected length-delimited)"
        )
    own, fk = vown[m[sel]], f[sel]
    ekind = np.zeros(len(es), dtype=np.int64)
    if len(sel):
        seg = np.cumsum(np.r_[True, (own[1:] != own[:-1]) | (fk[1:] != fk[:-1])]) - 1
        last = _last_of_runs(own)
        last_seg = np.zeros(len(es), dtype=np.int64)
        last_seg[own[last]] = seg[last]
        ekind[own[last]] = fk[last]
        keep = seg == last_seg[own]
        sel, own = sel[keep], own[keep]
    ls, lt = s[sel], t[sel]
    efeat = np.where(alive, ids, -1)

    out = {}
    for k, name in enumerate(names):
        ents = np.flatnonzero(efeat == k)
        if len(ents) == 0:
            continue
        kinds = ekind[ents]
        set_kinds = kinds[kinds != 0]
        kind = int(set_kinds[0]) if len(set_kinds) else 1
        odd = np.flatnonzero((kinds != 0) & (kinds != kind))
        if len(odd):
            w.fail(
                erec[ents[odd]],
                f"feature {name!r} is {_KINDS[int(kinds[odd[0]])]} here but "
                f"{_KINDS[kind]} in record {int(erec[ents[kinds == kind][0]])}",
                hint="every record must store a feature with the same list type",
            )
        present = np.zeros(n, dtype=bool)
        present[erec[ents]] = True
        lsel = np.flatnonzero(efeat[own] == k)
        out[name] = _decode_lists(buf, ls[lsel], lt[lsel], erec[own[lsel]], kind, present, w, name)
    return out


def _decode_lists(buf, ls, lt, lrec, kind, present, w, name) -> DecodedFeature:
    """The values of one feature's list messages (``lrec`` is each list's record, sorted)."""
    m, f, wt, s, t = _walk(buf, ls, lt, lrec, w)
    sel = np.flatnonzero(f == 1)
    wire, s, t, rrec = wt[sel], s[sel], t[sel], lrec[m[sel]]
    allowed = {1: (2,), 2: (2, 5), 3: (0, 2)}[kind]
    bad = ~np.isin(wire, allowed)
    if bad.any():
        w.fail(
            rrec[bad], f"feature {name!r}: {_KINDS[kind]} value has wire type {int(wire[bad][0])}"
        )
    return _decode_rows(buf, s, t, rrec, kind, present, w, name)


def _decode_rows(buf, s, t, rrec, kind, present, w, name) -> DecodedFeature:
    """Values from value rows ``buf[s[j]:t[j]]`` of record ``rrec[j]``: bytes elements, packed or
    single floats, packed or single varints (a single value is a packed list of one)."""
    n = len(present)
    flat, offs = _gather(buf, s, t)
    if kind == 1:
        row_splits = _splits(np.bincount(rrec, minlength=n))
        return DecodedFeature("bytes", flat, row_splits, offs, present)
    if kind == 2:
        sizes = np.diff(offs)
        odd = sizes % 4 != 0
        if odd.any():
            w.fail(rrec[odd], f"feature {name!r}: packed float list of {int(sizes[odd][0])} bytes")
        values = flat.view("<f4").astype(np.float32, copy=False)
        counts = sizes // 4
    else:
        values, counts = packed_varints(flat, offs, rrec, w, name)
    row_splits = _splits(np.bincount(rrec, weights=counts, minlength=n).astype(np.int64))
    return DecodedFeature(_KINDS[kind], values, row_splits, None, present)


def _walk(buf, start, stop, rec, w):
    """Every field of the messages ``buf[start[j]:stop[j]]``, grouped by message in order.

    Returns (message index, field number, wire type, value start, value stop); the value span is
    the varint's bytes for wire type 0, the payload for 2, and the 8 or 4 bytes for 1 and 5.
    """
    pos = start.copy()
    idx = np.flatnonzero(pos < stop)
    rounds = []
    while len(idx):
        p, e, r = pos[idx], stop[idx], rec[idx]
        tag, p = varints_at(buf, p, e, r, w)
        field = (tag >> np.uint64(3)).astype(np.int64)
        wire = (tag & np.uint64(7)).astype(np.int64)
        if np.any(field == 0):
            w.fail(r[field == 0], "field number 0 (invalid protobuf)")
        vstart, vstop = p, p.copy()  # p is a fresh array
        for wt, size in ((1, 8), (5, 4)):
            vstop[wire == wt] += size
        v0 = np.flatnonzero(wire == 0)
        if len(v0):
            vstop[v0] = varints_at(buf, p[v0], e[v0], r[v0], w)[1]
        v2 = np.flatnonzero(wire == 2)
        if len(v2):
            length, q = varints_at(buf, p[v2], e[v2], r[v2], w)
            over = length > (e[v2] - q).astype(np.uint64)
            if over.any():
                w.fail(r[v2][over], "a length-delimited field runs past the end of its message")
            vstart[v2] = q
            vstop[v2] = q + length.astype(np.int64)
        odd = (wire != 0) & (wire != 1) & (wire != 2) & (wire != 5)
        if odd.any():
            w.fail(
                r[odd],
                f"unsupported wire type {int(wire[odd][0])} (groups are not used by Example)",
            )
        if np.any(vstop > e):
            w.fail(r[vstop > e], "a fixed-width field runs past the end of its message")
        pos[idx] = vstop
        rounds.append((idx, field, wire, vstart, vstop))
        idx = idx[vstop < e]
    if not rounds:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z, z
    if len(rounds) == 1:
        return rounds[0]
    # Round k holds the k-th field of each message still active; place it at offset[msg] + k.
    counts = np.zeros(len(start), dtype=np.int64)
    for idx, *_ in rounds:
        counts[idx] += 1
    first = np.cumsum(counts) - counts
    cols = [np.empty(int(counts.sum()), dtype=np.int64) for _ in range(5)]
    for k, rnd in enumerate(rounds):
        dest = first[rnd[0]] + k
        for col, arr in zip(cols, rnd):
            col[dest] = arr
    return tuple(cols)


def _fields(w, recs, field, wire, number: int, what: str) -> np.ndarray:
    """Rows holding field ``number``, which must be length-delimited."""
    sel = np.flatnonzero(field == number)
    bad = sel[wire[sel] != 2]
    if len(bad):
        w.fail(
            recs[bad], f"{what} has wire type {int(wire[bad[0]])}, expected 2 (length-delimited)"
        )
    return sel


def _last_of_runs(keys: np.ndarray) -> np.ndarray:
    """Mask of the last row of each run of equal, sorted ``keys``."""
    return np.r_[keys[1:] != keys[:-1], True] if len(keys) else np.zeros(0, dtype=bool)


def _splits(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _gather(buf, s, t) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``buf[s[i]:t[i]]``; return the bytes and the N+1 offsets of the pieces."""
    sizes = t - s
    offs = _splits(sizes)
    total = int(offs[-1])
    if total == 0:
        return np.zeros(0, dtype=np.uint8), offs
    if sizes.min() == sizes.max():  # padded data: every piece equally long, copy rows
        return sliding_window_view(buf, int(sizes[0]))[s].reshape(-1), offs
    lo, hi = int(s.min()), int(t.max())
    if total * 8 > hi - lo and np.all(s[1:] >= t[:-1]):
        # Sorted, disjoint and dense: a byte mask over the covered region beats an index array.
        nz = sizes > 0
        delta = np.zeros(hi - lo + 1, dtype=np.int8)
        delta[s[nz] - lo] += 1
        delta[t[nz] - lo] -= 1
        return buf[lo:hi][np.cumsum(delta[:-1], dtype=np.int8).view(bool)], offs
    idx = np.repeat(s - offs[:-1], sizes) + np.arange(total, dtype=np.int64)
    return buf[idx], offs


def _key_ids(buf, ks, kt) -> tuple[np.ndarray, list[str]]:
    """A small integer per distinct key, numbered in order of first appearance, and the names."""
    sizes = kt - ks
    if len(ks) == 0:
        return np.zeros(0, dtype=np.int64), []
    width = int(sizes.max())
    cols = np.arange(width, dtype=np.int64)
    mat = (
        buf[np.minimum(ks[:, None] + cols, len(buf) - 1)]
        if width
        else np.zeros((len(ks), 0), np.uint8)
    )
    mat = np.where(cols < sizes[:, None], mat, 0).astype(np.uint8)
    ids = np.full(len(ks), -1, dtype=np.int64)
    names: list[str] = []
    todo = np.arange(len(ks))
    while len(todo) and len(names) < 64:  # few names in practice: compare against each
        j = todo[0]
        hit = (sizes[todo] == sizes[j]) & np.all(mat[todo] == mat[j], axis=1)
        ids[todo[hit]] = len(names)
        names.append(bytes(mat[j, : sizes[j]]).decode("utf-8", "backslashreplace"))
        todo = todo[~hit]
    if len(todo):  # many distinct names: sort them instead
        rows = np.concatenate(
            [sizes[todo, None].astype("<i8").view(np.uint8).reshape(-1, 8), mat[todo]], 1
        )
        uniq, first, inv = np.unique(
            np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").ravel(),
            return_index=True,
            return_inverse=True,
        )
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        ids[todo] = len(names) + rank[inv.ravel()]
        for u in order:
            j = todo[first[u]]
            names.append(bytes(mat[j, : sizes[j]]).decode("utf-8", "backslashreplace"))
    return ids, names


def _last_per_key(erec, ids, nkeys) -> np.ndarray:
    """Mask of the map entries that count: a later entry with the same key replaces an earlier one."""
    if len(ids) == 0:
        return np.zeros(0, dtype=bool)
    comp = erec * max(nkeys, 1) + ids
    if np.all(comp[1:] > comp[:-1]):  # keys in the same order in every record: no repeats
        return np.ones(len(ids), dtype=bool)
    _, first_rev = np.unique(comp[::-1], return_index=True)
    alive = np.zeros(len(ids), dtype=bool)
    alive[len(ids) - 1 - first_rev] = True
    return alive
