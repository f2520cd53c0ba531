"""dlpipe's TensorFlow pipeline for ``dlpipe bench``: its stages timed alone, and the
``to_tf_dataset`` pipeline over this rank's share."""

from __future__ import annotations

import functools
import os
from typing import Any

from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.drive import time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.modes import packing_unsupported, plan, shape_note
from dlpipe.benchmark.tf_measure.device import FEATURE, LABEL, STEP_BATCHES, _Model, _on_device, _tf
from dlpipe.benchmark.tf_measure.timing import _time_dataset, _time_h2d, _time_step
from dlpipe.benchmark.window_stages import packed_stages
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.defaults import SHUFFLE_BUFFER
from dlpipe.errors import ConfigError


def _rank_files(info, cfg: BenchConfig) -> list[str]:
    """The split's files (a single process; several read through the epoch plan, see _planned)."""
    return [os.path.join(info.root, s.path) for s in info.split_shards(cfg.split)]


def _compression(info) -> str:
    return {None: "", "gzip": "GZIP", "zlib": "ZLIB"}.get(info.compression, "")


def _dlpipe_stages(
    cfg: BenchConfig, info, model: _Model, device: str, notes: list[str]
) -> list[StageMeasurement]:
    from dlpipe.loaders.tf_decode import BatchDecoder

    tf = _tf()
    if cfg.padding == "packing":  # both loaders' packer (dlpipe.loaders.packed), numpy
        stages, host = packed_stages(cfg, notes)
        notes.append("packing: to_tf_dataset gets each pack window from dlpipe's reader as a numbered element "
                     "(tf.py_function, checkpointable) and lays the rows out in the graph")
        prepared = [({k: tf.constant(v) for k, v in b.items() if k != LABEL}, tf.constant(b[LABEL])) for b in host]
        return _finish(cfg, stages, prepared, model, device, notes)
    auto = tf.data.AUTOTUNE
    n, reps, bs = cfg.steps * cfg.batch_size, cfg.repeats, cfg.batch_size
    shuffled = _planned(cfg)  # the loader's read through the epoch plan, when it takes that path
    if shuffled is not None:
        stages = [_time_dataset("read", shuffled.take(-(-n // bs)), reps)]
        records = shuffled.unbatch().take(n)  # the later stages start from these records, cached
        notes.append("read: as to_tf_dataset reads shuffled uncompressed shards, or any split over ranks: "
                     "through the epoch plan (dlpipe's reader gathers each batch's serialized records from "
                     "blocks permuted across the split, this rank's record range of it; one generator element "
                     "per ~8k records, cut with tf.strings.substr), which includes the shuffle; shuffle: the "
                     "plan's permutation and gather alone, on windows read beforehand")  # fmt: skip
    else:  # compressed shards, one process: files interleaved in blocks of serialized records
        from dlpipe.loaders.tf_data import _BLOCK

        files, comp = _rank_files(info, cfg), _compression(info)
        blocks = tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=comp).batch(_BLOCK),
            cycle_length=min(len(files), 16), num_parallel_calls=auto, deterministic=True,
        )  # fmt: skip
        stages = [_time_dataset("read", blocks.rebatch(bs).take(-(-n // bs)), reps)]
        records = blocks.unbatch().take(n)
        plain = _time_dataset("read", tf.data.TFRecordDataset(files, compression_type=comp).take(n).batch(bs), 1)
        nbytes = sum(os.path.getsize(f) for f in files)
        notes.append(f"read: {len(files)} shard file(s) ({nbytes / 1e6:.1f} MB) interleaved as to_tf_dataset "
                     f"does (blocks of {_BLOCK} serialized records, rebatched), one element per batch; one "
                     f"TFRecordDataset reading the files in turn: {plain.capacity:,.0f} records/s")  # fmt: skip

    encodings = {c: info.columns[c] for c in (FEATURE, LABEL)}
    decoder = BatchDecoder(encodings, info.pad_values, pad_to_multiple_of=None, boundaries=None,
                           padding_side="right", return_attention_mask=True)  # fmt: skip
    serialized = records.batch(bs).cache()
    stages.append(
        _time_dataset("parse", serialized.map(decoder.ragged, num_parallel_calls=auto), reps)
    )
    if shuffled is None:
        stages.append(_time_dataset("shuffle", records.cache().shuffle(SHUFFLE_BUFFER, seed=cfg.seed).batch(bs), reps))
    else:
        stages.append(_plan_shuffle_stage(cfg, n, reps))

    stage, prepared, how = _batch_stage(cfg, info, serialized.map(decoder.ragged).cache(),
                                        lambda size: records.batch(size).map(decoder.ragged).cache())
    stages.append(stage)
    notes.append(f"parse: the loader's BatchDecoder.ragged (parse_example + decode, no padding) on cached "
                 f"batches of {bs} serialized records; batch: {how}; num_parallel_calls=AUTOTUNE")  # fmt: skip
    return _finish(cfg, stages, prepared, model, device, notes)


def _finish(cfg: BenchConfig, stages: list, prepared: list, model: _Model, device: str, notes: list[str]) -> list:
    """The shape note, then ``h2d`` and ``step`` on the prepared (features, labels) batches."""
    pplan = plan(cfg.padding, cfg.data, cfg.batch_size)
    notes.append("batch: " + shape_note(pplan, [f | {LABEL: y} for f, y in prepared]))
    stages.append(_time_h2d(prepared, device, cfg.repeats, notes))
    if model.fn is not None:
        stages.append(_time_step("step", model, _on_device(prepared[:STEP_BATCHES], device), cfg))
    return stages


def _batch_stage(cfg: BenchConfig, info, parsed, windows) -> tuple[StageMeasurement, list, str]:
    """The "batch" stage of ``cfg.padding`` over ``parsed`` (cached batches of ragged records;
    ``windows(n)``: cached windows of n ragged records), timed; its batches as (features,
    labels), and what it does."""
    tf = _tf()
    auto, bs = tf.data.AUTOTUNE, cfg.batch_size
    pad = info.pad_values.get(FEATURE, 0)
    pplan = plan(cfg.padding, cfg.data, bs)

    def padded(rows: dict, width=None):  # width None: the batch's longest record
        lengths, value = rows[FEATURE].row_lengths(), tf.cast(pad, rows[FEATURE].dtype)
        if width is None:
            ids = rows[FEATURE].to_tensor(value)
        else:
            ids = rows[FEATURE].to_tensor(value, shape=tf.stack([tf.size(lengths, out_type=tf.int64), width]))
        mask = tf.sequence_mask(lengths, tf.shape(ids, out_type=tf.int64)[1])
        return {FEATURE: ids, MASK: tf.cast(mask, tf.int64)}, rows[LABEL]

    if cfg.padding == "buckets":
        from dlpipe.loaders import common
        from dlpipe.loaders.collate import default_boundaries

        bounds = tf.constant(default_boundaries(info, FEATURE), tf.int64)
        window = max(SHUFFLE_BUFFER // bs, getattr(common, "BUCKET_WINDOW_BATCHES", 64)) * bs

        def group(rows: dict) -> dict:  # a window sorted by bucket, cut into whole batches
            order = tf.argsort(tf.searchsorted(bounds, rows[FEATURE].row_lengths()), stable=True)
            order = order[: tf.size(order) // bs * bs]
            ids = tf.RaggedTensor.from_uniform_row_length(tf.gather(rows[FEATURE], order), bs)
            return {FEATURE: ids, LABEL: tf.reshape(tf.gather(rows[LABEL], order), [-1, bs, 2])}

        def to_boundary(rows: dict):
            longest = tf.reduce_max(rows[FEATURE].row_lengths())
            i = tf.minimum(tf.searchsorted(bounds, longest[None], out_type=tf.int64)[0],
                           tf.size(bounds, out_type=tf.int64) - 1)  # fmt: skip
            return padded(rows, tf.maximum(bounds[i], longest))

        batched = windows(window).map(group).unbatch().map(to_boundary, num_parallel_calls=auto)
        how = (f"windows of {window} records sorted by length bucket (searchsorted, one stable argsort and "
               "gather per window, as to_tf_dataset groups them), cut into batches, each padded to its "
               'bucket\'s boundary (bucket_boundaries="auto"); a window\'s partial batch left out')
    else:
        width = tf.constant(pplan.max_length, tf.int64) if cfg.padding == "fixed" else None
        batched = parsed.map(functools.partial(padded, width=width), num_parallel_calls=auto)
        how = f"those rows padded ({pplan.text}) with the mask (the loader fuses this into its parse)"
    return _time_dataset("batch", batched, cfg.repeats), list(batched), how


def _plan_shuffle_stage(cfg: BenchConfig, n: int, reps: int) -> StageMeasurement:
    """The shuffled loader's own shuffle work: each window's record permutation and the gather
    of its batches' serialized records (windows read beforehand)."""
    import dlpipe
    from dlpipe.loaders.common import buffer_batches, window_batches
    from dlpipe.loaders.windows import gather_bytes, read_windows

    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    windows = ds.plan_windows(batch_size=cfg.batch_size, shuffle=True, epoch=0,
                            seed=cfg.seed, window_batches=buffer_batches(ds.buffer_size, cfg.batch_size),
                            world_size=cfg.world_size, rank=cfg.rank, block_records=ds.block_records)  # fmt: skip
    todo, total = [], 0
    for w in windows:
        if total >= n:
            break
        todo.append(w)
        total += w.num_records
    read = list(read_windows(ds.reader(), ds.shards, todo, serialized=True))

    def shuffle(w, buf, starts, ends) -> None:
        for rows in window_batches(w, None, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0,
                                   rank=cfg.rank):
            gather_bytes(buf, starts[rows], ends[rows])

    units = [(functools.partial(shuffle, w, *r), w.num_records, w.num_batches) for w, r in zip(todo, read)]
    return time_units("shuffle", units, reps)


def _planned(cfg: BenchConfig):
    """Serialized batches of this rank's share as the shuffled loader reads them (the epoch plan,
    ``loaders.tf_plan``), or None where ``to_tf_dataset`` reads files front to back instead
    (compressed shards in a single process)."""
    import dlpipe
    from dlpipe.loaders.tf_plan import planned_batches

    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    if ds.block_records is None and cfg.world_size == 1:
        return None
    return planned_batches(ds, cfg.batch_size, seed=cfg.seed, drop_remainder=False,
                           world_size=cfg.world_size, rank=cfg.rank)


def _dlpipe_dataset(cfg: BenchConfig, *, batch_size: int | None = None, world_size: int | None = None,
                    rank: int | None = None, notes: list[str] | None = None):  # fmt: skip
    """``to_tf_dataset`` over this rank's share (its ``world_size``/``rank``: record ranges), its
    batches shaped by ``cfg.padding`` (``batch_size`` overrides the plan's, padded modes only)."""
    import dlpipe
    from dlpipe.loaders.tf_data import to_tf_dataset

    world_size = cfg.world_size if world_size is None else world_size
    rank = cfg.rank if rank is None else rank
    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    kw: dict[str, Any] = plan(cfg.padding, cfg.data, cfg.batch_size).loader_kwargs
    if cfg.padding != "packing":  # packed batches: every column in one dict (segment keys too)
        kw |= {"batch_size": batch_size or cfg.batch_size, "columns": [FEATURE, MASK], "label_cols": [LABEL]}
    kw |= {"shuffle": True, "prefetch": True, "seed": cfg.seed}
    how = "single process"
    if world_size > 1:
        kw.update(world_size=world_size, rank=rank)
        how = f"rank {rank} of {world_size}: its record range of the epoch order"
    if notes is not None:
        notes.append(
            f"pipeline: to_tf_dataset({', '.join(f'{k}={v!r}' for k, v in kw.items())}); {how}"
        )
    try:
        return to_tf_dataset(ds, **kw)
    except TypeError as e:
        if packing_unsupported(e):
            raise ConfigError(f"padding='packing', but this dlpipe's to_tf_dataset has no packing argument ({e})") from None
        raise
