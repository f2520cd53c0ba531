"""dlpipe's PyTorch loader for ``dlpipe bench``: its stages timed alone, the loader over this
rank's share, and what the pipeline's numbers say."""

from __future__ import annotations

import functools
import os

import numpy as np

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.torch_measure.device import PREFETCH_FACTOR, _Model
from dlpipe.benchmark.torch_measure.timing import _time_h2d, _time_step
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError


def _first_windows(loader_ds, cfg: BenchConfig) -> list:
    """This rank's first windows of epoch 0, enough for ``steps`` batches (all if fewer)."""
    windows = loader_ds.windows(0)
    need, got, out = max(cfg.steps, 1) * cfg.batch_size, 0, []
    for w in windows:
        out.append(w)
        got += w.num_records
        if got >= need:
            break
    if not out:
        raise ConfigError(f"rank {cfg.rank} of {cfg.world_size} has no records in {cfg.data!r}")
    return out


def _dlpipe_stages(
    cfg: BenchConfig, loader, model: _Model, device, notes: list[str]
) -> list[StageMeasurement]:
    from dlpipe.loaders.common import ShardReader, collate, take_rows, window_batches
    from dlpipe.loaders.dataset import read_window
    from dlpipe.loaders.torch_batches import numpy_to_tensors

    ds = loader.dataset  # the ShardIterableDataset: the loader's own plan and settings
    info, shards, enc = ds.source.info, ds.source.shards, ds.encodings
    windows = _first_windows(ds, cfg)
    reader = ShardReader(info, ds.source.columns)
    reps = cfg.repeats

    # read: the bytes of the windows' records, copied out of the page cache
    spans, total_bytes = [], 0
    for w in windows:
        parts = []
        for s, a, b in w.ranges:
            path = os.path.join(info.root, shards[s].path)
            if info.compression is None:
                idx = reader.index(shards[s])
                off, end = int(idx[a, 0]), int(idx[b - 1, 0] + idx[b - 1, 1])
            else:  # a compressed shard is read whole and decompressed
                off, end = 0, os.path.getsize(path)
            parts.append((path, off, end - off))
            total_bytes += end - off
        spans.append(parts)

    def read(parts) -> None:
        for path, off, count in parts:
            np.fromfile(path, dtype=np.uint8, count=count, offset=off)

    stages = [
        time_units(
            "read",
            [
                (functools.partial(read, p), w.num_records, w.num_batches)
                for p, w in zip(spans, windows)
            ],
            reps,
        )
    ]
    records = sum(w.num_records for w in windows)
    notes.append(
        f"read: {total_bytes / stages[0].seconds / 1e6:,.0f} MB/s from the page cache, "
        f"{total_bytes / records:.0f} bytes per record"
    )

    stages.append(
        time_units(
            "parse",
            [
                (functools.partial(read_window, reader, shards, w), w.num_records, w.num_batches)
                for w in windows
            ],
            reps,
        )
    )
    cols = [read_window(reader, shards, w) for w in windows]
    plan = functools.partial(
        window_batches, batch_size=cfg.batch_size, shuffle=True, seed=ds.seed, epoch=0, rank=ds.rank
    )

    def shuffle(w, c) -> None:
        for rows in plan(w, None):
            for n in enc:
                take_rows(c[n], rows)

    stages.append(
        time_units(
            "shuffle",
            [
                (functools.partial(shuffle, w, c), w.num_records, w.num_batches)
                for w, c in zip(windows, cols)
            ],
            reps,
        )
    )
    taken = [
        (rows, {n: take_rows(c[n], rows) for n in enc})
        for w, c in zip(windows, cols)
        for rows in plan(w, None)
    ]
    pad = info.pad_values
    stages.append(
        time_units(
            "batch",
            [(functools.partial(collate, p, enc, pad), len(rows), 1) for rows, p in taken],
            reps,
        )
    )
    if cfg.num_workers:
        stages[-1].queue_capacity = cfg.num_workers * PREFETCH_FACTOR
    batches = [numpy_to_tensors(collate(p, enc, pad)) for _, p in taken]
    widths = [b[MASK].shape[1] for b in batches]
    notes.append(f"batch: padded to {np.mean(widths):.1f} tokens on average (longest in batch)")
    stages.append(_time_h2d(batches, device, reps, notes))
    if model.fn is not None:
        stages.append(_time_step(model, batches, cfg.steps))
    return stages


def _dlpipe_loader(cfg: BenchConfig, device, world_size: int, rank: int):
    import dlpipe

    return dlpipe.load_dataset(cfg.data, cfg.split).to_torch_dataloader(
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        world_size=world_size,
        rank=rank,
        pin_memory=device.type == "cuda",
    )


def _check(cfg: BenchConfig) -> None:
    for name in ("batch_size", "steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}; must be >= 1")
    if cfg.warmup < 0 or cfg.num_workers < 0:
        raise ConfigError(f"warmup={cfg.warmup!r} and num_workers={cfg.num_workers!r} must be >= 0")


def _pipeline_notes(run: dict, stages: list[StageMeasurement], notes: list[str]) -> None:
    """Token efficiency and the prefetch queue; the queue's samples go on the "batch" stage,
    the buffer they describe, so the ledger reports its depth."""
    notes.append(
        f"pipeline: real tokens are {sum(run['tokens_per_s']) / sum(run['padded_tokens_per_s']):.0%} "
        "of the tokens the model computes"
    )
    if run["queue"] is None:
        notes.append("queue depth: none (num_workers=0 makes each batch on demand in this process)")
        return
    for s in stages:
        if s.name == "batch":
            s.queue_depth_samples = list(run["queue"])
    notes.append(
        f"queue depth: {np.mean(run['queue']):.2f} batches ready on average before a step "
        "(DataLoader result queue)"
    )


def _result(loader: str, run: dict, stages, notes: list[str]) -> FrameworkResult:
    return FrameworkResult(
        framework="torch",
        loader=loader,
        samples_per_s=run["samples_per_s"],
        tokens_per_s=run["tokens_per_s"],
        stages=stages,
        pipeline_queue_samples=run.get("queue"),
        wait_s=run["wait_s"],
        compute_s=run["compute_s"],
        notes=notes,
    )
