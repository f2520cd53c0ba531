"""Writing WebDataset shards: a batch of stripped records as tar samples, every header and
member of every sample built at once (the layout is ``layout.py``'s)."""

from __future__ import annotations

import numpy as np

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.formats.webdataset.layout import BLOCK, NAME_MAX, decimal_keys, npy_header, tar_headers

__all__ = ["encode_samples"]


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
        lengths, inverse = np.unique(elems // enc.inner, return_inverse=True)
        heads = [npy_header(storage, (s, *enc.shape[1:])) for s in lengths.tolist()]
        inverse = inverse.ravel()
        nbytes = elems * storage.itemsize
    else:
        if width != enc.inner:
            raise ConfigError(
                f"column {name!r}: data has {width} values per record; shape {enc.shape} needs {enc.inner}"
            )
        heads = [npy_header(storage, tuple(enc.shape))]
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
    key_block, key_len = decimal_keys(keys)
    members = []
    for name in sorted(encodings):
        suffix = f".{name}.npy".encode()
        if int(key_len.max()) + len(suffix) > NAME_MAX:
            raise ConfigError(
                f"column name {name!r} is too long for a tar member name (100 bytes with the key)"
            )
        data, size = _member_data(name, encodings[name], batch[name])
        members.append((tar_headers(key_block, key_len, suffix, size), data, -(-size // BLOCK)))
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
