"""The WebDataset shard layout: tar archives of ``.npy`` members (``writer.py`` writes them and
``reader.py`` parses them, many samples per call; the package's ``WEBDATASET`` is the format object).

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

import numpy as np

__all__ = ["BLOCK", "HINT", "NAME_MAX", "TAR_END", "decimal_keys", "npy_header", "tar_headers"]

BLOCK = 512
TAR_END = bytes(2 * BLOCK)  # end-of-archive: two zero blocks, appended when a shard is closed
NAME_MAX = 100  # ustar name field; longer names would need the prefix field, which splits keys
HINT = "the shard is corrupt or was not written by dlpipe; rewrite it with `dlpipe reshard`"


# name[100] mode uid gid size[12] mtime[12] checksum (spaces while summed) type=file, then magic
_TEMPLATE = np.frombuffer(
    bytes(100) + b"0000644\0" + b"0000000\0" * 2 + bytes(12) + b"00000000000\0" + b" " * 8 + b"0"
    + bytes(100) + b"ustar\x0000" + bytes(247),
    np.uint8,
)  # fmt: skip
_TEMPLATE_SUM = int(_TEMPLATE.sum())
_OCT11 = np.uint64(3) * np.arange(10, -1, -1, dtype=np.uint64)
_OCT6 = np.uint64(3) * np.arange(5, -1, -1, dtype=np.uint64)


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The version 1.0 ``.npy`` header of a C-order array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


def decimal_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def tar_headers(key_block, key_len, suffix: bytes, size: np.ndarray) -> np.ndarray:
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
