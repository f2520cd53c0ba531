"""Stages of dlpipe's numpy reader timed alone, framework-free: ``read`` and ``parse`` of a
rank's windows (the PyTorch loader's path), and the whole ledger of packed batches.

Both loaders make packed batches the same way (``dlpipe.loaders.packed.PackedEpochs``: dlpipe's
reader, then the pack plan in numpy; ``to_tf_dataset`` gets each pack window as a numbered
element through ``tf.py_function``, ``loaders.tf_plan``), so ``packed_stages`` serves both measurers: ``read`` (the windows'
bytes out of the page cache), ``parse`` (``read_window``: index, CRC, decode), ``shuffle`` (each
window's record permutation and gather), ``batch`` (``pack_window``: the permutation again, the
row plan, the rows laid out). Each is timed ``repeats`` times after one untimed pass, the median
pass kept, a window's time spread over its batches.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dlpipe.benchmark.drive import time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.modes import plan
from dlpipe.errors import ConfigError

__all__ = ["first_windows", "packed_epochs", "packed_stages", "read_parse_stages"]


def first_windows(windows: Sequence[Any], records: int, where: str) -> list:
    """The first ``windows`` holding ``records`` records (all if fewer); ``where`` names the
    rank's share in the error when there are none."""
    out, got = [], 0
    for w in windows:
        if not w.ranges:
            continue
        out.append(w)
        got += w.num_records
        if got >= records:
            break
    if not out:
        raise ConfigError(f"{where} has no records")
    return out


def read_parse_stages(reader: Any, info: Any, shards: Sequence[Any], windows: Sequence[Any], repeats: int,
                      notes: list[str]) -> tuple[list[StageMeasurement], list]:  # fmt: skip
    """``read`` and ``parse`` of ``windows`` timed alone, and the windows' columns (ragged)."""
    from dlpipe.loaders.dataset import read_window

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

    nb = [max(1, w.num_batches or 1) for w in windows]
    stages = [time_units("read", [(functools.partial(read, p), w.num_records, k)
                                  for p, w, k in zip(spans, windows, nb)], repeats)]  # fmt: skip
    records = sum(w.num_records for w in windows)
    notes.append(f"read: {total_bytes / stages[0].seconds / 1e6:,.0f} MB/s from the page cache, "
                 f"{total_bytes / records:.0f} bytes per record")  # fmt: skip
    units = [(functools.partial(read_window, reader, shards, w), w.num_records, k) for w, k in zip(windows, nb)]
    stages.append(time_units("parse", units, repeats))
    return stages, [read_window(reader, shards, w) for w in windows]


def packed_epochs(cfg: Any) -> tuple[Any, Any]:
    """(dataset, ``PackedEpochs``) of ``cfg``'s packing plan for its rank: the packed batches
    both loaders yield for these arguments."""
    import dlpipe
    from dlpipe.loaders.options import LoaderOptions, resolve_shuffle
    from dlpipe.loaders.packed import PackedEpochs

    kwargs = plan("packing", cfg.data, cfg.batch_size).loader_kwargs
    opts = LoaderOptions(shuffle=True, seed=cfg.seed, world_size=cfg.world_size, rank=cfg.rank, **kwargs)
    ds, config = resolve_shuffle(dlpipe.load_dataset(cfg.data, cfg.split), opts)
    return ds, PackedEpochs(ds, opts, config, {n: ds.info.columns[n] for n in ds.columns})


def packed_stages(cfg: Any, notes: list[str]) -> tuple[list[StageMeasurement], list[dict[str, np.ndarray]]]:
    """read, parse, shuffle and batch of packed batches (see the module docstring) over the
    first pack windows holding ``steps x batch_size`` records; and the batches (numpy)."""
    from dlpipe.loaders.collate import take_rows

    ds, packer = packed_epochs(cfg)
    where = f"rank {cfg.rank} of {cfg.world_size} in {cfg.data!r}"
    windows = first_windows(packer.windows(0), max(cfg.steps, 1) * cfg.batch_size, where)
    reader = ds.reader()
    stages, cols = read_parse_stages(reader, ds.info, ds.shards, windows, cfg.repeats, notes)

    def shuffle(w, c) -> None:
        rows = np.random.default_rng([packer.seed, 0, cfg.rank, w.index]).permutation(w.num_records)
        for col in c.values():
            take_rows(col, rows)

    units = [(functools.partial(shuffle, w, c), w.num_records, w.num_batches) for w, c in zip(windows, cols)]
    stages.append(time_units("shuffle", units, cfg.repeats))
    units = [(functools.partial(packer.pack_window, c, w, 0), w.num_records, w.num_batches)
             for w, c in zip(windows, cols)]  # fmt: skip
    stages.append(time_units("batch", units, cfg.repeats))
    batches = [b for w, c in zip(windows, cols) for b in packer.pack_window(c, w, 0)[: w.num_batches]]
    notes.append(f"packing: dlpipe.loaders.packed.PackedEpochs, both loaders' packer: pack windows of "
                 f"{packer.window_records:,} records; read/parse: dlpipe's reader (read_window); shuffle: a "
                 "window's record permutation and gather; batch: pack_window (permutation, row plan, rows "
                 "laid out)")  # fmt: skip
    return stages, batches
