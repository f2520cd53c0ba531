"""``to_tf_dataset(..., packing=...)``: packed batches as a ``tf.data.Dataset``.

The batches follow ``dlpipe.loaders.packed.PackedEpochs``, the plan the PyTorch loader runs,
so the same arguments and seed give the same packed rows in both frameworks, with the same
keys, dtypes and shapes: the loaded columns (variable ones ``[B, L, ...]``, per-record ones
``[B, S, ...]``), ``segment_ids`` and ``position_ids`` ``[B, L]`` int32, ``segment_mask``
``[B, S]`` bool; flattened (``packing="flat"``): variable columns and ``position_ids``
``[1, T]``, per-record ones ``[n, ...]``, ``cu_seqlens`` ``[n + 1]`` int32, ``max_seqlen`` int32. Those shapes are static in the rows layout (a window's last batch
is filled with empty rows), so Keras traces one graph.

**Rows layout, TFRecord shards** (``_rows_in_graph``): only the plan runs in Python. Per pack
window, a numbered element (``tf_plan.PlannedEpochs``) plans the rows from the lengths table
(``PackedEpochs.window_rows``, ~2 ms per 16k records; the table costs one pass over the packing
column per process, in the first epoch) and gives the window's serialized records as read,
with their starts and lengths in plan order, and the rows' record splits; a parallel ``map``
parses them (``BatchDecoder.ragged``) and lays the rows out with ragged ops, ``[k, B, L]`` per
window, split by ``unbatch``. That took 100k DeepCAL-like records from 0.5x to ~0.9x the padded
pipeline's samples/s (2 cores).

**Flat layout** (and rows from shards without serialized records): a window's numpy batches
(``PackedEpochs.pack_window``) are one element (``[k, B, L]``, or ragged runs for the flat
layout) that ``unbatch`` splits.

Each new iteration of the dataset (each Keras epoch) plays the next epoch: ``ds.epoch``, then
``ds.epoch + 1``, ...

Structure as HF ``to_tf_dataset``: ``columns=None`` gives one dict of every key; with
``columns``/``label_cols`` a ``(features, labels)`` split, where the packing keys always join
the features (a packed batch means nothing without them; ``attention_mask`` does not exist).

**Checkpoints.** Elements are pack windows by number, as in ``dlpipe.loaders.tf_plan``:
``tf.train.Checkpoint(iterator=it)`` saves an iterator's epoch and position, and an iterator of
the dataset built again with the same arguments, restored from it, goes on with the batches an
uninterrupted run gives next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import MASK, Window
from dlpipe.loaders.options import LoaderOptions, resolve_shuffle
from dlpipe.loaders.packed import PACKED_KEYS, PackedEpochs
from dlpipe.loaders.tf_decode import BatchDecoder
from dlpipe.loaders.tf_plan import Element, PlannedEpochs

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")


def packed_tf_dataset(ds: Any, opts: LoaderOptions, *, prefetch: bool = True) -> tf.data.Dataset:
    """Packed batches of ``ds`` under checked ``opts`` (``opts.packing`` set, world resolved)."""
    packing, made = opts.packing, PACKED_KEYS[opts.packing.layout]
    features = None if opts.columns is None else list(dict.fromkeys([*opts.columns, *made]))
    labels = list(opts.label_cols)
    if MASK in (features or []) + labels:
        raise ConfigError(f"columns name {MASK!r}, which packed batches do not have: "
                          f"{', '.join(made)} say where each record is")
    if features is not None:
        wanted = [c for c in features + labels if c not in made]
        unknown = [c for c in wanted if c not in ds.info.columns]
        if unknown:
            raise ConfigError(f"columns {unknown} are not in {ds.info.root}; columns: "
                              f"{', '.join(ds.columns)}, and packing's {', '.join(made)}")
        ds = ds.select_columns(wanted)
    ds, config = resolve_shuffle(ds, opts)
    plan = PackedEpochs(ds, opts, config, {n: ds.info.columns[n] for n in ds.columns})
    reader, example = ds.reader(), plan.empty_batch()
    in_graph = packing.layout == "rows" and reader.format.supports_serialized

    def windows(epoch: int) -> list[Window]:
        # batch counts (the lengths table) only where ranks must agree on them; the rows layout
        # plans from the table anyway
        if in_graph:
            plan.lengths()
        return plan.windows(epoch, counted=plan.world_size > 1)

    def then(data: tf.data.Dataset) -> tf.data.Dataset:
        """Batches → HF's structure, prefetched."""
        if features is not None:
            data = data.map(_hf_split(features, labels))
        return data.prefetch(tf.data.AUTOTUNE) if prefetch else data

    build = _rows_in_graph if in_graph else _numpy_batches
    data = build(plan, example, config.epoch, windows, then)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    options.experimental_optimization.inject_prefetch = False  # see tf_plan.PlannedEpochs.dataset
    return data.with_options(options)


_WINDOW_SPEC = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
                tf.TensorSpec([None], tf.int64))


def _nonempty(windows: list[Window]) -> list[Element]:
    """An element per window that yields batches (``uneven="drop"`` may leave one none)."""
    return [Element(i, i + 1) for i, w in enumerate(windows) if w.num_batches != 0]


def _numpy_batches(plan: PackedEpochs, example: dict[str, np.ndarray], epoch: int, windows, then) -> tf.data.Dataset:
    """Each window's numpy batches (``PackedEpochs.pack_window``) as one element: ``[k, B, ...]``
    per key, or, flat, the batches' values back to back with how many each has (``_joined``);
    ``unbatch`` splits them."""
    flat = plan.packing.layout == "flat"
    # flat batches: per-token keys [1, T, ...], per-record ones [n, ...], cu_seqlens, max_seqlen
    tokens = {n for n, e in plan.encodings.items() if e.variable} | {"position_ids"}
    keys = [*example, *(f"{k}/n" for k in example)] if flat else list(example)
    if flat:
        spec = [tf.TensorSpec([None, *v.shape[2 if k in tokens else 1 :]], v.dtype) for k, v in example.items()]
        spec += [tf.TensorSpec([None], tf.int64)] * len(example)
    else:
        spec = [tf.TensorSpec([None, *v.shape], v.dtype) for v in example.values()]

    def make(epoch: int, element: Element, todo: Sequence[Window], reads: list[Any]) -> tuple:
        (w,), (cols,) = todo, reads
        batches = [example] * w.num_batches if cols is None else plan.pack_window(cols, w, epoch)[: w.num_batches]
        out = _joined(batches, tokens) if flat else {k: np.stack([b[k] for b in batches]) for k in example}
        return tuple(out[k] for k in keys)

    def split(data: tf.data.Dataset) -> tf.data.Dataset:
        data = data.map(lambda *values: dict(zip(keys, values)))
        if not flat:
            return then(data.unbatch())
        data = data.map(_runs).unbatch()
        return then(data.map(lambda b: {k: v[None] if k in tokens else v for k, v in b.items()}))

    source = PlannedEpochs(plan.ds, plan=windows, make=make, epoch=epoch, group=_nonempty, serialized=False)
    return source.dataset(spec, parallel=tf.data.AUTOTUNE, deterministic=True, then=split)


def _rows_in_graph(plan: PackedEpochs, example: dict[str, np.ndarray], epoch: int, windows, then) -> tf.data.Dataset:
    """The rows layout with only the plan in Python: per window, an element of the window's
    serialized records as read (one blob) with their starts and lengths in plan order (records
    of the rows, row by row) and the rows' record splits (``window_rows``: from the lengths
    table, filled with empty rows to whole batches); a parallel ``map`` parses them and lays the
    rows out with ragged ops, as ``build_rows`` does."""
    opts, b = plan.packing, plan.packing.batch_rows
    length, slots, column = opts.max_length, opts.max_segments, opts.column
    decoder = BatchDecoder(plan.encodings, plan.pad_values, pad_to_multiple_of=None, boundaries=None,
                           padding_side="right", return_attention_mask=False)  # fmt: skip
    none = np.zeros(0, np.int64)

    def make(epoch: int, element: Element, todo: Sequence[Window], reads: list[Any]) -> tuple:
        (w,), (read,) = todo, reads
        if read is None:  # uneven="pad": empty batches
            return b"", none, none, np.zeros(w.num_batches * b + 1, np.int64)
        buf, starts, ends = read
        rows, n = plan.window_rows(w, epoch)
        first = starts[rows.records]  # the window's frames as read; substr cuts them in plan order
        fill = np.full(n * b - rows.num_rows, rows.row_splits[-1], np.int64)
        return np.asarray(buf).tobytes(), first, ends[rows.records] - first, np.concatenate([rows.row_splits, fill])

    def lay_out(blob: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor, splits: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = decoder.ragged(tf.strings.substr(blob, starts, lengths))
        full = parsed[column].row_lengths()
        steps = tf.minimum(full, length)
        rec_row = tf.ragged.row_splits_to_segment_ids(splits)
        seg = tf.range(tf.size(rec_row, tf.int64), dtype=tf.int64) - tf.gather(splits, rec_row)
        row_tokens = tf.math.unsorted_segment_sum(steps, rec_row, tf.size(splits) - 1)

        def lay(stream: tf.Tensor, pad: Any) -> tf.Tensor:
            rows = tf.RaggedTensor.from_row_lengths(stream, row_tokens, validate=False)
            return tf.reshape(rows.to_tensor(tf.cast(pad, stream.dtype), shape=[None, length, *stream.shape[1:]]),
                              [-1, b, length, *stream.shape[1:]])  # fmt: skip

        out = {}
        for name, enc in plan.encodings.items():
            value = parsed[name]
            if not enc.variable:
                held = tf.RaggedTensor.from_row_splits(value, splits, validate=False)
                out[name] = tf.reshape(held.to_tensor(0, shape=[None, slots, *enc.shape]), [-1, b, slots, *enc.shape])
                continue
            if name != column:
                tf.debugging.assert_equal(value.row_lengths(), full, message=(
                    f"column {name!r} is not as long as column {column!r} in every record; only such "
                    "columns can be packed with it"))  # fmt: skip
            out[name] = lay(value[:, :length].flat_values if opts.truncate else value.flat_values,
                            plan.pad_values.get(name, 0))  # fmt: skip
        out["segment_ids"] = lay(tf.repeat(tf.cast(seg + 1, tf.int32), steps), 0)
        out["position_ids"] = lay(tf.cast(tf.ragged.range(steps).flat_values, tf.int32), 0)
        held = splits[1:] - splits[:-1]
        out["segment_mask"] = tf.reshape(tf.range(slots, dtype=tf.int64) < held[:, None], [-1, b, slots])
        return {k: out[k] for k in example}

    source = PlannedEpochs(plan.ds, plan=windows, make=make, epoch=epoch, group=_nonempty)
    return source.dataset(_WINDOW_SPEC, parallel=tf.data.AUTOTUNE, deterministic=True, then=lambda data: then(
        data.map(lay_out, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()))


def _joined(run: list[dict[str, np.ndarray]], tokens: set[str]) -> dict[str, np.ndarray]:
    """Flat batches back to back: each key's values concatenated (per-token keys along T), and
    ``key/n`` how many each batch gave."""
    out = {}
    for k in run[0]:
        parts = [b[k][0] if k in tokens else b[k].reshape(-1, *b[k].shape[1:]) for b in run]
        out[k], out[f"{k}/n"] = np.concatenate(parts), np.array([len(p) for p in parts], np.int64)
    return out


def _runs(element: dict[str, Any]) -> dict[str, Any]:
    """``_joined``'s element as ragged [k, None, ...] per key (``max_seqlen``: [k]), to unbatch."""
    return {k: v if k == "max_seqlen" else tf.RaggedTensor.from_row_lengths(v, element[f"{k}/n"])
            for k, v in element.items() if not k.endswith("/n")}  # fmt: skip


def _hf_split(features: list[str], labels: list[str]):
    """HF's ``split_features_and_labels``: one-key dicts collapse to the tensor itself."""

    def split(batch: dict[str, Any]) -> Any:
        x, y = {k: batch[k] for k in features}, {k: batch[k] for k in labels}
        x = next(iter(x.values())) if len(x) == 1 else x
        return (x, next(iter(y.values())) if len(y) == 1 else y) if y else x

    return split
