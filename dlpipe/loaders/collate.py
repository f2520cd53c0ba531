"""The padding rule every loader follows, so TensorFlow and PyTorch batches match.

As ``DataCollatorWithPadding``: a variable column is padded to the longest record of its batch,
rounded up to ``pad_to_multiple_of``, or to the smallest bucket boundary that fits when length
buckets are used; pad values come from the manifest; an ``attention_mask`` is built from the
lengths; ``padding_side`` right or left. ``collate`` applies it with numpy (the PyTorch loader,
the framework-free iterator); ``dlpipe.loaders.tf_decode`` does the same in graph ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError
from dlpipe.formats.base import Ragged
from dlpipe.manifest import DatasetInfo


def padded_length(longest: int, *, pad_to_multiple_of: int | None = None,
                  boundaries: Sequence[int] | None = None) -> int:
    """Length a batch is padded to, given its longest record."""
    if boundaries:
        i = int(np.searchsorted(boundaries, longest, side="left"))
        if i < len(boundaries):
            return int(boundaries[i])
    if pad_to_multiple_of:
        return int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    return int(longest)


def default_boundaries(info: DatasetInfo, column: str, *, max_ratio: float = 1.2,
                       max_buckets: int = 32, pad_to_multiple_of: int | None = None) -> list[int]:
    """Bucket boundaries for ``column``: geometric steps of at most ``max_ratio`` from its shortest
    to its longest record (as recorded by reshard).

    A record padded to the next boundary then wastes at most ``1 - 1/max_ratio`` of its padded
    length and about half that on average (>= 90% padding efficiency at 1.2), with a small fixed
    set of shapes (so tf.data does not retrace). Rounded up to ``pad_to_multiple_of``.
    """
    stats = info.raw["dlpipe"]["columns"].get(column, {}).get("lengths")
    if not stats:
        raise ConfigError(f"column {column!r} is not a variable-length column; cannot bucket by it")
    lo, top = max(int(stats["min"]), 1), max(int(stats["max"]), 1)
    steps = min(max_buckets - 1, max(1, math.ceil(math.log(max(top / lo, 1.0)) / math.log(max_ratio))))
    picks = np.unique(np.ceil(lo * (top / lo) ** (np.arange(steps + 1) / steps)).astype(int))
    return sorted({padded_length(int(p), pad_to_multiple_of=pad_to_multiple_of) for p in picks} | {top})


def bucket_ids(lengths: np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(boundaries), lengths, side="left")


def take_rows(col: Ragged, rows: np.ndarray) -> Ragged:
    """Rows of a ragged column, in the order given."""
    values, splits = col
    starts, lens = splits[rows], splits[rows + 1] - splits[rows]
    out_splits = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_splits[1:])
    total = int(out_splits[-1])
    idx = np.repeat(starts - out_splits[:-1], lens) + np.arange(total, dtype=np.int64)
    return values[idx], out_splits


def collate(
    columns: Mapping[str, Ragged],
    encodings: Mapping[str, ColumnEncoding],
    pad_values: Mapping[str, float | int],
    *,
    rows: np.ndarray | None = None,
    pad_to_multiple_of: int | None = None,
    boundaries: Sequence[int] | None = None,
    padding_side: str = "right",
    return_attention_mask: bool = True,
) -> dict[str, np.ndarray]:
    """One batch of numpy arrays under the padding rule (see the module docstring).

    With ``rows``, ``columns`` hold a whole window and the batch is those rows, gathered straight
    into the padded arrays (one gather per column instead of a ragged copy and a scatter).
    """
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    out: dict[str, np.ndarray] = {}
    mask = None
    for name, (values, splits) in columns.items():
        enc = encodings[name]
        idx = np.arange(len(splits) - 1) if rows is None else np.asarray(rows)
        starts = splits[idx]
        n = len(idx)
        if not enc.variable:
            shape = tuple(enc.shape)
            take = starts[:, None] + np.arange(enc.inner)
            out[name] = values[take].reshape((n, *shape))
            continue
        steps = (splits[idx + 1] - starts) // enc.inner
        width = padded_length(int(steps.max()) if n else 0, pad_to_multiple_of=pad_to_multiple_of,
                              boundaries=boundaries)
        pos = np.arange(width)[None, :]
        shift = np.zeros((n, 1), np.int64) if padding_side == "right" else (width - steps)[:, None]
        real = (pos >= shift) & (pos < shift + steps[:, None])
        src = starts[:, None, None] + ((pos - shift) * enc.inner)[:, :, None] + np.arange(enc.inner)
        gathered = values[np.where(real[:, :, None], src, 0)] if len(values) else np.zeros(src.shape, values.dtype)
        pad = pad_values.get(name)
        batch = np.where(real[:, :, None], gathered, values.dtype.type(0 if pad is None else pad))
        out[name] = batch.reshape((n, width, *enc.shape[1:]))
        if mask is None:
            mask = real
    if return_attention_mask and mask is not None and MASK not in out:
        out[MASK] = mask.astype(np.int64)
    return out
