"""dlpipe's PyTorch loader for ``dlpipe bench``: its stages timed alone, the loader over this
rank's share, and what the pipeline's numbers say."""

from __future__ import annotations

import functools

import numpy as np

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.modes import efficiency, packing_unsupported, plan, shape_note
from dlpipe.benchmark.torch_measure.device import PREFETCH_FACTOR, _Model
from dlpipe.benchmark.torch_measure.timing import _time_h2d, _time_step
from dlpipe.benchmark.window_stages import first_windows, packed_stages, read_parse_stages
from dlpipe.errors import ConfigError


def _dlpipe_stages(
    cfg: BenchConfig, loader, model: _Model, device, notes: list[str]
) -> list[StageMeasurement]:
    from dlpipe.loaders.torch_batches import numpy_to_tensors

    if cfg.padding == "packing":  # both loaders' packer (dlpipe.loaders.packed), numpy
        stages, host = packed_stages(cfg, notes)
        notes.append(f"batch: {shape_note(plan(cfg.padding, cfg.data, cfg.batch_size), host)}")
    else:
        stages, host = _padded_stages(cfg, loader.dataset, notes)
    if cfg.num_workers:
        stages[-1].queue_capacity = cfg.num_workers * PREFETCH_FACTOR
    batches = [numpy_to_tensors(b) for b in host]
    stages.append(_time_h2d(batches, device, cfg.repeats, notes))
    if model.fn is not None:
        stages.append(_time_step(model, batches, cfg.steps))
    return stages


def _padded_stages(cfg: BenchConfig, ds, notes: list[str]) -> tuple[list[StageMeasurement], list[dict]]:
    """read, parse, shuffle and batch of the padded loader's own plan (its ShardIterableDataset
    ``ds``: windows, shuffle, boundaries), and the batches (numpy)."""
    from dlpipe.loaders.collate import collate, take_rows
    from dlpipe.loaders.common import ShardReader, window_batches

    info, shards, enc = ds.source.info, ds.source.shards, ds.encodings
    where = f"rank {cfg.rank} of {cfg.world_size} in {cfg.data!r}"
    windows = first_windows(ds.windows(0), max(cfg.steps, 1) * cfg.batch_size, where)
    reps = cfg.repeats
    stages, cols = read_parse_stages(ShardReader(info, ds.source.columns), info, shards, windows, reps, notes)
    pplan = plan(cfg.padding, cfg.data, cfg.batch_size)
    bounds = ds.boundaries if cfg.padding == "buckets" else None
    length_col = next(n for n, e in enc.items() if e.variable)

    def order(w, c) -> list[np.ndarray]:  # the loader's batches of a window (rows of c)
        lengths = np.diff(c[length_col][1]) // enc[length_col].inner if bounds is not None else None
        return window_batches(w, lengths, batch_size=cfg.batch_size, shuffle=True, seed=ds.seed,
                              epoch=0, rank=ds.rank, boundaries=bounds)  # fmt: skip

    def shuffle(w, c) -> None:
        for rows in order(w, c):
            for n in enc:
                take_rows(c[n], rows)

    units = [(functools.partial(shuffle, w, c), w.num_records, w.num_batches) for w, c in zip(windows, cols)]
    stages.append(time_units("shuffle", units, reps))
    taken = [(rows, {n: take_rows(c[n], rows) for n in enc}) for w, c in zip(windows, cols) for rows in order(w, c)]
    rule = functools.partial(collate, encodings=enc, pad_values=info.pad_values, boundaries=bounds,
                             pad_to_multiple_of=pplan.loader_kwargs.get("pad_to_multiple_of"))  # fmt: skip
    stages.append(time_units("batch", [(functools.partial(rule, p), len(rows), 1) for rows, p in taken], reps))
    host = [rule(p) for _, p in taken]
    notes.append(f"batch: the padding rule (collate); {shape_note(pplan, host)}")
    return stages, host


def _dlpipe_loader(cfg: BenchConfig, device, world_size: int, rank: int):
    """``to_torch_dataloader`` over this rank's share, its batches shaped by ``cfg.padding``."""
    import dlpipe

    kwargs = plan(cfg.padding, cfg.data, cfg.batch_size).loader_kwargs
    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    try:
        return ds.to_torch_dataloader(shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers,
                                      world_size=world_size, rank=rank, pin_memory=device.type == "cuda",
                                      **kwargs)  # fmt: skip
    except TypeError as e:
        if packing_unsupported(e):
            raise ConfigError("padding='packing', but this dlpipe's to_torch_dataloader has no packing "
                              f"argument ({e})") from None
        raise


def _check(cfg: BenchConfig) -> None:
    for name in ("batch_size", "steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}; must be >= 1")
    if cfg.warmup < 0 or cfg.num_workers < 0:
        raise ConfigError(f"warmup={cfg.warmup!r} and num_workers={cfg.num_workers!r} must be >= 0")


def _pipeline_notes(run: dict, stages: list[StageMeasurement], notes: list[str]) -> None:
    """Token efficiency and the prefetch queue; the queue's samples go on the "batch" stage,
    the buffer they describe, so the ledger reports its depth."""
    notes.append(f"pipeline: real tokens are {efficiency(run) or 0:.0%} of the tokens the model computes")
    if run.get("fetch_cpu_s"):
        notes.append(f"main process: {np.median(run['fetch_cpu_s']) * 1e6:.0f} µs of CPU per batch to take it from "
                     "the loader (median; with workers: receiving it, dlpipe.loaders.torch_shm)")
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


def _result(loader: str, run: dict, stages, notes: list[str], padding: str | None = None) -> FrameworkResult:
    return FrameworkResult(
        padding=padding,
        token_efficiency=efficiency(run),
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
