"""Length buckets for ``to_tf_dataset``: records grouped by bucket a window at a time, in graph ops.

The rule is the PyTorch loader's (``dlpipe.loaders.common.window_batches``): a *window* of
records (the shuffle buffer, at least ``BUCKET_WINDOW_BATCHES`` batches) is permuted when
shuffled, sorted stably by length bucket and cut into batches of ``batch_size``; shuffled, the
full batches are yielded in a random order, the partial one (only the epoch's last window has
one) last. ``BatchDecoder`` pads each batch to the smallest boundary that fits its longest record,
so a batch is one bucket's boundary wide (one that straddles two buckets, at most one per pair of
neighbours in a window, takes the larger). Every batch but the epoch's last is full.

tf.data's ``group_by_window`` keys one record at a time, and moving single records through
tf.data costs more than parsing them (bucketed batches were 2.3x slower than plain ones). Here
no op sees a single record: a window travels as one ``[n]`` string vector and is parsed once
(``parse_example`` with ``BatchDecoder.spec``); its lengths are bucketed with ``searchsorted``,
ordered with one stable ``argsort`` (the batch order applied to the indices), and each parsed
column is gathered once and cut along a batch axis (see ``_batched``), which ``unbatch``
splits into batches that ``BatchDecoder`` pads as on every other path (it takes parsed columns
as well as serialized records). Parsing only the lengths and gathering the serialized records
instead cost 1-1.5 us more per record on 2 cores: a second parse of the length column and a
string copy per record, each about as costly as the whole parse. The ragged ops are built
without validation: their asserts are conditionals that tf.data instantiates with every
iterator (~50 ms per epoch). What is left over plain batches: each iterator (each epoch)
instantiates the grouping function (~20 ms on 2 cores), and the first window is read and
grouped before the first batch, the last one grouped after the reading ends (16k records each
at batch 256; on a 100k-record epoch that is ~10% of the time; on long epochs it vanishes).

- **Planned** (a global shuffle, or a split over ranks; ``planned_bucket_batches``): windows
  come from the epoch plan through dlpipe's reader as in ``dlpipe.loaders.tf_plan``, one
  element per window: its bytes as read, its records' offsets in the permuted order and the
  full batches' order, both drawn by ``common.bucket_window_draws`` (numpy, the same draws as
  ``window_batches``). The batches equal ``to_torch_dataloader``'s for the same arguments and
  seed, record for record and pad for pad. Windows are elements by number
  (``tf_plan.PlannedEpochs``): read in parallel from local shards, and checkpointable with
  ``tf.train.Checkpoint(iterator=...)`` as the unbucketed planned path.
- **File order** (unshuffled, or compressed shards shuffled; ``file_order_bucket_batches``): the
  records as ``_records`` streams them (shards interleaved a block at a time, through the
  shuffle buffer when shuffled) are cut into windows of the same size (``rebatch``), the first
  ``total // batch_size * batch_size`` records when ``drop_remainder``, as PyTorch drops them.
  Windows are grouped by the same rule; shuffled, the full batches' order is a stateless shuffle
  seeded with (seed + epoch, window number). With ``cycle_length=1`` unshuffled the stream is
  the PyTorch loader's, and so are the batches; with the default interleave of shard files the
  records differ (as they do without buckets), not the rule. Checkpointable:
  ``tf.train.Checkpoint(iterator=...)`` saves it like the unbucketed file-order pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.loaders.common import (
    BUCKET_WINDOW_BATCHES,
    Window,
    bucket_window_draws,
    buffer_batches,
)
from dlpipe.loaders.tf_plan import Element, PlannedEpochs

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

__all__ = ["file_order_bucket_batches", "planned_bucket_batches", "window_batch_count"]

# (a window's bytes, its records' starts and lengths in the permuted order, full batches' order)
_SPEC = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
         tf.TensorSpec([None], tf.int64))


def window_batch_count(buffer_size: int, batch_size: int) -> int:
    """Batches per bucketed window: the shuffle buffer in whole batches, at least
    ``BUCKET_WINDOW_BATCHES`` (grouping by length needs many batches to choose from)."""
    return max(buffer_batches(buffer_size, batch_size), BUCKET_WINDOW_BATCHES)


def planned_bucket_batches(ds: Any, decoder: Any, batch_size: int, *, seed: int, shuffle: bool,
                           drop_remainder: bool, world_size: int = 1, rank: int = 0, uneven: str = "pad",
                           parallel: int = -1, deterministic: bool = True,
                           then: Callable[[tf.data.Dataset], tf.data.Dataset] = lambda data: data,
                           ) -> tf.data.Dataset:
    """The bucketed batches of ``ds``'s epochs for this rank, as ``to_torch_dataloader(...,
    bucket_boundaries=decoder.boundaries)`` makes them, each as ``parse_example`` output for
    ``decoder`` to pad, through ``then``. Each new iterator plays the next epoch (``ds.epoch``,
    then + 1, ...); elements are windows by number (``tf_plan.PlannedEpochs``), so iterators can
    be checkpointed."""
    config = ds.shuffle_config
    per_window = window_batch_count(config.buffer_size, batch_size)
    block_records = ds.block_records if shuffle else None

    def plan(epoch: int) -> list[Window]:
        return ds.plan_windows(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                               window_batches=per_window, drop_last=drop_remainder, world_size=world_size,
                               rank=rank, uneven=uneven, block_records=block_records)

    def make(epoch: int, element: Element, windows: Sequence[Window], reads: list[Any]) -> tuple:
        (window,), ((buf, starts, ends),) = windows, reads
        rows, order = bucket_window_draws(window, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                          epoch=epoch, rank=rank)
        # the window's bytes as read, cut in the permuted order by substr: reordering them
        # in numpy first (gather_bytes: an index per byte) took 2/3 of the Python time
        return np.asarray(buf).tobytes(), starts[rows], (ends - starts)[rows], order

    group = _grouper(decoder, batch_size, drop_remainder)

    def cut(chunk: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor, order: tf.Tensor) -> Any:
        return group(tf.strings.substr(chunk, starts, lengths), order)

    epochs = PlannedEpochs(ds, plan=plan, make=make, epoch=config.epoch)
    return epochs.dataset(_SPEC, parallel=parallel, deterministic=deterministic, then=lambda data: then(
        data.map(cut, num_parallel_calls=parallel, deterministic=deterministic).unbatch()))


def file_order_bucket_batches(blocks: tf.data.Dataset, ds: Any, decoder: Any, batch_size: int, *,
                              shuffle_state: Any, drop_remainder: bool, parallel: int = -1,
                              deterministic: bool = True) -> tf.data.Dataset:
    """Bucketed batches, as ``parse_example`` output for ``decoder`` to pad, of the serialized
    records ``blocks`` streams (vectors of records in read order, as ``tf_data._records`` makes
    them), a window at a time. ``shuffle_state`` is ``ds``'s ``ShuffleConfig`` as the loader
    resolved it."""
    window = window_batch_count(shuffle_state.buffer_size, batch_size) * batch_size
    total = sum(s.num_records for s in ds.shards)
    keep = total // batch_size * batch_size if drop_remainder else total
    shuffled = shuffle_state.shuffled
    seed = shuffle_state.plan_seed + shuffle_state.epoch
    group = _grouper(decoder, batch_size, drop_remainder)

    def grouped(index: tf.Tensor, records: tf.Tensor) -> Any:
        # records past ``keep`` are the epoch's remainder, left out (a tf.distribute worker
        # reading some of the files may see fewer: the grouping then drops its partial batch)
        count = tf.minimum(tf.size(records, out_type=tf.int64), tf.maximum(keep - index * window, 0))
        order = tf.range(count // batch_size, dtype=tf.int32)
        if shuffled:
            window_seed = tf.stack([tf.constant(seed % 2**63, tf.int64), index])
            order = tf.random.experimental.stateless_shuffle(order, seed=window_seed)
        return group(records, order, count)

    windows = blocks.rebatch(window)
    if drop_remainder or shuffled:  # grouped() needs the window's number
        windows, fn = windows.enumerate(), grouped
    else:
        fn = lambda records: group(records, tf.range(tf.size(records) // batch_size))  # noqa: E731
    return windows.map(fn, num_parallel_calls=parallel, deterministic=deterministic).unbatch()


def _grouper(decoder: Any, batch_size: int, drop_remainder: bool) -> Callable[..., dict[str, Any]]:
    """(a window's serialized records ``[n]`` in order, its full batches' ``order``, optionally
    the ``count`` of leading records to group) → its batches, as ``parse_example`` output cut
    along a leading batch axis for ``unbatch``: the rows in bucket order, cut into batches of
    ``batch_size`` taken in ``order``, then the partial batch, if any (none with
    ``drop_remainder``, whose batches have a static size). The window is parsed once and each
    column gathered once (copying serialized records instead costs about what parsing does)."""
    bounds = tf.constant(decoder.boundaries, tf.int64)

    def group(records: tf.Tensor, order: tf.Tensor, count: tf.Tensor | None = None) -> dict[str, Any]:
        parsed = tf.io.parse_example(records, decoder.spec)
        bucket = tf.searchsorted(bounds, decoder.record_lengths(parsed), side="left", out_type=tf.int32)
        rows = tf.argsort(bucket if count is None else bucket[:count], stable=True)
        n = tf.size(rows, out_type=tf.int64)
        cut = tf.size(order, out_type=tf.int64) * batch_size  # the full batches' rows
        full = tf.reshape(tf.gather(tf.reshape(rows[:cut], [-1, batch_size]), order), [-1])
        if drop_remainder:
            return {k: _batched(tf.gather(v, full), None, batch_size) for k, v in parsed.items()}
        splits = tf.range(0, cut + 1, batch_size)
        splits = tf.concat([splits, [n]], 0)[: tf.size(splits, out_type=tf.int64) + tf.minimum(n - cut, 1)]
        rows = tf.concat([full, rows[cut:]], 0)
        return {k: _batched(tf.gather(v, rows), splits, batch_size) for k, v in parsed.items()}

    return group


def _batched(value: Any, splits: tf.Tensor | None, batch_size: int) -> Any:
    """A column's rows ``[n, ...]`` cut into batches at row ``splits`` (None: every
    ``batch_size`` rows, a static size). A ragged column goes as (its flat values, its row
    lengths), each ragged only along the batch axis, so that ``unbatch`` gives plain tensors: a
    ragged-in-ragged element is encoded as a variant per batch and decoded again downstream
    (~0.1 us a record; ``BatchDecoder`` rebuilds the column from the pair)."""
    if isinstance(value, tf.RaggedTensor):
        lengths = _batched(value.row_lengths(), splits, batch_size)
        if splits is None:
            splits = tf.range(0, value.nrows() + 1, batch_size)
        return tf.RaggedTensor.from_row_splits(value.values, tf.gather(value.row_splits, splits),
                                               validate=False), lengths
    if splits is not None:
        return tf.RaggedTensor.from_row_splits(value, splits, validate=False)
    return tf.reshape(value, tf.concat([[-1, batch_size], tf.shape(value)[1:]], 0))
