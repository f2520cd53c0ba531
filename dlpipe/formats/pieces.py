"""Pieces: build many variable-length records at once from fixed-width parts.

Every record dlpipe writes is a concatenation of pieces (tags, varints, key bytes, a column's
payload) whose widths vary per record. A small piece is a ``(block, mask)`` pair: ``block`` is an
``(n, w)`` uint8 array with row i holding record i's bytes left-aligned, ``mask`` says which bytes
are real. Placing blocks side by side and taking ``block[mask]`` in row-major order yields all
records back to back: one boolean compaction replaces a Python loop over records. A payload is a
``RaggedPiece`` piece instead (its real bytes back to back, plus a length per record), so the work it
costs follows the bytes that are real, not the padded width of the widest record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    block: np.ndarray  # (n, w) uint8
    mask: np.ndarray | None  # (n, w) bool; None means every byte is real

    @property
    def lengths(self) -> np.ndarray:
        n, w = self.block.shape
        if self.mask is None:
            return np.full(n, w, dtype=np.int64)
        return self.mask.sum(axis=1, dtype=np.int64)


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
    w = block.shape[1]
    return Piece(block, np.arange(w, dtype=np.int64)[None, :] < lengths[:, None])


def _unsigned(values: np.ndarray) -> np.ndarray:
    """Values as the narrowest unsigned type that holds them (negative int64: two's complement)."""
    values = np.asarray(values)
    if values.dtype.kind == "u":
        return values
    if values.size and values.min() < 0:
        return values.astype(np.int64).view(np.uint64)
    hi = int(values.max()) if values.size else 0
    return values.astype(np.uint32 if hi < 2**32 else np.uint64, copy=False)


def varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes of the protobuf varint of each value (1..10), with only the passes its range needs."""
    u = _unsigned(values)
    size = np.ones(u.shape, dtype=np.uint8)
    hi = int(u.max()) if u.size else 0
    k = 1
    while k < 10 and hi >= 1 << (7 * k):
        size += u >= u.dtype.type(1 << (7 * k))
        k += 1
    return size.astype(np.int64)


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


def varint(values: np.ndarray) -> Piece:
    """A piece holding one varint per record."""
    block, size = varint_bytes(values)
    return prefix(block, size)


def optional(piece: Piece, keep: np.ndarray) -> Piece:
    """``piece`` in the records where ``keep`` is true, nothing in the others."""
    mask = np.broadcast_to(keep[:, None], piece.block.shape)
    return Piece(piece.block, mask if piece.mask is None else piece.mask & mask)


def _compact(pieces: list[Piece]) -> RaggedPiece:
    blocks = np.concatenate([p.block for p in pieces], axis=1)
    masks = np.concatenate(
        [np.ones(p.block.shape, dtype=bool) if p.mask is None else p.mask for p in pieces], axis=1
    )
    return RaggedPiece(blocks[masks], masks.sum(axis=1, dtype=np.int64))


def scatter_ragged(out: np.ndarray, dst_starts: np.ndarray, flat: np.ndarray, lengths: np.ndarray) -> None:
    """Copy consecutive pieces of ``flat`` (piece i has ``lengths[i]`` bytes) to ``out[dst_starts[i]:]``."""
    total = int(lengths.sum())
    if total == 0:
        return
    src_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=src_starts[1:])
    idx = np.repeat(dst_starts - src_starts, lengths) + np.arange(total, dtype=np.int64)
    out[idx] = flat[:total]


def assemble(pieces: list[Piece | RaggedPiece], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate, per record, the real bytes of each piece in order.

    Runs of block pieces are compacted at once; the runs and ragged pieces are then placed with
    one scatter each. Returns the joined bytes and the n+1 record offsets.
    """
    if n == 0:
        return np.empty(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    runs: list[RaggedPiece] = []
    blocks: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, RaggedPiece):
            if blocks:
                runs.append(_compact(blocks))
                blocks = []
            runs.append(piece)
        else:
            blocks.append(piece)
    if blocks:
        runs.append(_compact(blocks))
    lengths = np.stack([r.lengths for r in runs], axis=1)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths.sum(axis=1), out=offsets[1:])
    if len(runs) == 1:
        return runs[0].flat, offsets
    starts = offsets[:-1, None] + np.cumsum(lengths, axis=1) - lengths
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    for r, run in enumerate(runs):
        scatter_ragged(out, starts[:, r], run.flat, run.lengths)
    return out, offsets
