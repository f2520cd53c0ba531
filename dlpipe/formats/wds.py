"""WebDataset shards: tar archives of ``.npy`` members, written and read many samples per call.

Layout: one sample per record, keyed by the record id as ``f"{id:010d}"``, holding one member
``{key}.{column}.npy`` per column (columns in name order) with the record's real values in the
column's storage dtype (padding removed). ``webdataset.WebDataset(url).decode()`` and
``datasets.load_dataset("webdataset")`` both turn such members into arrays with no dlpipe code.

Why this layout. A tar member costs at least 1 KiB (a 512-byte header, data padded to 512), so
small records are dominated by overhead and shards want ``.tar.gz``. Measured on 20k records of
the DeepCAL shape (codes uint8, lengths uniform 5..40; labels float32[2]; bytes/record; gzip at
levels 1/6/9; the TFRecord of the same records is 83.5 B raw, 39.1 B gzipped)::

    layout (members per sample)        tar    gz1    gz6    gz9   both readers give
    .npy per column (2)               2048   88.8   67.9   60.3   arrays, storage dtype  <- chosen
    .npz per sample (1)               1536  107.8   89.9   84.4   dict of arrays
    .json per sample (1)              1024   97.1   80.1   75.8   lists; int64/float64 (HF)
    .ten (tenbin) per sample (1)      1024   67.1   51.8   47.3   HF: list<list<float32>>, lossy

(Codes from a 52-letter alphabet instead of random bytes: npy 62.6 B at gz6. The geonames strings
of ``bench/corpus.py``, 20k records, uint16 codes, via ``dlpipe.reshard``: TFRecord 105.4 B,
``.tar.gz`` 65.0 B.)
Gzip removes what tar adds: headers of consecutive members differ only in key digits, size and
checksum, and the zero padding is a back-reference. ``.npy`` per column gives 0.81x the raw
TFRecord at gz6 (target: <= 2x) and is the only layout that both readers return in the stored
dtype, column by column; ``.ten`` is smaller but HF flattens it to float32 (int64 ids above 2**24
would change) and drops the column names; ``.json`` cannot be written vectorized (shortest float
repr). Raw ``.tar`` costs 1 KiB per member (25x TFRecord): choose it only where seeking matters.
Speed on one core (DeepCAL-like corpus, 8k-sample batches): encoding ~600k samples/s (1.2 GB/s
of tar). zlib's gzip level 6 ran at ~190 MB/s of tar (~95k records/s) and set the pace; the
shard writer now deflates with ISA-L when installed (``formats/deflate.py``: ~3 GB/s, 1.2x the
size of zlib level 6: ``.tar.gz`` ~1.0x the raw TFRecord instead of 0.8x).

Headers are built with numpy for all members at once (template row, key digits, octal size, the
checksum from the few fields written over the template). Every member starts on a 512-byte
block, so samples are laid out as rows of 512 bytes and each row is written once: headers, then
``.npy`` header + values + zero padding per member. Bytes are deterministic: ustar, mode 0644,
uid/gid 0, mtime 0, empty uname/gname, as Python's ``tarfile`` writes them.
Note ``webdataset`` lowercases field names (a column ``Label`` arrives as ``label.npy``).
"""

from __future__ import annotations

import io
import os
from typing import NoReturn

import numpy as np

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.errors import ConfigError, FormatError

__all__ = ["TAR_END", "encode_samples", "read_samples"]

BLOCK = 512
TAR_END = bytes(2 * BLOCK)  # end-of-archive: two zero blocks, appended when a shard is closed
_NAME_MAX = 100  # ustar name field; longer names would need the prefix field, which splits keys
_HINT = "the shard is corrupt or was not written by dlpipe; rewrite it with `dlpipe reshard`"


# name[100] mode uid gid size[12] mtime[12] checksum (spaces while summed) type=file, then magic
_TEMPLATE = np.frombuffer(
    bytes(100) + b"0000644\0" + b"0000000\0" * 2 + bytes(12) + b"00000000000\0" + b" " * 8 + b"0"
    + bytes(100) + b"ustar\x0000" + bytes(247),
    np.uint8,
)  # fmt: skip
_TEMPLATE_SUM = int(_TEMPLATE.sum())
_OCT11 = np.uint64(3) * np.arange(10, -1, -1, dtype=np.uint64)
_OCT6 = np.uint64(3) * np.arange(5, -1, -1, dtype=np.uint64)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


def _decimal(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded decimal digits (at least 10) of each key: an (n, width) block and lengths."""
    ndig = np.full(len(keys), 10, np.int64)
    u = keys.astype(np.uint64)
    for d in range(10, 20):
        ndig += u >= np.uint64(10**d)
    width = int(ndig.max())
    exps = ndig[:, None] - 1 - np.arange(width)
    pow10 = np.uint64(10) ** np.maximum(exps, 0).astype(np.uint64)
    digits = ((u[:, None] // pow10) % np.uint64(10)).astype(np.uint8) + np.uint8(48)
    return np.where(exps >= 0, digits, np.uint8(0)), ndig


def _tar_headers(key_block, key_len, suffix: bytes, size: np.ndarray) -> np.ndarray:
    """(n, 512) ustar headers for members named ``{key}{suffix}`` of ``size`` bytes."""
    n = len(size)
    hdr = np.empty((n, BLOCK), np.uint8)
    hdr[:] = _TEMPLATE
    hdr[:, : key_block.shape[1]] = key_block
    sfx = np.frombuffer(suffix, np.uint8)
    lens = np.unique(key_len).tolist()  # at most 10 digit counts
    for d in lens:
        rows = slice(None) if len(lens) == 1 else key_len == d
        hdr[rows, d : d + len(sfx)] = sfx
    u = size.astype(np.uint64)
    octal = ((u[:, None] >> _OCT11) & np.uint64(7)).astype(np.uint8) + np.uint8(48)
    hdr[:, 124:135] = octal
    # the checksum is the sum of every byte: the template's (name and size fields are zero there)
    # plus what was written over it, without summing 512 bytes per header
    chk = key_block.sum(axis=1, dtype=np.uint64) + octal.sum(axis=1, dtype=np.uint64)
    chk += np.uint64(_TEMPLATE_SUM + int(sfx.sum()))
    hdr[:, 148:154] = ((chk[:, None] >> _OCT6) & np.uint64(7)).astype(np.uint8) + np.uint8(48)
    hdr[:, 154] = 0
    return hdr


def _member_data(name, enc: ColumnEncoding, col: ColumnBatch) -> tuple[np.ndarray, np.ndarray]:
    """One column's member data in every sample, as (n, k * 512) rows (``.npy`` header, values,
    zeros to the row's end) and the member sizes (``.npy`` header and values) in bytes."""
    n = len(col.data)
    storage = np.dtype(enc.storage_dtype).newbyteorder("<")
    data = np.ascontiguousarray(col.data.reshape(n, -1), dtype=storage)
    block = data.view(np.uint8).reshape(n, -1)
    width = data.shape[1]
    if enc.variable:
        elems = (
            np.full(n, width, np.int64) if col.elems is None else np.asarray(col.elems, np.int64)
        )
        bad = (elems < 0) | (elems > width) | (elems % enc.inner != 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"column {name!r}: elems[{i}]={int(elems[i])} must be a multiple of {enc.inner} in 0..{width}"
            )
        steps, inverse = np.unique(elems // enc.inner, return_inverse=True)
        heads = [_npy_header(storage, (s, *enc.shape[1:])) for s in steps.tolist()]
        inverse = inverse.ravel()
        nbytes = elems * storage.itemsize
    else:
        if width != enc.inner:
            raise ConfigError(
                f"column {name!r}: data has {width} values per record; shape {enc.shape} needs {enc.inner}"
            )
        heads = [_npy_header(storage, tuple(enc.shape))]
        inverse = np.zeros(n, np.int64)
        nbytes = np.full(n, block.shape[1], np.int64)
    hlen = np.array([len(h) for h in heads], np.int64)
    vw = block.shape[1]
    row = -(-(int(hlen.max()) + vw) // BLOCK) * BLOCK
    out = np.empty((n, row), np.uint8)
    partial = bool((nbytes < vw).any())
    keep = np.arange(vw) < nbytes[:, None] if partial else None
    for h in np.unique(hlen).tolist():  # .npy headers come in few lengths (most often one)
        which = np.flatnonzero(hlen == h)
        if len(which) == len(heads):
            rows, sel = slice(None), slice(None)
        else:
            sel = np.flatnonzero(np.isin(inverse, which))
            rows = sel
        table = np.stack([np.frombuffer(heads[i], np.uint8) for i in which.tolist()])
        target = out[rows]  # a view for all rows; a copy, put back below, for a subset
        target[:, :h] = table[0] if len(which) == 1 else table[np.searchsorted(which, inverse[sel])]
        if keep is None:
            target[:, h : h + vw] = block[sel]
        else:
            np.multiply(block[sel], keep[sel], out=target[:, h : h + vw], casting="unsafe")
        target[:, h + vw :] = 0
        if not isinstance(rows, slice):
            out[rows] = target
    return out, hlen[inverse] + nbytes


def encode_samples(
    batch: dict[str, ColumnBatch], encodings: dict[str, ColumnEncoding], keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tar bytes of n samples back to back (no end-of-archive) and the n+1 sample offsets.

    Offsets point at each sample's first member header, so a sample is a valid tar fragment
    and shards can be cut, indexed and concatenated on sample boundaries.
    """
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    if set(batch) != set(encodings):
        raise ConfigError(
            f"batch columns {sorted(batch)} differ from encodings {sorted(encodings)}"
        )
    for name in encodings:
        if not name or "/" in name or "\0" in name:
            raise ConfigError(f"column name {name!r} cannot name a tar member (empty, '/' or NUL)")
    if n == 0:
        return np.empty(0, np.uint8), np.zeros(1, np.int64)
    if int(keys.min()) < 0:
        raise ConfigError(f"keys must be non-negative record ids; got {int(keys.min())}")
    key_block, key_len = _decimal(keys)
    members = []
    for name in sorted(encodings):
        suffix = f".{name}.npy".encode()
        if int(key_len.max()) + len(suffix) > _NAME_MAX:
            raise ConfigError(
                f"column name {name!r} is too long for a tar member name (100 bytes with the key)"
            )
        data, size = _member_data(name, encodings[name], batch[name])
        members.append((_tar_headers(key_block, key_len, suffix, size), data, -(-size // BLOCK)))
    # every member starts on a block: lay the samples out as 512-byte rows, each written once
    blocks = sum(1 + nb for _, _, nb in members)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(blocks, out=starts[1:])
    out = np.empty((int(starts[-1]), BLOCK), np.uint8)
    at = starts[:-1].copy()
    for hdr, data, nb in members:
        out[at] = hdr
        at += 1
        k = data.shape[1] // BLOCK
        if k == 1:
            out[at] = data
        else:
            rows = data.reshape(n, k, BLOCK)
            dst = at[:, None] + np.arange(k)
            if (nb == k).all():
                out[dst] = rows
            else:
                used = np.arange(k) < nb[:, None]
                out[dst[used]] = rows[used]
        at += nb
    return out.reshape(-1), starts * BLOCK


# ---------------------------------------------------------------------------------------------
# reading


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


def _fail(path, message: str, offset: int, hint: str = _HINT) -> NoReturn:
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
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Parse a (decompressed) dlpipe tar stream: sample keys, and per column the flat values in
    the logical dtype with int64 row_splits (n+1, in elements).

    ``sample_offsets`` (each sample's start, optionally followed by the end), as in a shard's
    ``.index``, lets every sample be walked at once; without it members are walked one by one.
    Checksums, sizes, names and ``.npy`` headers are all checked: malformed data raises
    ``FormatError`` with the byte offset of the member at fault.
    """
    if not (isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1):
        buf = np.frombuffer(buf, np.uint8)  # bytes, or np.asarray(bytes): a 0-d bytes array
    names = sorted(encodings)
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
        return no, {c: _decode_npy(buf, no, no, encodings[c], path) for c in names}
    size, _ = _octal(hdr[:, 124:136])
    wrong = ~((hdr[:, 156] == 48) | (hdr[:, 156] == 0)) | hdr[:, 345:500].any(axis=1)
    wrong |= ~(hdr[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
    for i in np.flatnonzero(wrong)[:1].tolist():
        _fail(path, "member is not a plain ustar file with a short name", starts[i])

    member = np.ascontiguousarray(hdr[:, :_NAME_MAX]).view(f"S{_NAME_MAX}").ravel()
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
