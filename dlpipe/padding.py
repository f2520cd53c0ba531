"""Find each record's real length and strip the padding.

Padding is found, in order of preference, from an explicit lengths column, an attention mask
(right or left padding, as HF tokenizers produce), or a pad id. Sequence columns (those padded
along their first axis) share one length per record; other columns stay fixed-size. A pad id
*inside* a sequence is data: only the run at the padded end is padding. Whatever a padded
region holds must be one constant per column (recorded as that column's pad value), otherwise
the column is not padded the way the lengths say and dlpipe refuses rather than drop data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dlpipe.defaults import MASK_COLUMN
from dlpipe.errors import ConfigError, PaddingError
from dlpipe.formats.pieces import by_position
from dlpipe.sources.base import Column

SIDES = ("auto", "right", "left")


@dataclass(frozen=True)
class PaddingSpec:
    """How lengths are found. ``method`` is "lengths", "mask", "pad_id" or "none"."""

    method: str
    sequence_columns: tuple[str, ...] = ()
    lengths_column: str | None = None
    mask_column: str | None = None
    pad_id: int | None = None
    reference: str | None = None
    side: str = "right"
    dropped: tuple[str, ...] = ()
    max_length: int = 0


def resolve_padding(
    columns: Mapping[str, Column],
    *,
    pad_id: int | None = None,
    lengths_column: str | None = None,
    mask_column: str | None = MASK_COLUMN,
    padding_side: str = "auto",
    sequence_columns: Sequence[str] | None = None,
    keep_mask: bool = False,
    source_name: str = "<input>",
) -> PaddingSpec:
    """Decide which columns are padded and how their lengths are found."""
    if padding_side not in SIDES:
        raise ConfigError(f"padding_side={padding_side!r}; use one of {', '.join(SIDES)}")
    for opt, name in (("lengths_column", lengths_column),):
        if name is not None and name not in columns:
            raise ConfigError(f"{opt}={name!r} is not a column; columns are {', '.join(columns)}")
    if mask_column is not None and mask_column not in columns:
        mask_column = None
    if lengths_column is not None:
        if columns[lengths_column].shape != ():
            raise ConfigError(f"lengths column {lengths_column!r} must hold one integer per record")
        mask_column = None  # an explicit lengths column wins
    helpers = tuple(c for c in (lengths_column, mask_column) if c)
    one_d = {n: c for n, c in columns.items() if len(c.shape) >= 1 and n not in helpers}

    if sequence_columns is not None:
        for n in sequence_columns:
            if n not in one_d:
                raise ConfigError(f"sequence column {n!r} is not a column with a padded axis; "
                                  f"candidates: {', '.join(one_d) or 'none'}")
        seq = tuple(sequence_columns)
    elif mask_column is not None:
        width = columns[mask_column].shape[0]
        seq = tuple(n for n, c in one_d.items() if c.shape[0] == width)
    else:
        int_widths = [c.shape[0] for c in one_d.values() if c.dtype.kind in "iu"]
        width = max(int_widths, default=0)
        told = pad_id is not None or lengths_column is not None
        # without a mask to follow, only integer columns (token ids) are taken for padded ones
        seq = tuple(n for n, c in one_d.items()
                    if c.dtype.kind in "iu" and c.shape[0] == width and (width > 1 or told) and width)

    dropped = () if keep_mask else helpers
    if not seq:
        return PaddingSpec("none", dropped=dropped)
    widths = {columns[n].shape[0] for n in seq}
    if len(widths) > 1:
        raise ConfigError(f"sequence columns {', '.join(seq)} have different padded widths {sorted(widths)}")
    max_length = widths.pop()
    if lengths_column is not None:
        return PaddingSpec("lengths", seq, lengths_column=lengths_column, side=_side(padding_side),
                           dropped=dropped, max_length=max_length)
    if mask_column is not None:
        return PaddingSpec("mask", seq, mask_column=mask_column, pad_id=pad_id, side=padding_side,
                           reference=_reference(seq, columns), dropped=dropped, max_length=max_length)
    if pad_id is not None:
        reference = _reference(seq, columns)
        if columns[reference].dtype.kind not in "iu":
            raise ConfigError(f"pad_id needs an integer column to read lengths from; {reference!r} is "
                              f"{columns[reference].dtype}")
        return PaddingSpec("pad_id", seq, pad_id=int(pad_id), reference=reference,
                           side=_side(padding_side), dropped=dropped, max_length=max_length)
    raise PaddingError(
        source_name,
        f"cannot find the padding of {', '.join(seq)} (width {max_length}): there is no lengths "
        "column, no attention_mask and no pad id",
        hint="pass --pad-id N, --lengths-column NAME or --mask-column NAME; or --no-strip to keep "
        "every column fixed-length",
    )


def _side(side: str) -> str:
    return "right" if side == "auto" else side


def _reference(seq: tuple[str, ...], columns: Mapping[str, Column]) -> str:
    if "input_ids" in seq:
        return "input_ids"
    ints = [n for n in seq if columns[n].dtype.kind in "iu"]
    return ints[0] if ints else seq[0]


def record_lengths(
    chunk: Mapping[str, np.ndarray], spec: PaddingSpec, *, path: str | Mapping[str, str], first_record: int
) -> tuple[np.ndarray, np.ndarray]:
    """Real length (steps along the padded axis) of every record, and whether it is left-padded.
    ``path``: the file an error names, or each column's file (``Source.column_path``)."""
    def file_of(column: str) -> str:
        return path if isinstance(path, str) else path[column]

    width = spec.max_length
    n = len(next(iter(chunk.values())))
    if spec.method == "none":
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    if spec.method == "lengths":
        lengths = chunk[spec.lengths_column].astype(np.int64).reshape(n)
        bad = np.flatnonzero((lengths < 0) | (lengths > width))
        if len(bad):
            i = int(bad[0])
            raise PaddingError(file_of(spec.lengths_column), f"lengths column {spec.lengths_column!r} holds {int(lengths[i])}, "
                               f"outside 0..{width}", record=first_record + i,
                               hint="fix the lengths column or pass another padding option")
        return lengths, np.full(n, spec.side == "left")
    if spec.method == "mask":
        mask = chunk[spec.mask_column].reshape(n, width)
        if mask.dtype != np.bool_:
            bad = np.flatnonzero(((mask != 0) & (mask != 1)).any(axis=1))
            if len(bad):
                raise PaddingError(file_of(spec.mask_column), f"{spec.mask_column!r} holds values other than 0 and 1",
                                   record=first_record + int(bad[0]), hint="pass the real attention mask")
        mask = mask.astype(bool)
        lengths = mask.sum(axis=1, dtype=np.int64)
        pos = np.arange(width)[None, :]
        right = (mask == (pos < lengths[:, None])).all(axis=1)
        left = (mask == (pos >= (width - lengths)[:, None])).all(axis=1)
        ok = {"auto": right | left, "right": right, "left": left}[spec.side]
        bad = np.flatnonzero(~ok)
        if len(bad):
            i = int(bad[0])
            raise PaddingError(
                file_of(spec.mask_column), f"{spec.mask_column!r} of this record is not one contiguous run of ones at the "
                f"{'start or end' if spec.side == 'auto' else spec.side}, so its length is ambiguous",
                record=first_record + i, hint="check --padding-side, or pass --lengths-column",
            )
        is_left = left & ~right if spec.side == "auto" else np.full(n, spec.side == "left")
        if spec.pad_id is not None:
            _check_pad_region(by_position(chunk[spec.reference], width), lengths, is_left,
                              spec.pad_id, spec.reference, file_of(spec.reference), first_record,
                              against=spec.mask_column)
        return lengths, is_left
    ref = by_position(chunk[spec.reference], width)
    real = ref[:, :, 0] != spec.pad_id if ref.shape[2] == 1 else (ref != spec.pad_id).any(axis=2)
    if spec.side == "right":  # one past the last real position: max of (position + 1) where real
        position = np.arange(1, width + 1, dtype=np.min_scalar_type(width))
        lengths = (real * position).max(axis=1) if width else np.zeros(n, np.int64)
    else:
        lengths = np.where(real.any(axis=1), width - np.argmax(real, axis=1), 0)
    return lengths.astype(np.int64), np.full(n, spec.side == "left")


def _check_pad_region(ref, lengths, is_left, pad_id, name, path, first_record, *, against):
    region = padding_region(lengths, is_left, ref.shape[1])
    bad = np.flatnonzero((region[:, :, None] & (ref != pad_id)).any(axis=(1, 2)))
    if len(bad):
        raise PaddingError(path, f"{name!r} holds non-pad values where {against!r} marks padding, so "
                           "the lengths are ambiguous", record=first_record + int(bad[0]),
                           hint="drop --pad-id to trust the mask, or fix the data")


def padding_region(lengths: np.ndarray, is_left: np.ndarray, width: int) -> np.ndarray:
    """(n, width) bool: True at padded positions."""
    pos = np.arange(width)[None, :]
    right_pad = pos >= lengths[:, None]
    left_pad = pos < (width - lengths)[:, None]
    return np.where(is_left[:, None], left_pad, right_pad)


def pad_values(chunk: Mapping[str, np.ndarray], spec: PaddingSpec, lengths, is_left) -> dict[str, tuple]:
    """(min, max) of what each sequence column holds in its padded region, or () if none."""
    out = {}
    if spec.method == "none":
        return out
    names = [n for n in spec.sequence_columns if not (spec.method == "pad_id" and n == spec.reference)]
    if not names:  # under pad_id the reference column's padding is the pad id by construction
        return out
    region = padding_region(lengths, is_left, spec.max_length)
    for name in names:
        data = by_position(chunk[name], spec.max_length)
        vals = data[region]
        out[name] = (vals.min().item(), vals.max().item()) if vals.size else ()
    return out


def left_align(data: np.ndarray, lengths: np.ndarray, is_left: np.ndarray) -> np.ndarray:
    """Move the real elements of left-padded rows to the start, so every row is right-padded."""
    if not is_left.any():
        return data
    n, width = data.shape[:2]
    shift = np.where(is_left, width - lengths, 0)
    idx = (np.arange(width)[None, :] + shift[:, None]) % width
    idx = idx.reshape(n, width, *([1] * (data.ndim - 2)))
    return np.take_along_axis(data, idx, axis=1)
