"""The shard plan, made before any shard is written: which records go to which split and shard.

(Not the loaders' epoch plan in ``dlpipe.loaders``: that one orders the records of finished
shards for each epoch and rank of a reader.)

Shards are contiguous runs of the (optionally shuffled) record order, balanced by estimated
output bytes or by tokens rather than by record counts, so every shard costs a reader about the
same. Names follow HF: ``train-00000-of-00016.tfrecord``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dlpipe.errors import ConfigError


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: records ``order[split_start + start : split_start + stop]``."""

    split: str
    shard: int
    num_shards: int
    filename: str
    start: int  # into the split's record order
    stop: int

    @property
    def num_records(self) -> int:
        return self.stop - self.start


def parse_splits(splits: Mapping[str, float] | str | None) -> dict[str, float]:
    """``"train=0.9,validation=0.1"`` or a mapping → {name: fraction}, fractions summing to 1."""
    if splits is None:
        return {"train": 1.0}
    if isinstance(splits, str):
        parsed = {}
        for part in splits.split(","):
            name, sep, frac = part.partition("=")
            try:
                parsed[name.strip()] = float(frac)
            except ValueError:
                raise ConfigError(f"splits={splits!r}: use NAME=FRACTION pairs, e.g. train=0.9,validation=0.1") from None
            if not sep or not name.strip():
                raise ConfigError(f"splits={splits!r}: use NAME=FRACTION pairs, e.g. train=0.9,validation=0.1")
        splits = parsed
    splits = dict(splits)
    if not splits or any(f < 0 for f in splits.values()) or not math.isclose(sum(splits.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"splits={splits!r}: fractions must be non-negative and sum to 1")
    for name in splits:
        if not name.replace("_", "").isalnum():
            raise ConfigError(f"split name {name!r}: use letters, digits and underscores")
    return splits


def split_bounds(num_records: int, fractions: Mapping[str, float]) -> dict[str, tuple[int, int]]:
    """Contiguous [lo, hi) ranges of the record order for each split, in the given order."""
    bounds, lo, acc = {}, 0, 0.0
    names = list(fractions)
    for i, name in enumerate(names):
        acc += fractions[name]
        hi = num_records if i == len(names) - 1 else int(round(acc * num_records))
        bounds[name] = (lo, hi)
        lo = hi
    return bounds


def record_order(num_records: int, *, shuffle: bool, seed: int) -> np.ndarray | None:
    """The global permutation written to shards, or None for source order."""
    if not shuffle:
        return None
    order = np.random.default_rng(seed).permutation(num_records)
    return order.astype(np.uint32) if num_records < 2**32 else order


def shard_count(
    total_bytes: float, *, num_shards: int | None, shard_size: int | None, multiple_of: int
) -> int:
    if multiple_of < 1:
        raise ConfigError(f"num_shards_multiple_of={multiple_of}; must be >= 1")
    if num_shards is not None:
        if num_shards < 1:
            raise ConfigError(f"num_shards={num_shards}; must be >= 1")
        n = num_shards
    else:
        n = max(1, math.ceil(total_bytes / shard_size)) if shard_size else 1
    return math.ceil(n / multiple_of) * multiple_of


def balance(lengths: np.ndarray, num_shards: int, *, scale: float = 1.0, offset: float = 0.0,
            block: int = 4096) -> np.ndarray:
    """num_shards+1 boundaries cutting records (in order) into runs of near-equal total cost,
    where record i costs ``lengths[i] * scale + offset``.

    Each cut is the record boundary nearest to its share of the total. The cost of records
    ``[0, i)`` is ``scale * (sum of their lengths) + offset * i``, with the sum exact for integer
    lengths; it is summed a ``block`` of records at a time, and running sums are taken only inside
    the blocks that hold a cut, so the plan allocates no array the size of the dataset (each fresh
    page of one costs more than the sums). No shard is left empty while another holds several
    records.
    """
    n = len(lengths)
    if n == 0:
        return np.zeros(num_shards + 1, dtype=np.int64)
    acc = np.int64 if lengths.dtype.kind in "iub" else np.float64
    whole = n - n % block
    sums = np.add.reduce(lengths[:whole].reshape(-1, block), axis=1, dtype=acc)
    if whole < n:
        sums = np.append(sums, np.sum(lengths[whole:], dtype=acc))
    ends = np.cumsum(sums)  # lengths summed up to each block's end
    block_stop = np.minimum(np.arange(1, len(sums) + 1, dtype=np.int64) * block, n)
    end_cost = scale * ends + offset * block_stop
    targets = end_cost[-1] * np.arange(1, num_shards) / num_shards
    where = np.minimum(np.searchsorted(end_cost, targets, side="left"), len(sums) - 1)
    cuts = np.empty(num_shards - 1, dtype=np.int64)
    for b in np.unique(where):
        lo, hi = int(b) * block, int(block_stop[b])
        before = ends[b - 1] if b else acc(0)
        cum = scale * (before + np.cumsum(lengths[lo:hi], dtype=acc)) + offset * np.arange(lo + 1, hi + 1)
        mine = where == b
        t = targets[mine]
        idx = np.minimum(np.searchsorted(cum, t, side="left"), len(cum) - 1)
        prev = np.where(idx > 0, cum[np.maximum(idx - 1, 0)], scale * before + offset * lo)
        take_prev = np.abs(prev - t) <= np.abs(cum[idx] - t)
        cuts[mine] = lo + np.where(take_prev, idx, idx + 1)
    cuts = np.clip(np.maximum.accumulate(cuts), 0, n)
    if n >= num_shards:
        # cut i - i must be non-decreasing, within [0, n - num_shards]: cuts rise by >= 1
        i = np.arange(1, num_shards)
        cuts = np.clip(np.maximum.accumulate(cuts - i), 0, n - num_shards) + i
    return np.concatenate([[0], cuts, [n]]).astype(np.int64)


def shard_name(split: str, shard: int, num_shards: int, suffix: str) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}{suffix}"


def plan_shards(
    lengths: np.ndarray,
    bounds: Mapping[str, tuple[int, int]],
    *,
    suffix: str,
    num_shards: int | None,
    shard_size: int | None,
    multiple_of: int,
    scale: float = 1.0,
    offset: float = 0.0,
) -> list[ShardTask]:
    """The shard plan: shard tasks for every split. Record i (in record order) costs ``lengths[i] * scale + offset``.

    With ``num_shards``, the largest split gets that many shards and the others a share in
    proportion to their cost (at least one, and a multiple of ``multiple_of``).
    """
    totals = {s: scale * float(np.sum(lengths[lo:hi], dtype=np.float64)) + offset * (hi - lo)
              for s, (lo, hi) in bounds.items()}
    biggest = max(totals.values(), default=0.0) or 1.0
    tasks: list[ShardTask] = []
    for split, (lo, hi) in bounds.items():
        if hi <= lo and len(bounds) > 1:
            continue  # an empty split gets no shards
        if num_shards is not None:
            want = max(1, round(num_shards * totals[split] / biggest))
            count = shard_count(0, num_shards=want, shard_size=None, multiple_of=multiple_of)
        else:
            count = shard_count(totals[split], num_shards=None, shard_size=shard_size, multiple_of=multiple_of)
        cuts = balance(lengths[lo:hi], count, scale=scale, offset=offset)
        for i in range(count):
            tasks.append(ShardTask(split, i, count, shard_name(split, i, count, suffix), int(cuts[i]), int(cuts[i + 1])))
    return tasks
