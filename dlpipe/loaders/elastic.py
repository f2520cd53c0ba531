"""Elastic resume: the rest of an epoch after a checkpoint taken under another world size or
number of DataLoader workers.

A PyTorch ``state_dict`` says how many batches the loader handed out in the epoch (ranks step
in lockstep under DDP, so rank 0's count is every rank's). With the world size, the number of
workers and the plan settings that count pins down exactly which records were consumed: each
rank's windows (``common.epoch_windows``), dealt to workers round robin, taken from workers in
turn a bundle of batches at a time (``common.resume_point``), the last window of each worker
part-consumed in its permuted batch order (``common.window_batches``). So the state stays small (counts and
seeds) and the remainder is recomputed where it is loaded.

The remainder is a *stage*: the positions of the epoch order not yet consumed, in order, played
as an epoch order of its own under the new topology (``common.Remainder``): equal shares per
rank, windows, workers, all as usual, so every remaining record is read exactly once and every
rank gets the same number of batches (``uneven="pad"`` repeats a few records to even them out,
as at any epoch's end). A later checkpoint adds its stage to the list: a state is the list of
(world size, workers, batches) per stage, a few numbers per topology change.

Records a topology never reached stay in the remainder: with ``uneven="drop"`` or
``drop_last`` the records an old rank would have skipped at the end are played after the change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dlpipe.errors import ConfigError
from dlpipe.loaders.common import (
    Remainder,
    Window,
    resume_point,
    window_batches,
    worker_windows,
)

# a stage: {"world_size": W, "num_workers": w, "batches_yielded": n, "bundle": k} (batches per
# worker message, ``torch_data.bundle_size``; 1 in states written before bundles)
STAGE_KEYS = ("world_size", "num_workers", "batches_yielded")


def epoch_remainder(plan: Callable[[int, int, Remainder | None], list[Window]], total: int,
                    stages: Sequence[dict[str, Any]], *, batch_size: int, shuffle: bool, seed: int,
                    epoch: int) -> Remainder:
    """What ``stages`` (oldest first) leave of an epoch order of ``total`` positions.
    ``plan(world_size, rank, remainder)`` gives a rank's windows (with ``indices``) in a stage."""
    remainder: Remainder | None = None
    for stage in stages:
        size = total if remainder is None else remainder.total
        consumed = np.zeros(size, bool)
        world, workers, count = (int(stage[k]) for k in STAGE_KEYS)
        bundle = int(stage.get("bundle", 1))
        for rank in range(world):
            windows = plan(world, rank, remainder)
            _mark(consumed, windows, max(workers, 1), count, bundle, batch_size=batch_size, shuffle=shuffle,
                  seed=seed, epoch=epoch, rank=rank)
        remainder = _kept(remainder, np.flatnonzero(~consumed))
    return remainder if remainder is not None else Remainder(np.zeros(1, np.int64), np.array([total]))


def _mark(consumed: np.ndarray, windows: list[Window], workers: int, count: int, bundle: int,
          **draws: Any) -> None:
    """Mark the records one rank had handed out after ``count`` batches."""
    per_worker = [worker_windows(windows, workers, k) for k in range(workers)]
    done, _ = resume_point([sum(w.num_batches for w in ws) for ws in per_worker], count, bundle)
    for ws, left in zip(per_worker, done):
        for w in ws:
            if left <= 0:
                break
            if left >= w.num_batches:
                consumed[w.indices] = True
            else:
                batches = window_batches(w, None, batch_size=draws["batch_size"], shuffle=draws["shuffle"],
                                         seed=draws["seed"], epoch=draws["epoch"], rank=draws["rank"])
                consumed[w.indices[np.concatenate(batches[:left])]] = True
            left -= w.num_batches


def _kept(previous: Remainder | None, kept: np.ndarray) -> Remainder:
    """The positions of the stage indices ``kept`` (sorted), as runs of consecutive positions."""
    if previous is None:
        positions = kept
    else:
        k = np.searchsorted(previous.offsets, kept, "right") - 1
        positions = previous.starts[k] + kept - previous.offsets[k]
    if len(positions) == 0:
        return Remainder(np.zeros(0, np.int64), np.zeros(0, np.int64))
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate([[0], breaks])]
    stops = positions[np.concatenate([breaks - 1, [len(positions) - 1]])] + 1
    return Remainder(starts, stops)


def check_elastic(saved: dict[str, int], world_size: int, *, packing: bool, buckets: bool) -> None:
    """Refuse to resume a state saved under ``saved``'s world size and workers where the
    batches of a part-read window are not a function of the plan alone (they depend on the
    records' lengths): with packing or length buckets the topology must stay the same."""
    why = "packing" if packing else "bucket_boundaries" if buckets else None
    if why:
        raise ConfigError(
            f"this state was saved with world_size={saved['world_size']}, num_workers={saved['num_workers']}; "
            f"resuming under world_size={world_size} with {why} needs the same world size and "
            "num_workers (elastic resume supports padded batches without it)")
