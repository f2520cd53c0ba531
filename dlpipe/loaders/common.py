"""What every loader shares, so TensorFlow and PyTorch batches follow one rule.

- **Reading**: ``ShardReader`` (``dlpipe.loaders.shard_reader``) turns a record range of a shard,
  local or in object storage, into ragged columns (flat values in the logical dtype + row
  splits), using the shard's ``.index`` to find bytes, checking CRCs, and decoding many records
  per call.
- **Padding rule**: ``dlpipe.loaders.collate``.
- **Epoch plan**: the split is cut into pieces; unshuffled, a piece is a shard, in manifest
  order. Shuffled, a piece is a *block* of ``block_records`` consecutive records of a shard and
  the blocks of the whole split are permuted per (seed, epoch) (a global shuffle: a dataset of
  one shard is mixed as well as one of a thousand); where shards cannot be read from the middle
  (compressed), the pieces are whole shards, permuted. The records in piece order are cut into
  equal ranges per rank; each rank's range into batch-aligned windows (the shuffle buffer);
  windows are dealt round-robin to loader workers in *runs* of consecutive windows (one window
  each, unless a shuffle block holds several: then a run is about a block's windows, so that a
  worker reading over object storage gets neighbouring bytes in one request); inside a window
  records are shuffled (and grouped by length bucket). Every piece is a pure function of its
  inputs, so a stream can be resumed exactly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.defaults import MASK_COLUMN
from dlpipe.errors import ConfigError
from dlpipe.formats.index import read_index  # noqa: F401  (re-exported)
from dlpipe.loaders.collate import bucket_ids
from dlpipe.loaders.shard_reader import ShardReader  # noqa: F401  (re-exported)

MASK = MASK_COLUMN
UNEVEN = ("pad", "drop")
SHUFFLE_BLOCKS = 4096  # blocks per split a global shuffle aims for (shuffle_block_records)
MAX_BLOCK_RECORDS = 256
MIN_RUNS = 16  # runs of windows per rank an epoch is dealt in, at least (where it has as many windows)


# ---------------------------------------------------------------------------------------------
# epoch plan


@dataclass(frozen=True)
class Window:
    """A batch-aligned run of one rank's records: ``ranges`` are (shard position, start, stop);
    ``indices`` (only when ``epoch_windows`` is asked for them): each record's stage index, in
    the order the records are read; ``run``: the run of windows one loader worker reads in a row
    (``worker_windows``; None: a run of its own)."""

    index: int
    ranges: tuple[tuple[int, int, int], ...]
    num_records: int
    num_batches: int
    indices: np.ndarray | None = field(default=None, compare=False, repr=False)
    run: int | None = None


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Shard positions in the order an epoch reads them (HF: the effective seed is seed + epoch)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng(seed + epoch).permutation(num_shards)


def shuffle_block_records(num_rows: int, *, min_bytes: int = 0, bytes_per_record: float = 0.0) -> int:
    """Records per block of a global shuffle: small enough that the split has about
    ``SHUFFLE_BLOCKS`` blocks (the yielded order's rank correlation with the source order is then
    about 1/sqrt(blocks), ~0.016), at most ``MAX_BLOCK_RECORDS`` (reads stay runs of records,
    decoded many blocks per call), and at least ``min_bytes`` of records where each block costs
    a request (object storage without a cache)."""
    records = min(MAX_BLOCK_RECORDS, max(1, -(-num_rows // SHUFFLE_BLOCKS)))
    if min_bytes and bytes_per_record > 0:
        records = max(records, math.ceil(min_bytes / bytes_per_record))
    return records


def epoch_pieces(shard_sizes: Sequence[int], *, shuffle: bool, seed: int, epoch: int,
                 block_records: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard position, start, stop) of each piece of the split, in the order an epoch reads them
    (see the module docstring): shards, or with ``shuffle`` and ``block_records`` blocks of the
    whole split permuted with (seed, epoch)."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    if not (shuffle and block_records):
        order = shard_order(len(sizes), shuffle=shuffle, seed=seed, epoch=epoch)
        return order, np.zeros(len(order), np.int64), sizes[order]
    if block_records < 1:
        raise ConfigError(f"block_records={block_records}; must be >= 1")
    per_shard = -(-sizes // block_records)
    shard = np.repeat(np.arange(len(sizes)), per_shard)
    first = np.concatenate([[0], np.cumsum(per_shard)[:-1]]).astype(np.int64)
    start = (np.arange(len(shard)) - np.repeat(first, per_shard)) * block_records
    stop = np.minimum(start + block_records, sizes[shard])
    perm = np.random.default_rng([seed, epoch]).permutation(len(shard))
    return shard[perm], start[perm], stop[perm]


def rank_share(total: int, world_size: int, rank: int, uneven: str = "pad") -> tuple[int, int]:
    """[lo, hi) of this rank in the epoch's record order (may pass ``total``: those wrap around).

    Every rank gets the same number of records, so the same number of batches, and DDP never
    waits at the end of an epoch. ``pad`` (as DistributedSampler): ceil(total / world) each, the
    shortfall filled by repeating records from the start of the epoch; ``drop``: floor, the last
    ``total % world`` records of the epoch are skipped (other ones each epoch when shuffled).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is outside world_size={world_size}")
    if uneven not in UNEVEN:
        raise ConfigError(f"uneven={uneven!r}; use 'pad' or 'drop'")
    per_rank = -(-total // world_size) if uneven == "pad" else total // world_size
    return rank * per_rank, (rank + 1) * per_rank


def buffer_batches(buffer_size: int, batch_size: int) -> int:
    """Batches per window: the shuffle buffer rounded up to whole batches, so windows never share
    a batch (the one rule of every loader)."""
    return max(1, -(-buffer_size // batch_size))


class PieceOrder:
    """An epoch's records in reading order (``epoch_pieces``): position p of [0, total) is a
    record of a piece. ``sort``: windows read their ranges in shard and record order (a
    shuffled window is permuted anyway), touching ones merged; else in position order."""

    def __init__(self, pieces: tuple[np.ndarray, np.ndarray, np.ndarray], *, sort: bool) -> None:
        self.pieces = tuple(x.tolist() for x in pieces)
        self.bounds = [0, *np.cumsum(pieces[2] - pieces[1]).tolist()]
        self.total = self.bounds[-1]
        self.sort = sort

    def ranges(self, a: int, b: int, *, positions: bool = False) -> list[tuple]:
        """Positions [a, b) (0 <= a <= b <= total) as (shard, start, stop) runs in position order;
        ``positions``: each run with the positions it holds, (shard, start, stop, ndarray)."""
        out = _ranges(a, b, self.total, self.bounds, self.pieces)
        if not positions:
            return out
        firsts = np.cumsum([a] + [r[2] - r[1] for r in out[:-1]])
        return [(*r, np.arange(p, p + r[2] - r[1])) for r, p in zip(out, firsts.tolist())]


class Remainder:
    """What is left of an epoch after a checkpoint taken under another world size or number
    of workers (``dlpipe.loaders.elastic``): sorted, disjoint intervals [starts, stops) of the
    epoch order's positions, played in position order as a shorter epoch order of its own."""

    def __init__(self, starts: np.ndarray, stops: np.ndarray) -> None:
        self.starts = np.asarray(starts, np.int64)
        self.stops = np.asarray(stops, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.stops - self.starts)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def spans(self, i: int, j: int) -> list[tuple[int, int, int]]:
        """Indices [i, j) of this order (0 <= i <= j <= total) as (first index, position start,
        position stop) runs."""
        out = []
        k = int(np.searchsorted(self.offsets, i, "right")) - 1
        while i < j:
            take = min(j, int(self.offsets[k + 1])) - i
            p = int(self.starts[k]) + i - int(self.offsets[k])
            out.append((i, p, p + take))
            i += take
            k += 1
        return out


def stage_spans(remainder: Remainder | None, total: int, i: int, j: int) -> list[tuple[int, int, int]]:
    """Indices [i, j) of an epoch's stage order (may pass its length: those wrap around, as
    ``rank_share`` pads) as (first index, position start, position stop) runs of the epoch order.
    Without a ``remainder`` index and position are the same."""
    out = []
    while i < j:
        k = i % total
        take = min(j - i, total - k)
        out.extend([(k, k, k + take)] if remainder is None else remainder.spans(k, k + take))
        i += take
    return out


def epoch_windows(
    shard_sizes: Sequence[int] | PieceOrder | Any,
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    window_batches: int = 16,
    drop_last: bool = False,
    uneven: str = "pad",
    block_records: int | None = None,
    remainder: Remainder | None = None,
    indices: bool = False,
    run_records: int | None = None,
) -> list[Window]:
    """This rank's windows for one epoch (see the module docstring). ``shard_sizes`` may be an
    epoch order instead (``PieceOrder``, or a mixture's, ``loaders.mixture.MixedOrder``; then
    ``shuffle``/``seed``/``block_records`` are its business). A window of blocks has its ranges
    in shard and record order, touching ones merged, so it is read with one decode call per
    shard; its records are permuted anyway (``window_batches``).

    ``remainder``: play only what a checkpoint under another topology left of the epoch
    (``loaders.elastic``). ``indices``: each window also gets ``indices``, the stage index of
    each of its records in the order they are read (what ``loaders.elastic`` counts).

    ``run_records`` (the shuffle block): windows go to loader workers in runs of that many
    records' worth of windows (``run_windows``), which read their neighbouring bytes together."""
    if batch_size < 1 or window_batches < 1:
        raise ConfigError(f"batch_size={batch_size} and window_batches={window_batches} must be >= 1")
    order = shard_sizes
    if not hasattr(order, "ranges"):
        arrays = epoch_pieces(shard_sizes, shuffle=shuffle, seed=seed, epoch=epoch, block_records=block_records)
        order = PieceOrder(arrays, sort=bool(shuffle and block_records))
    total = order.total if remainder is None else remainder.total
    if total == 0:
        return []
    lo, hi = rank_share(total, world_size, rank, uneven)
    count = hi - lo
    if drop_last:
        count = count // batch_size * batch_size
    window = window_batches * batch_size
    run = run_windows(run_records, window, -(-count // window))
    windows = []
    for w, a in enumerate(range(0, count, window)):
        b = min(count, a + window)
        spans = stage_spans(remainder, total, lo + a, lo + b)
        if indices:
            runs = [(*r[:3], r[3] - p + k) for k, p, q in spans for r in order.ranges(p, q, positions=True)]
            if order.sort:
                runs.sort(key=lambda r: r[:3])
            ranges = [r[:3] for r in runs]
            idx: np.ndarray | None = np.concatenate([r[3] for r in runs]) if runs else np.zeros(0, np.int64)
        else:
            idx = None
            ranges = [r for _, p, q in spans for r in order.ranges(p, q)]
            if order.sort:
                ranges.sort()
        if order.sort:
            ranges = _merged(ranges)
        windows.append(Window(w, tuple(ranges), b - a, -(-(b - a) // batch_size), idx, w // run))
    return windows


def run_windows(run_records: int | None, window_records: int, num_windows: int) -> int:
    """Windows per run: as many whole windows as ``run_records`` holds (a shuffle block over
    object storage is >= 1 MiB, many windows; locally a block is smaller than a window, so 1), at
    most 1/``MIN_RUNS`` of the windows, so that every worker still gets a fair share."""
    if not run_records:
        return 1
    return max(1, min(run_records // window_records, num_windows // MIN_RUNS))


def _ranges(a: int, b: int, total: int, bounds: list[int],
            pieces: tuple[list[int], list[int], list[int]]) -> list[tuple[int, int, int]]:
    """Positions [a, b) of the epoch order (wrapping past ``total``) as (shard, start, stop) runs."""
    shards, starts, _ = pieces
    out = []
    k = -1
    while a < b:
        pos = a % total
        if not 0 <= k < len(bounds) - 1 or not bounds[k] <= pos < bounds[k + 1]:  # walked in order: search rarely
            k = bisect.bisect_right(bounds, pos) - 1
        take = min(b - a, bounds[k + 1] - pos)
        start = starts[k] + pos - bounds[k]
        out.append((shards[k], start, start + take))
        a += take
        k += 1
    return out


def _merged(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sorted (shard, start, stop) runs with touching neighbours joined."""
    out: list[tuple[int, int, int]] = []
    for s, a, b in ranges:
        if out and out[-1][0] == s and out[-1][2] == a:
            out[-1] = (s, out[-1][1], b)
        else:
            out.append((s, a, b))
    return out


def window_batches(
    window: Window,
    lengths: np.ndarray | None,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    boundaries: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Row indices (into the window's records) of each batch, in yield order.

    Shuffled windows permute their records; with ``boundaries`` records are grouped by length
    bucket (after the shuffle, so ties stay random) and the batches' order is shuffled, which
    keeps padding small while mixing lengths across steps.
    """
    n = window.num_records
    rng = np.random.default_rng([seed, epoch, rank, window.index])
    rows = rng.permutation(n) if shuffle else np.arange(n)
    if boundaries is not None and lengths is not None:
        rows = rows[np.argsort(bucket_ids(lengths[rows], boundaries), kind="stable")]
    batches = [rows[i : i + batch_size] for i in range(0, n, batch_size)]
    if boundaries is not None and shuffle and len(batches) > 1:
        full = [b for b in batches if len(b) == batch_size]
        partial = [b for b in batches if len(b) != batch_size]
        batches = [full[i] for i in rng.permutation(len(full))] + partial
    return batches


def worker_windows(windows: Sequence[Window], num_workers: int, worker_id: int) -> list[Window]:
    """Windows dealt round-robin to loader workers, a run at a time (``Window.run``; all of
    them with no workers). A run's windows lie side by side in the epoch order, so over object
    storage its worker reads them with as few requests as ``num_workers=0`` would."""
    n = max(num_workers, 1)
    return [w for w in windows if (w.index if w.run is None else w.run) % n == worker_id]


def resume_point(batches_per_worker: Sequence[int], consumed: int, bundle: int = 1) -> tuple[list[int], int]:
    """(batches each worker had yielded, worker whose batch comes next) after the loader handed
    out ``consumed`` batches.

    PyTorch's DataLoader takes an iterable dataset's messages from its workers in turn, skipping
    exhausted ones. A dlpipe worker sends its batches ``bundle`` at a time (a bundle ends at each
    multiple of ``bundle`` of the worker's own count, and at its last batch), and the loader
    hands them out one by one, so the stream is: worker 0's first bundle, worker 1's, ..., then
    round again. Full rounds are counted arithmetically, the last one message by message; a count
    that stops inside a bundle leaves that worker next, to finish it.
    """
    n, k = len(batches_per_worker), max(int(bundle), 1)
    remaining = list(batches_per_worker)
    done = [0] * n
    left = consumed
    while left > 0:
        active = [w for w in range(n) if remaining[w] > 0]
        if not active:
            break
        rounds = min(min(remaining[w] for w in active) // k, left // (k * len(active)))
        if rounds:  # every active worker sends ``rounds`` whole bundles
            for w in active:
                done[w] += rounds * k
                remaining[w] -= rounds * k
            left -= rounds * k * len(active)
            continue
        for w in active:  # one round, a message at a time (some are short, or the count ends)
            size = min(k, remaining[w])
            taken = min(size, left)
            done[w] += taken
            remaining[w] -= taken
            left -= taken
            if taken < size:
                return done, w
            if left == 0:
                return done, (w + 1) % n
    return done, 0


# ---------------------------------------------------------------------------------------------
# length buckets for loaders that group records in their own ops (tf.data: loaders.tf_buckets)

BUCKET_WINDOW_BATCHES = 64  # records grouped by length bucket come from windows of this many batches


def bucket_window_draws(window: Window, *, batch_size: int, shuffle: bool, seed: int, epoch: int,
                        rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``window_batches``'s random draws for a bucketed window, which need no lengths: ``rows``
    (the window's records in the order they are stably sorted by bucket) and ``order`` (the
    order in which the ``num_records // batch_size`` full batches of the sorted rows are
    yielded; the partial one comes last). Sorting ``rows`` stably by bucket, cutting batches and
    taking the full ones in ``order`` gives ``window_batches(..., boundaries=...)``'s batches."""
    n = window.num_records
    rng = np.random.default_rng([seed, epoch, rank, window.index])
    rows = rng.permutation(n) if shuffle else np.arange(n)
    full = n // batch_size
    order = rng.permutation(full) if shuffle and -(-n // batch_size) > 1 else np.arange(full)
    return rows, order
