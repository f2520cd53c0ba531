"""Reading WebDataset shards: a (decompressed) tar stream of dlpipe samples parsed into ragged
columns, every header of every sample checked at once."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.base import Ragged, concat_columns
from dlpipe.formats.webdataset.layout import BLOCK, HINT, NAME_MAX

__all__ = ["decode_runs", "read_samples", "verify_records"]


def _octal(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of (m, w) tar octal fields (leading spaces, digits, NUL/space terminators), and a
    per-row flag for fields that are not of that form."""
    is_digit = (field >= 48) & (field <= 55)
    is_term = (field == 0) | (field == 32)
    seen = np.maximum.accumulate(is_digit, axis=1)
    ended = np.maximum.accumulate(seen & ~is_digit, axis=1)
    bad = (~(is_digit | is_term)).any(axis=1) | (ended & is_digit).any(axis=1)
    value = np.zeros(len(field), np.int64)
    take = is_digit & ~ended
    for j in range(field.shape[1]):
        value = np.where(take[:, j], value * 8 + (field[:, j].astype(np.int64) - 48), value)
    return value, bad


def _fail(path, message: str, offset: int, hint: str = HINT) -> NoReturn:
    raise FormatError(path, message, offset=int(offset), hint=hint)


def _walk(buf: np.ndarray, path) -> tuple[np.ndarray, FormatError | None]:
    """Header offsets of every member, following sizes from the start (one step per member).

    A failure is returned, not raised, so the caller can first blame a bad checksum among the
    members walked: a corrupt size field shows up later, where the walk loses its way.
    """
    mv, end, o, starts = memoryview(buf), len(buf), 0, []
    zero = bytes(BLOCK)
    try:
        while o < end:
            if o + BLOCK > end:
                _fail(path, f"truncated tar header ({end - o} of {BLOCK} bytes)", o)
            if mv[o] == 0 and mv[o : o + BLOCK] == zero:  # end-of-archive
                if buf[o:].any():
                    _fail(path, "data after the end-of-archive blocks", o)
                break
            field = bytes(mv[o + 124 : o + 136]).strip(b"\0 ")
            try:
                size = int(field or b"0", 8)
            except ValueError:
                _fail(path, f"tar header size field {field!r} is not octal", o)
            starts.append(o)
            o += BLOCK + -(-size // BLOCK) * BLOCK
            if o > end:
                _fail(path, f"tar member of {size} B runs past the end (truncated)", starts[-1])
    except FormatError as e:
        return np.array(starts, np.int64), e
    return np.array(starts, np.int64), None


def _walk_samples(buf: np.ndarray, offsets: np.ndarray, members: int, path) -> np.ndarray:
    """Header offsets when the n+1 sample offsets are known: all samples step through their
    members in lockstep, one numpy step per column."""
    offsets = np.asarray(offsets, np.int64)
    if (
        offsets.ndim != 1
        or len(offsets) < 1
        or (np.diff(offsets) < 0).any()
        or (offsets % BLOCK).any()
        or offsets[-1] > len(buf)
    ):
        raise ConfigError(
            "sample_offsets must be n+1 non-decreasing, 512-aligned byte offsets within buf"
        )
    cur = offsets[:-1].copy()
    out = np.empty((len(cur), members), np.int64)
    for j in range(members):
        over = np.flatnonzero(cur + BLOCK > len(buf))
        if len(over):
            _fail(path, "truncated tar header", cur[over[0]])
        out[:, j] = cur
        size, bad = _octal(buf[cur[:, None] + np.arange(124, 136)])
        if bad.any():
            _fail(path, "tar header size field is not octal", cur[np.flatnonzero(bad)[0]])
        cur = cur + BLOCK + -(-size // BLOCK) * BLOCK
        over = np.flatnonzero(cur > len(buf))
        if len(over):
            _fail(path, "tar member runs past the end of the data (truncated)", out[over[0], j])
    for i in np.flatnonzero(cur != offsets[1:])[:1].tolist():
        _fail(path, f"sample is not {members} members long, as sample_offsets say", offsets[i])
    return out.ravel()


def _rows(buf: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """``buf[at[i]:at[i]+width]`` as rows; block-aligned reads take whole 512-byte blocks at once
    rather than building a byte index per element."""
    if width <= BLOCK and not (at % BLOCK).any():
        blocks = buf[: len(buf) // BLOCK * BLOCK].reshape(-1, BLOCK)
        return blocks[at // BLOCK, :width]
    return buf[at[:, None] + np.arange(width)]


def _gather(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``buf[starts[i]:starts[i]+lengths[i]]`` for every i, concatenated, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.uint8)
    ends = np.cumsum(lengths)
    return buf[np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)]


def read_samples(
    buf: np.ndarray,
    encodings: dict[str, ColumnEncoding],
    *,
    path: str | os.PathLike[str] | None = None,
    sample_offsets: np.ndarray | None = None,
    stored: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Parse a (decompressed) dlpipe tar stream: sample keys, and per column the flat values in
    the logical dtype with int64 row_splits (n+1, in elements).

    ``sample_offsets`` (each sample's start, optionally followed by the end), as in a shard's
    ``.index``, lets every sample be walked at once; without it members are walked one by one.
    Checksums, sizes, names and ``.npy`` headers are all checked: malformed data raises
    ``FormatError`` with the byte offset of the member at fault. ``stored`` names every column a
    sample holds when ``encodings`` selects only some of them (the others are checked, not decoded).
    """
    if not (isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1):
        buf = np.frombuffer(buf, np.uint8)  # bytes, or np.asarray(bytes): a 0-d bytes array
    names = sorted(stored if stored is not None else encodings)
    walk_error = None
    if sample_offsets is None:
        starts, walk_error = _walk(buf, path)
    else:
        starts = _walk_samples(buf, sample_offsets, len(names), path)
    hdr = _rows(buf, starts, BLOCK)
    stored, bad = _octal(hdr[:, 148:156])
    computed = hdr.sum(axis=1, dtype=np.int64) - hdr[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    for i in np.flatnonzero(bad | (stored != computed))[:1].tolist():
        got, want = int(stored[i]), int(computed[i])
        _fail(path, f"tar header checksum mismatch (stored {got:o}, computed {want:o})", starts[i])
    if walk_error is not None:
        raise walk_error
    if len(starts) == 0:
        no = np.zeros(0, np.int64)
        return no, {c: _decode_npy(buf, no, no, encodings[c], path) for c in names if c in encodings}
    size, _ = _octal(hdr[:, 124:136])
    wrong = ~((hdr[:, 156] == 48) | (hdr[:, 156] == 0)) | hdr[:, 345:500].any(axis=1)
    wrong |= ~(hdr[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
    for i in np.flatnonzero(wrong)[:1].tolist():
        _fail(path, "member is not a plain ustar file with a short name", starts[i])

    member = np.ascontiguousarray(hdr[:, :NAME_MAX]).view(f"S{NAME_MAX}").ravel()
    key_str, _, rest = np.char.partition(member, b".").T
    digits = np.char.str_len(key_str)
    ok = np.char.isdigit(key_str) & (
        (digits < 19) | ((digits == 19) & (key_str <= b"9223372036854775807"))
    )
    for i in np.flatnonzero(~ok)[:1].tolist():
        _fail(path, f"member {member[i]!r} does not start with a numeric key", starts[i])
    keys = key_str.astype(np.int64)
    wanted = {f"{c}.npy".encode(): j for j, c in enumerate(names)}
    uniq, inv = np.unique(rest, return_inverse=True)
    col = np.array([wanted.get(u, -1) for u in uniq.tolist()], np.int64)[inv.ravel()]
    for i in np.flatnonzero(col < 0)[:1].tolist():
        _fail(path, f"member {member[i]!r} is not one of the columns {names}", starts[i])

    new_sample = np.r_[True, keys[1:] != keys[:-1]]  # consecutive members of one key, as webdataset
    first = np.flatnonzero(new_sample)
    counts = np.zeros((len(first), len(names)), np.int64)
    np.add.at(counts, (np.cumsum(new_sample) - 1, col), 1)
    for s in np.flatnonzero((counts != 1).any(axis=1))[:1].tolist():
        bad_key = keys[first[s]]
        _fail(path, f"sample {bad_key} lacks or repeats one of {names}", starts[first[s]])

    columns = {}
    for j, name in enumerate(names):
        if name not in encodings:
            continue
        sel = np.flatnonzero(col == j)  # one per sample, in sample order
        columns[name] = _decode_npy(buf, starts[sel] + BLOCK, size[sel], encodings[name], path)
    return keys[first], columns


def _decode_npy(buf, data_at, size, enc: ColumnEncoding, path) -> tuple[np.ndarray, np.ndarray]:
    """Flat values (logical dtype) and row_splits of one ``.npy`` member per sample."""
    n = len(data_at)
    storage = np.dtype(enc.storage_dtype).newbyteorder("<")
    if n == 0:
        return np.empty(0, np.dtype(enc.dtype)), np.zeros(1, np.int64)
    small = np.flatnonzero(size < 10)
    if len(small):
        _fail(path, "member too short for a .npy header", data_at[small[0]] - BLOCK)
    lead = _rows(buf, data_at, 10).astype(np.int64)
    magic = (lead[:, :6] == np.frombuffer(b"\x93NUMPY", np.uint8)).all(axis=1) & (lead[:, 6] == 1)
    for i in np.flatnonzero(~magic)[:1].tolist():
        _fail(path, "member is not a version 1.0 .npy array", data_at[i] - BLOCK)
    hlen = lead[:, 8] + 256 * lead[:, 9]
    for i in np.flatnonzero(10 + hlen > size)[:1].tolist():
        _fail(path, ".npy header runs past the member", data_at[i] - BLOCK)
    width = int(hlen.max())
    text = _rows(buf, data_at, 10 + width)[:, 10:]
    text = np.where(np.arange(width) < hlen[:, None], text, np.uint8(0))
    text = np.ascontiguousarray(text).view(f"V{width}").ravel()
    uniq, where, inv = np.unique(text, return_index=True, return_inverse=True)
    elems_of = np.array(  # one parse per distinct shape
        [_check_npy(bytes(v)[: hlen[i]], hlen[i], storage, enc, path, data_at[i] - BLOCK)
         for v, i in zip(uniq.tolist(), where.tolist())],
        np.int64,
    )  # fmt: skip
    elems = elems_of[inv.ravel()]
    nbytes = elems * storage.itemsize
    for i in np.flatnonzero(10 + hlen + nbytes != size)[:1].tolist():
        _fail(path, f".npy data size disagrees with its header ({nbytes[i]} B)", data_at[i] - BLOCK)
    raw = _gather(buf, data_at + 10 + hlen, nbytes)
    values = raw.view(storage).astype(np.dtype(enc.dtype))
    row_splits = np.zeros(n + 1, np.int64)
    np.cumsum(elems, out=row_splits[1:])
    return values, row_splits


def _check_npy(text: bytes, hlen, storage: np.dtype, enc: ColumnEncoding, path, offset) -> int:
    """Elements of the array a ``.npy`` header describes, after checking it fits the column."""
    try:
        head = io.BytesIO(int(hlen).to_bytes(2, "little") + text)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    except ValueError as e:
        _fail(path, f"bad .npy header: {e}", offset)
    want = tuple(enc.shape[1:]) if enc.variable else tuple(enc.shape)
    got = tuple(shape[1:]) if enc.variable else tuple(shape)
    if dtype != storage or got != want or (enc.variable and len(shape) != len(enc.shape)):
        got, want = f"{dtype.str}{list(shape)}", f"{storage.str}{list(enc.shape)}"
        _fail(path, f"{enc.name!r} member holds {got}, expected {want}", offset)
    if fortran and len(shape) > 1:
        _fail(path, f"{enc.name!r} member is in Fortran order", offset)
    return int(np.prod(shape, dtype=np.int64))


def decode_runs(buf: np.ndarray, runs: list[np.ndarray], encodings: dict[str, ColumnEncoding], *,
                path: str, stored: Sequence[str] | None = None) -> dict[str, Ragged]:
    """The samples of ``runs`` (each the n + 1 offsets of consecutive samples in ``buf``, from the
    shard's index) as ragged columns of ``encodings``, one run after another."""
    parts = [read_samples(buf, encodings, path=path, sample_offsets=f, stored=stored)[1] for f in runs]
    return concat_columns([{n: p[n] for n in encodings} for p in parts], encodings)


def verify_records(buf: np.ndarray, columns: dict[str, ColumnEncoding], *, path: str) -> tuple[np.ndarray, None]:
    """Walk a whole shard, checking every header and member against ``columns``; return each
    record's tokens (positions of the first variable column; zeros without one) and None: the samples'
    offsets are not collected, so the index is checked by its length alone."""
    keys, decoded = read_samples(np.asarray(buf), columns, path=path)
    for name, enc in columns.items():
        if enc.variable:
            return np.diff(decoded[name][1]) // enc.inner, None
    return np.zeros(len(keys), dtype=np.int64), None
