"""Packed batches of an epoch plan, numpy only: what both loaders yield with ``packing=...``.

``to_torch_dataloader`` and ``to_tf_dataset`` (``dlpipe.loaders.tf_packed``) run the same
``PackedEpochs.batches`` generator, so one seed gives both the same packed rows.

**Windows.** An epoch's record order (``common.epoch_windows``: blocks of the split permuted
with (seed, epoch), equal record ranges per rank, ``uneven`` as for padded batches) is cut
into *pack windows* of ``pack_window`` records (default 16384). Each window is packed on its
own (``pack_lengths``; ``PackingOptions.carry=False``): shuffled, its records are permuted
before packing and its rows after, with an rng of (seed, epoch, rank, window); so a window's
batches depend on (seed, epoch, rank, window) alone, not on how many loader workers there are.
PyTorch workers take windows round-robin (``common.worker_windows``), as for padded batches.

**Static shapes.** A batch is ``batch_rows`` rows of ``max_length`` tokens (layout ``rows``):
each window's last, short batch is filled with empty rows (``segment_ids`` 0, ``segment_mask``
False, padding values), so every batch has shape ``[B, L]`` and ``[B, S]``. The fill costs
half a batch of rows per window on average: on the DeepCAL-like corpus (100k records, max_length
128, 44 rows = ~251 records per batch) 99.5% of the tokens of full batches are real, 98.9% of
all batches' (fill included), against 47% padded to the longest record of each batch of 256.
The flattened layout (``"flat"``: ``[1, T]`` + ``cu_seqlens``) is not filled.

**Batch counts** (what resuming and several ranks need) come from a *lengths table*: the
tokens of the packing column in every record of the split, read once per process in one pass
over that column (a full read of the data; cached for the process, and copied into PyTorch
workers with the loader) and checked against ``max_length``. A window's batch count is then
``pack_lengths`` on its lengths alone, the plan the batches are built from, without reading
records (~2 ms per window of 16384 DeepCAL-like records; with several ranks every process
counts every rank's windows, ~1 s per 10M records and epoch). With ``world_size > 1`` every rank gets the most batches any rank has
(``uneven="pad"``: the others end with empty batches, which the DeepCAL losses count as 0) or
the fewest (``uneven="drop"``: the others drop their last batches, and with them records).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import Window
from dlpipe.loaders.packing import (
    Batch,
    PackingOptions,
    RowPlan,
    build_flat,
    build_rows,
    pack_lengths,
)
from dlpipe.loaders.windows import read_windows

__all__ = ["PACKED_KEYS", "PackedEpochs", "lengths_table", "refuse_collate_fn"]

PACKED_KEYS = {  # what packing adds to the columns, per layout
    "rows": ("segment_ids", "position_ids", "segment_mask"),
    "flat": ("position_ids", "cu_seqlens", "max_seqlen"),
}
_TABLES: dict[tuple, np.ndarray] = {}  # lengths tables read by this process


def refuse_collate_fn(collate_fn: Any, packing: PackingOptions | None) -> None:
    if collate_fn is not None and packing is not None:
        raise ConfigError(f"collate_fn={collate_fn!r} cannot be used with packing: packed batches are "
                          "laid out by dlpipe (turn a packed batch into what you need after the loader)")


def lengths_table(ds: Any, column: str) -> np.ndarray:
    """int32 tokens of ``column`` in every record of ``ds``'s split (shards in order), read in
    one pass over that column and cached for this process."""
    key = (ds.info.root, ds.split, column, tuple((s.path, s.sha256) for s in ds.shards))
    if key not in _TABLES:
        reader, inner = ds.select_columns([column]).reader(), ds.info.columns[column].inner
        parts = [np.diff(reader.read(s, 0, s.num_records)[column][1]) // inner for s in ds.shards]
        _TABLES[key] = np.concatenate([np.zeros(0, np.int32), *parts]).astype(np.int32)
    return _TABLES[key]


class PackedEpochs:
    """The packed batches of ``ds`` (shuffle resolved) for one rank under checked ``options``
    (``options.packing`` set, world resolved); see the module docstring."""

    def __init__(self, ds: Any, options: Any, config: Any, encodings: Mapping[str, ColumnEncoding]) -> None:
        packing: PackingOptions = options.packing
        packing.check_columns(encodings)
        self.ds, self.packing, self.window_records = ds, packing, options.pack_window
        self.encodings, self.pad_values = dict(encodings), dict(ds.info.pad_values)
        self.shuffle, self.seed, self.block_records = config.shuffled, config.plan_seed, config.block_records
        self.world_size, self.rank, self.uneven = options.world_size or 1, options.rank or 0, options.uneven
        self.sizes = [s.num_records for s in ds.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self._lengths: np.ndarray | None = None
        self._counted: dict[int, list[Window]] = {}

    def settings(self) -> dict[str, Any]:
        """What the batches depend on besides the shuffle and the world (for checkpoints)."""
        return {**asdict(self.packing), "pack_window": self.window_records}

    # -- plan
    def lengths(self) -> np.ndarray:
        """The lengths table (``lengths_table``), records over ``max_length`` refused."""
        if self._lengths is None:
            table = lengths_table(self.ds, self.packing.column)

            def where(i: int) -> tuple[int, int]:
                s = int(np.searchsorted(self.offsets, i, "right")) - 1
                return s, i - int(self.offsets[s])

            self._check(table, where)
            self._lengths = table
        return self._lengths

    def rank_windows(self, epoch: int, rank: int) -> list[Window]:
        """``rank``'s pack windows of ``epoch`` (``num_batches`` not yet counted)."""
        return self.ds.plan_windows(batch_size=self.window_records, window_batches=1, world_size=self.world_size,
                             rank=rank, shuffle=self.shuffle, seed=self.seed, epoch=epoch, uneven=self.uneven,
                             block_records=self.block_records)

    def windows(self, epoch: int, *, counted: bool = True) -> list[Window]:
        """This rank's windows of ``epoch`` with the batches each yields (``num_batches``; None:
        all, uncounted) and, with several ranks, trailing empty ones (no ``ranges``)."""
        if not counted:
            return [replace(w, num_batches=None) for w in self.rank_windows(epoch, self.rank)]  # type: ignore[arg-type]
        if epoch not in self._counted:
            ranks = range(self.world_size) if self.world_size > 1 else [self.rank]
            counts = {r: self.counts(epoch, r) for r in ranks}
            mine = counts[self.rank]
            target = sum(mine)
            if self.world_size > 1:
                target = (max if self.uneven == "pad" else min)(sum(c) for c in counts.values())
            cut = max(sum(mine) - target, 0)
            for i in reversed(range(len(mine))):  # uneven="drop": the last batches go
                take = min(cut, mine[i])
                mine[i], cut = mine[i] - take, cut - take
            out = [replace(w, num_batches=n) for w, n in zip(self.rank_windows(epoch, self.rank), mine)]
            if target > sum(mine):  # uneven="pad": empty batches
                out.append(Window(len(out), (), 0, target - sum(mine)))
            self._counted = {epoch: out}
        return self._counted[epoch]

    def counts(self, epoch: int, rank: int) -> list[int]:
        """Batches of each of ``rank``'s windows of ``epoch``, from the lengths table."""
        table, b = self.lengths(), self.packing.batch_rows
        out = []
        for w in self.rank_windows(epoch, rank):
            lengths = np.concatenate([table[self.offsets[s] + a : self.offsets[s] + c] for s, a, c in w.ranges])
            out.append(-(-self._plan(lengths, w.index, epoch, rank).num_rows // b))
        return out

    def _plan(self, lengths: np.ndarray, index: int, epoch: int, rank: int) -> RowPlan:
        """The window's rows (records in window order), in yield order."""
        opts = self.packing
        if not self.shuffle:
            return pack_lengths(lengths, opts.max_length, opts.max_segments, truncate=opts.truncate,
                                column=opts.column)  # fmt: skip
        rng = np.random.default_rng([self.seed, epoch, rank, index])
        order = rng.permutation(len(lengths))
        plan = pack_lengths(lengths[order], opts.max_length, opts.max_segments, truncate=opts.truncate,
                            column=opts.column)  # fmt: skip
        return RowPlan(order[plan.records], plan.row_splits).take(rng.permutation(plan.num_rows))

    def window_rows(self, window: Window, epoch: int) -> tuple[RowPlan, int]:
        """The rows of ``window`` (this rank's) that its batches hold, planned from the lengths
        table without reading records, and how many batches they make (``num_batches``, or all)."""
        table, b = self.lengths(), self.packing.batch_rows
        lengths = np.concatenate([np.zeros(0, np.int32)] + [
            table[self.offsets[s] + a : self.offsets[s] + c] for s, a, c in window.ranges])  # fmt: skip
        plan = self._plan(lengths, window.index, epoch, self.rank)
        n = -(-plan.num_rows // b) if window.num_batches is None else window.num_batches
        keep = min(plan.num_rows, n * b)
        return RowPlan(plan.records[: plan.row_splits[keep]], plan.row_splits[: keep + 1]), n

    def _check(self, lengths: np.ndarray, where) -> None:
        """Refuse records over ``max_length`` (unless truncating), naming the first one's shard
        and record: ``where(i)`` gives (shard position, record) of position i."""
        opts = self.packing
        if opts.truncate or not len(lengths) or lengths.max() <= opts.max_length:
            return
        i = int(np.argmax(lengths > opts.max_length))
        s, record = where(i)
        raise ConfigError(f"record {record} of {self.ds.info.root}/{self.ds.shards[s].path} has {lengths[i]} tokens "
                          f"in column {opts.column!r}, more than max_length={opts.max_length} (the longest has "
                          f"{lengths.max()}); raise max_length or pass truncate=True")

    # -- batches
    def batches(self, reader: Any, windows: Sequence[Window], epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of ``windows`` (``windows(epoch)`` or a worker's share of them) after the
        first ``skip`` (windows skipped whole are not read)."""
        todo = []
        for w in windows:
            if w.num_batches is not None and skip >= w.num_batches:
                skip -= w.num_batches
                continue
            todo.append((w, skip))
            skip = 0
        reads = read_windows(reader, self.ds.shards, [w for w, _ in todo if w.ranges])
        try:
            for w, first in todo:
                if not w.ranges:
                    yield from (self.empty_batch() for _ in range(first, w.num_batches))
                    continue
                out = self.pack_window(next(reads), w, epoch)
                yield from out[first : w.num_batches]
        finally:
            reads.close()

    def pack_window(self, cols: Mapping[str, Any], window: Window, epoch: int) -> list[Batch]:
        """A window's records (ragged columns, ``read_window``'s) as its batches."""
        opts, b = self.packing, self.packing.batch_rows
        lengths = np.diff(cols[opts.column][1]) // self.encodings[opts.column].inner
        self._check(lengths, lambda i: _locate(window.ranges, i))
        plan = self._plan(lengths, window.index, epoch, self.rank)
        n = plan.num_rows
        if opts.layout == "flat":
            bounds = plan.row_splits[np.r_[0:n:b, n]]
            return [build_flat(cols, self.encodings, plan.records[r0:r1], opts, self.pad_values)
                    for r0, r1 in zip(bounds[:-1], bounds[1:])]  # fmt: skip
        # batch by batch: arrays of one batch stay under the 128 kB that TensorFlow's generator op
        # sets as glibc's M_TRIM_THRESHOLD (bigger ones are mapped and unmapped at every use)
        return [build_rows(cols, self.encodings, plan.take(np.arange(i, min(i + b, n))), opts, self.pad_values,
                           num_rows=b) for i in range(0, n, b)]  # fmt: skip

    def empty_batch(self) -> Batch:
        """A batch without records: ``batch_rows`` empty rows, or an empty flat batch."""
        cols = {n: (np.zeros(0, e.dtype), np.zeros(1, np.int64)) for n, e in self.encodings.items()}
        none = np.zeros(0, np.int64)
        if self.packing.layout == "flat":
            return build_flat(cols, self.encodings, none, self.packing, self.pad_values)
        return build_rows(cols, self.encodings, RowPlan(none, np.zeros(1, np.int64)), self.packing,
                          self.pad_values, num_rows=self.packing.batch_rows)  # fmt: skip


def _locate(ranges: Sequence[tuple[int, int, int]], i: int) -> tuple[int, int]:
    """(shard position, record) of a window's i-th record."""
    for s, a, c in ranges:
        if i < c - a:
            return s, a + i
        i -= c - a
    raise IndexError(i)
