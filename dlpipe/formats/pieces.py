"""Pieces: build many variable-length records at once from fixed-width parts.

Every record dlpipe writes is a concatenation of pieces (tags, varints, key bytes, a column's
payload) whose widths vary per record. A small piece is a ``(block, size)`` pair: ``block`` is an
``(n, w)`` uint8 array with row i holding record i's bytes left-aligned, ``size`` says how many
of them are real (None: all ``w``). A payload is a ``RaggedPiece`` instead (its real bytes back to
back, plus a length per record), so the work it costs follows the bytes that are real, not the
padded width of the widest record.

``assemble`` joins them without a Python loop over records. Records whose small pieces all have
the same sizes share one layout, and there are few layouts (a varint is 1, 2 or 3 bytes), so the
small pieces of each layout are laid side by side as one dense block; the payloads are then
interleaved with those bytes by a boolean mask over the output. Numpy copies masked bytes run
by run, so each step costs a few runs per record plus the bytes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    block: np.ndarray  # (n, w) uint8
    size: np.ndarray | None = None  # real bytes per record (a prefix of each row); None: all w

    @property
    def lengths(self) -> np.ndarray:
        n, w = self.block.shape
        if self.size is None:
            return np.full(n, w, dtype=np.int64)
        return np.asarray(self.size, dtype=np.int64)


@dataclass(frozen=True)
class RaggedPiece:
    """Record i's bytes are ``flat[offsets[i]:offsets[i+1]]`` (``lengths`` of them)."""

    flat: np.ndarray  # uint8
    lengths: np.ndarray  # int64, per record


def flat_rows(a: np.ndarray) -> np.ndarray:
    """``a`` as (n, everything else); unlike ``reshape(n, -1)`` it works when n or the row is 0."""
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))


def by_position(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` as (n, width, elements per position), for columns padded along their first axis."""
    inner = int(np.prod(a.shape[1:], dtype=np.int64)) // width if width else 1
    return a.reshape(a.shape[0], width, inner)


def constant(data: bytes, n: int) -> Piece:
    """The same bytes in every record."""
    row = np.frombuffer(data, dtype=np.uint8)
    return Piece(np.broadcast_to(row, (n, len(row))), None)


def prefix(block: np.ndarray, lengths: np.ndarray) -> Piece:
    """Row i's first ``lengths[i]`` bytes of ``block``."""
    return Piece(block, np.asarray(lengths, dtype=np.int64))


def _unsigned(values: np.ndarray) -> np.ndarray:
    """Values as the narrowest unsigned type that holds them (negative int64: two's complement)."""
    values = np.asarray(values)
    if values.dtype.kind == "u":
        return values
    if values.size and values.min() < 0:
        return values.astype(np.int64).view(np.uint64)
    hi = int(values.max()) if values.size else 0
    return values.astype(np.uint32 if hi < 2**32 else np.uint64, copy=False)


def running_total(sizes: np.ndarray) -> np.ndarray:
    """``[0, sizes[0], sizes[0] + sizes[1], ...]`` as int64 (offsets from sizes)."""
    out = np.empty(len(sizes) + 1, dtype=np.int64)
    out[0] = 0
    np.cumsum(sizes, dtype=np.int64, out=out[1:])
    return out


def _varint_size8(u: np.ndarray, hi: int | None = None) -> np.ndarray:
    """Bytes of the varint of each unsigned value (1..10) as uint8 (``hi``: the largest, if known)."""
    size = np.ones(u.shape, dtype=np.uint8)
    if hi is None:
        hi = int(u.max()) if u.size else 0
    k = 1
    while k < 10 and hi >= 1 << (7 * k):
        size += u >= u.dtype.type(1 << (7 * k))
        k += 1
    return size


def varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes of the protobuf varint of each value (1..10), with only the passes its range needs."""
    return _varint_size8(_unsigned(values)).astype(np.int64)


def varint_bytes(values: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Varint encoding of every value: an ``(..., width)`` uint8 array and the size of each.

    Negative int64 values are encoded as protobuf does: ten bytes of two's complement.
    """
    u = _unsigned(values)
    size = varint_size(u)
    if width is None:
        width = int(size.max()) if size.size else 1
    out = np.empty((*u.shape, width), dtype=np.uint8)
    for k in range(width):
        group = (u >> u.dtype.type(7 * k)) if k else u
        out[..., k] = (group & u.dtype.type(0x7F)).astype(np.uint8)
        if k < width - 1:
            out[..., k] |= (size > k + 1).view(np.uint8) << np.uint8(7)
    return out, size


def varint_stream(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The varints of ``values`` (1-D) back to back, and the bytes of each record, record i
    holding the next ``counts[i]`` values (int64).

    Same bytes as ``varint_bytes`` with each row cut to its size, without the padded block and
    its mask (a run per value). Every value's varint starts at a known offset, so its k-th bytes
    are placed with one scatter per k, from the last k down to the first: a write past the end
    of a shorter varint lands in a later one at a smaller k, which is then written over with the
    right byte. Few, narrow temporaries: fresh memory costs a page fault per 4 KiB.
    """
    values = np.asarray(values).ravel()
    counts = np.asarray(counts, dtype=np.int64)
    m = len(values)
    if m == 0:
        return np.empty(0, dtype=np.uint8), np.zeros(len(counts), dtype=np.int64)
    lo = int(values.min())
    # non-negative signed values shift and compare as they are; negative int64 as two's complement
    u = values if values.dtype.kind == "u" or lo >= 0 else values.astype(np.int64).view(np.uint64)
    hi = int(u.max())
    if hi < 128:  # one byte each, the value itself
        return u.astype(np.uint8), counts.copy()
    if u.dtype.itemsize > 4 and hi < 2**32:
        u = u.astype(np.uint32)  # narrower passes below
    size = _varint_size8(u, hi)
    width = _varint_width(hi)
    ends = np.empty(m + 1, dtype=np.int64)
    ends[0] = 0
    np.cumsum(size, dtype=np.int64, out=ends[1:])
    total = int(ends[-1])
    last = np.cumsum(counts)
    nbytes = ends[last] - ends[last - counts]
    starts = ends[:-1]
    out = np.empty(total + width, dtype=np.uint8)  # room for writes past the last varint
    at = np.empty(m, dtype=np.int64)  # scratch, reused for every k: positions
    shifted = np.empty(m, dtype=u.dtype)  # and the value's k-th 7-bit group
    group = np.empty(m, dtype=np.uint8)
    flag = np.empty(m, dtype=bool)
    for k in range(width - 1, -1, -1):
        rows = None  # every value, when most have a k-th byte
        if k:
            np.greater(size, k, out=flag)
            if np.count_nonzero(flag) < m // 4:
                rows = np.flatnonzero(flag)
        if rows is None:
            src, n_k = u, m
        else:
            src, n_k = u[rows], len(rows)
        g = group[:n_k]
        if k:
            np.right_shift(src, src.dtype.type(7 * k), out=shifted[:n_k])
            src = shifted[:n_k]
        np.copyto(g, src, casting="unsafe")  # the low byte
        if k < width - 1:
            g &= np.uint8(0x7F)
            more = np.greater(size if rows is None else size[rows], k + 1, out=flag[:n_k])
            g |= more.view(np.uint8) << np.uint8(7)
        if rows is None:
            np.add(starts, k, out=at)
            out[at] = g
        else:
            out[starts[rows] + k] = g
    return out[:total], nbytes


def _varint_width(x: int) -> int:
    """Bytes of the varint of one non-negative int."""
    return max(1, -(-x.bit_length() // 7))


def varint(values: np.ndarray) -> Piece:
    """A piece holding one varint per record (its size an int when the same in every record)."""
    values = np.asarray(values)
    if values.dtype.kind not in "iu" or not values.size or int(values.min()) < 0:
        block, size = varint_bytes(values)
        return prefix(block, size)
    lo, hi = int(values.min()), int(values.max())
    width = _varint_width(hi)
    u = values.astype(np.uint32 if hi < 2**32 else np.uint64, copy=False)
    size = None  # every record takes ``width`` bytes
    if _varint_width(lo) != width:
        size = np.ones(len(u), dtype=np.int64)
        for k in range(1, width):
            size += u >= u.dtype.type(1 << (7 * k))
    block = np.empty((len(u), width), dtype=np.uint8)
    for k in range(width):
        group = (u >> u.dtype.type(7 * k) if k else u).astype(np.uint8)
        if k < width - 1:  # bytes past a record's size are never written out
            group &= np.uint8(0x7F)
            group |= np.uint8(0x80) if size is None else (size > k + 1).view(np.uint8) << np.uint8(7)
        block[:, k] = group
    return Piece(block, size)


def piece_size(piece: Piece) -> int | np.ndarray:
    """Bytes of ``piece`` in each record: an int when the same in every record."""
    return piece.block.shape[1] if piece.size is None else piece.size


def optional(piece: Piece, keep: np.ndarray) -> Piece:
    """``piece`` in the records where ``keep`` is true, nothing in the others."""
    return Piece(piece.block, np.where(keep, piece.lengths, 0))


# Records of more distinct layouts than this are packed by a mask over every piece's bytes
_MAX_LAYOUTS = 32


def _sizes(pieces: list[Piece], n: int) -> list[int | np.ndarray]:
    """Each piece's real bytes: an int when the same in every record, else one per record."""
    out: list[int | np.ndarray] = []
    for p in pieces:
        if p.size is None:
            out.append(p.block.shape[1])
            continue
        size = np.asarray(p.size, dtype=np.int64)
        lo, hi = (int(size.min()), int(size.max())) if n else (0, 0)
        out.append(lo if lo == hi else size)
    return out


def _layout_parts(pieces: list[Piece], sizes: list[int], rows=None) -> list[np.ndarray]:
    """The blocks of ``pieces`` cut to ``sizes`` bytes, for ``rows`` (None: every record)."""
    parts = []
    for p, s in zip(pieces, sizes):
        if not s:
            continue
        block = p.block
        if rows is None:
            parts.append(block[:, :s])
        elif block.strides[0] == 0:  # the same bytes in every row: no rows to pick
            parts.append(block[: len(rows), :s])
        else:
            parts.append(block[rows, :s])
    return parts


def _pack(pieces: list[Piece], n: int, sizes: list[int | np.ndarray]) -> np.ndarray:
    """The real bytes of ``pieces`` (each ``sizes`` long), record after record."""
    varying = [(k, s) for k, s in enumerate(sizes) if not isinstance(s, int)]
    if not varying:  # one layout: every piece a fixed number of bytes
        parts = _layout_parts(pieces, sizes)
        return np.concatenate(parts, axis=1).reshape(-1) if parts else np.empty(0, np.uint8)
    fixed = sum(s for s in sizes if isinstance(s, int))
    totals = np.full(n, fixed, dtype=np.int64)
    code = np.zeros(n, dtype=np.int64)
    radix = 1
    for _, s in varying:
        totals += s
        lo, hi = int(s.min()), int(s.max())
        radix *= hi - lo + 1
        if radix > 1 << 62:  # too many combinations to number: every layout may differ
            return _pack_masked(pieces, sizes, n)
        code *= hi - lo + 1
        code += s - lo
    counts = np.bincount(code) if int(code.max()) < 4 * n + 1024 else None
    layouts = np.flatnonzero(counts) if counts is not None else np.unique(code)
    if len(layouts) > _MAX_LAYOUTS:
        return _pack_masked(pieces, sizes, n)
    # the most common layout is built for every row by slicing alone; the others overwrite theirs
    common = int(layouts[np.argmax(counts[layouts])]) if counts is not None else int(code[0])
    width = int(totals.max())
    dense = np.empty((n, width), dtype=np.uint8)
    first = int(np.argmax(code == common))
    row = [s if isinstance(s, int) else int(s[first]) for s in sizes]
    parts = _layout_parts(pieces, row)
    if parts:
        np.concatenate(parts, axis=1, out=dense[:, : sum(row)])
    for layout in layouts.tolist():
        if layout == common:
            continue
        rows = np.flatnonzero(code == layout)
        row = [s if isinstance(s, int) else int(s[rows[0]]) for s in sizes]
        parts = _layout_parts(pieces, row, rows)
        if parts:
            dense[rows, : sum(row)] = np.concatenate(parts, axis=1)
    small = np.uint8 if width < 256 else np.int64
    return dense[np.arange(width, dtype=small)[None, :] < totals.astype(small)[:, None]]


def _pack_masked(pieces: list[Piece], sizes: list[int | np.ndarray], n: int) -> np.ndarray:
    """``_pack``'s bytes for records of many layouts: every piece's block and mask side by side."""
    blocks = np.concatenate([p.block for p in pieces], axis=1)
    masks = np.concatenate(
        [np.arange(p.block.shape[1])[None, :] < np.broadcast_to(s, n)[:, None] for p, s in zip(pieces, sizes)],
        axis=1,
    )
    return blocks[masks]


def assemble(pieces: list[Piece | RaggedPiece], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate, per record, the real bytes of each piece in order.

    The small pieces are packed together (``_pack``: their bytes record after record); the
    ragged pieces are then interleaved with them by one mask over the output. Returns the joined
    bytes and the n+1 record offsets.
    """
    if n == 0:
        return np.empty(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    small: list[Piece] = []
    run_of: list[int] = []  # which run of small pieces (between ragged ones) each small piece is in
    ragged: list[RaggedPiece] = []
    for piece in pieces:
        if isinstance(piece, RaggedPiece):
            ragged.append(piece)
        else:
            small.append(piece)
            run_of.append(len(ragged))
    sizes = _sizes(small, n)
    packed = _pack(small, n, sizes) if small else np.empty(0, np.uint8)
    # segments of each record: small run 0, ragged 0, small run 1, ..., small run R
    segments = np.zeros((n, 2 * len(ragged) + 1), dtype=np.int64)
    for s, r in zip(sizes, run_of):
        segments[:, 2 * r] += s
    for r, piece in enumerate(ragged):
        segments[:, 2 * r + 1] = piece.lengths
    offsets = running_total(segments.sum(axis=1))
    if not ragged:
        return packed, offsets
    if len(ragged) == 1 and not small:
        piece = ragged[0]
        return np.ascontiguousarray(piece.flat[: int(offsets[-1])], dtype=np.uint8), offsets
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    kinds = np.zeros(segments.shape, dtype=np.uint8 if len(ragged) < 255 else np.int64)
    kinds[:, 1::2] = np.arange(1, len(ragged) + 1)
    kind = np.repeat(kinds.reshape(-1), segments.reshape(-1))
    if len(ragged) == 1:
        is_ragged = kind.view(bool)
        out[is_ragged] = ragged[0].flat[: int(segments[:, 1].sum())]
        np.logical_not(is_ragged, out=is_ragged)
        out[is_ragged] = packed
        return out, offsets
    out[kind == 0] = packed
    for r, piece in enumerate(ragged):
        out[kind == r + 1] = piece.flat[: int(segments[:, 2 * r + 1].sum())]
    return out, offsets
