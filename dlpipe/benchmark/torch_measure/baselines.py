"""The PyTorch baselines: the padded source fed the usual ways."""

from __future__ import annotations

import functools
import os
import statistics
from typing import Any

import numpy as np

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import time_units
from dlpipe.benchmark.torch_measure.device import PREFETCH_FACTOR, _device, _Model, _torch
from dlpipe.benchmark.torch_measure.stages import _check, _pipeline_notes, _result
from dlpipe.benchmark.torch_measure.timing import _drive, _Stream, _time_h2d, _time_step
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError


class PaddedRows:
    """The old way: a map-style dataset of padded records (``input_ids.npy`` [N, L] memory-mapped,
    ``labels.npy``), one record per ``__getitem__``, the mask from ``input_ids != pad_id``."""

    def __init__(self, source: str, pad_id: int = 0) -> None:
        self.paths = [os.path.join(source, f"{c}.npy") for c in ("input_ids", "labels")]
        for p in self.paths:
            if not os.path.isfile(p):
                raise ConfigError(
                    f"source={source!r} lacks {os.path.basename(p)}; it needs input_ids.npy and labels.npy"
                )
        self.pad_id = pad_id
        self._cols: tuple[np.ndarray, np.ndarray] | None = None
        self.width = int(self._columns()[0].shape[1])

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cols is None:  # opened per process: a pickled memmap would copy all its data
            self._cols = tuple(np.load(p, mmap_mode="r") for p in self.paths)
        return self._cols

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cols": None}

    def __len__(self) -> int:
        return len(self._columns()[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, labels = self._columns()
        row = np.array(ids[i])
        return {
            "input_ids": row,
            MASK: (row != self.pad_id).astype(np.int64),
            "labels": np.array(labels[i], dtype=np.float32),
        }


def _padded_step(
    cfg: BenchConfig, batches: list[dict], device, notes: list[str], width: int
) -> float | None:
    """Where a sleep stands in for DeepCAL, the real step's seconds at the padded width: the old
    way pays for its padding in the step, so its stand-in sleeps that long."""
    if parse_model_spec(cfg.model).kind != "sleep" or not cfg.step_s:
        return None
    try:
        model = _Model("deepcal", device)
    except ConfigError:
        notes.append("step: DeepCAL not available; the padded step was not timed")
        return None
    padded = statistics.median(_time_step(model, batches, 3, widths=1).batch_latencies_s)
    notes.append(
        f"step: the real DeepCAL step at L={width} (padded) takes {padded * 1e3:.1f} ms, "
        f"{padded / cfg.step_s:.2f}x the {cfg.step_s * 1e3:.1f} ms on dlpipe's batches; "
        "the baseline's stand-in sleeps that long"
    )
    return padded


def measure_baselines(cfg: BenchConfig) -> list[FrameworkResult]:
    """The padded source through a map-style Dataset and ``DataLoader`` with default collate."""
    _check(cfg)
    if not cfg.source:
        raise ConfigError(
            "measure_baselines needs cfg.source, the padded input_ids.npy/labels.npy directory"
        )
    torch = _torch()
    from torch.utils.data import DataLoader, DistributedSampler, default_collate

    device = _device(cfg.device)
    model = _Model(cfg.model, device)
    data = PaddedRows(cfg.source)
    if cfg.world_size > 1:
        sampler = DistributedSampler(
            data, num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True, seed=cfg.seed
        )
        kw: dict[str, Any] = {"sampler": sampler}
    else:
        kw = {"shuffle": True, "generator": torch.Generator().manual_seed(cfg.seed)}
    loader = DataLoader(
        data,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        **kw,
    )
    notes = [
        f"model {model.spec}; every record padded to {data.width}",
        f"rank {cfg.rank} of {cfg.world_size}: {len(loader)} batches per epoch, num_workers={cfg.num_workers}",
    ]

    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.steps, max(1, len(data) // cfg.batch_size))
    index = [rng.choice(len(data), cfg.batch_size, replace=False) for _ in range(n)]
    stages = [
        time_units(
            "read",
            [
                (functools.partial(lambda ix: [data[int(i)] for i in ix], ix), len(ix), 1)
                for ix in index
            ],
            cfg.repeats,
        )
    ]
    rows = [[data[int(i)] for i in ix] for ix in index]
    stages.append(
        time_units(
            "batch", [(functools.partial(default_collate, r), len(r), 1) for r in rows], cfg.repeats
        )
    )
    if cfg.num_workers:
        stages[-1].queue_capacity = cfg.num_workers * PREFETCH_FACTOR
    batches = [default_collate(r) for r in rows]
    stages.append(_time_h2d(batches, device, cfg.repeats, notes))
    padded = _padded_step(cfg, batches, device, notes, data.width)
    if padded is not None:
        model = _Model(f"sleep:{padded * 1e3:.3f}", device)
        notes[0] = f"model {model.spec} (the real step at the padded width); every record padded to {data.width}"
    if model.fn is not None:
        stages.append(_time_step(model, batches, cfg.steps))
        if model.spec.kind == "deepcal":
            notes.append(f"step: at L={data.width} (padded) {stages[-1].capacity:,.0f} samples/s")
    run = _drive(lambda r: _Stream(loader, r), model, cfg, device)
    _pipeline_notes(run, stages, notes)
    return [_result("baseline-map-style", run, stages, notes)]
