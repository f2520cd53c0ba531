"""dlpipe's TensorFlow pipeline for ``dlpipe bench``: its stages timed alone, and the
``to_tf_dataset`` pipeline over this rank's share."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.drive import time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.tf_measure.device import FEATURE, LABEL, STEP_BATCHES, _Model, _on_device, _tf
from dlpipe.benchmark.tf_measure.timing import _time_dataset, _time_h2d, _time_step
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.defaults import SHUFFLE_BUFFER


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

    pad = info.pad_values.get(FEATURE, 0)

    def padded(rows: dict):
        ids = rows[FEATURE].to_tensor(tf.cast(pad, rows[FEATURE].dtype))  # the longest row's width
        mask = tf.sequence_mask(rows[FEATURE].row_lengths(), tf.shape(ids, out_type=tf.int64)[1])
        return {FEATURE: ids, MASK: tf.cast(mask, tf.int64)}, rows[LABEL]

    batched = serialized.map(decoder.ragged).cache().map(padded, num_parallel_calls=auto)
    stages.append(_time_dataset("batch", batched, reps))
    notes.append(f"parse: the loader's BatchDecoder.ragged (parse_example + decode, no padding) on cached "
                 f"batches of {bs} serialized records; batch: those rows padded to the batch's longest "
                 "with the mask (the loader fuses this into its parse); both num_parallel_calls=AUTOTUNE")  # fmt: skip

    prepared = list(batched)
    widths = [int(f[MASK].shape[1]) for f, _ in prepared]
    notes.append(f"batch: padded to {np.mean(widths):.1f} tokens on average (longest in batch)")
    stages.append(_time_h2d(prepared, device, reps, notes))
    if model.fn is not None:
        stages.append(_time_step("step", model, _on_device(prepared[:STEP_BATCHES], device), cfg))
    return stages


def _plan_shuffle_stage(cfg: BenchConfig, n: int, reps: int) -> StageMeasurement:
    """The shuffled loader's own shuffle work: each window's record permutation and the gather
    of its batches' serialized records (windows read beforehand)."""
    import dlpipe
    from dlpipe.loaders.common import buffer_batches, epoch_windows, window_batches
    from dlpipe.loaders.windows import gather_bytes, read_windows

    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    windows = epoch_windows([s.num_records for s in ds.shards], batch_size=cfg.batch_size, shuffle=True,
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
    """``to_tf_dataset`` over this rank's share (its ``world_size``/``rank``: record ranges)."""
    import dlpipe
    from dlpipe.loaders.tf_data import to_tf_dataset

    world_size = cfg.world_size if world_size is None else world_size
    rank = cfg.rank if rank is None else rank
    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    kw: dict[str, Any] = {"batch_size": batch_size or cfg.batch_size, "columns": [FEATURE, MASK],
                          "label_cols": [LABEL], "shuffle": True, "prefetch": True, "seed": cfg.seed}  # fmt: skip
    how = "single process"
    if world_size > 1:
        kw.update(world_size=world_size, rank=rank)
        how = f"rank {rank} of {world_size}: its record range of the epoch order"
    if notes is not None:
        notes.append(
            f"pipeline: to_tf_dataset({', '.join(f'{k}={v!r}' for k, v in kw.items())}); {how}"
        )
    return to_tf_dataset(ds, **kw)
