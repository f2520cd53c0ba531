"""How well a shuffle mixes: figures of a yielded order against the source order.

``plan_order`` replays the epoch plan that the PyTorch loader and the shuffled tf.data pipeline
both follow (tests show they yield the same batches), so ``dlpipe bench`` can report the
quality of the order it trained on without collecting record ids from either framework.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dlpipe.loaders.common import buffer_batches, window_batches

__all__ = ["order_quality", "plan_order"]


def order_quality(order: np.ndarray, n: int) -> dict[str, Any]:
    """Figures of ``order`` (the source positions 0..n-1 of the records, in yield order):
    Spearman's rank correlation with the yield position (1 = source order, ~0 = none of it),
    mean displacement as a share of ``n`` (~1/3 for a uniform shuffle), the share of yields that
    follow their predecessor in the source (runs a block shuffle leaves), and exactly-once."""
    order = np.asarray(order, dtype=np.int64)
    m = len(order)
    inside = bool(m == 0 or (order.min() >= 0 and order.max() < n))
    counts = np.bincount(order, minlength=n) if inside and m else np.zeros(n, np.int64)
    pos = np.arange(m, dtype=np.float64)
    uniq, inverse, cnt = np.unique(order, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(cnt)[:-1]]).astype(np.float64)
    ranks = (first + (cnt - 1) / 2.0)[inverse]  # ties share the mean of their ranks
    return {
        "rank_correlation": float(np.corrcoef(pos, ranks)[0, 1]) if m > 1 and len(uniq) > 1 else math.nan,
        "mean_displacement": float(np.mean(np.abs(pos - order))) / n if m and n else math.nan,
        "next_is_prev_plus_1": float(np.mean(np.diff(order) == 1)) if m > 1 else math.nan,
        "exactly_once": bool(inside and m == n and (counts == 1).all()),
        "missing": int((counts == 0).sum()) if inside else None,
        "repeated": int((counts > 1).sum()) if inside else None,
    }


def plan_order(ds: Any, batch_size: int, *, epoch: int = 0) -> np.ndarray:
    """Source positions (records numbered through the split's shards in manifest order) in the
    order a single-process loader over ``ds`` yields them in ``epoch``."""
    sizes = [s.num_records for s in ds.shards]
    cfg = ds.shuffle_config
    first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    windows = ds.plan_windows(batch_size=batch_size, shuffle=cfg.shuffled, seed=cfg.plan_seed,
                            epoch=epoch, window_batches=buffer_batches(cfg.buffer_size, batch_size),
                            block_records=cfg.block_records)
    out = []
    for w in windows:
        positions = np.concatenate([np.arange(first[s] + a, first[s] + b) for s, a, b in w.ranges])
        rows = window_batches(w, None, batch_size=batch_size, shuffle=cfg.shuffled,
                              seed=cfg.plan_seed, epoch=epoch, rank=0)
        out += [positions[r] for r in rows]
    return np.concatenate(out) if out else np.empty(0, np.int64)
