"""``interleave_datasets``: several dlpipe datasets read as one, mixed by weight.

Named and behaving as HF ``datasets.interleave_datasets`` (5.x):

- ``probabilities=None``: round robin, one record from each source in turn;
- ``probabilities``: each record's source is drawn with ``numpy.random.default_rng(seed)``,
  1000 draws at a time with ``Generator.choice`` as HF draws them, so epoch 0 picks the same
  source sequence as HF for the same seed (tested against HF);
- ``stopping_strategy="first_exhausted"``: the stream ends right after one source yields its
  last record; ``"all_exhausted"``: it ends right after every source has yielded its last
  record at least once, sources that run out earlier starting over (oversampling).

**The sequence of sources is a pure function of (seed, epoch, position)**: the mixture's epoch
order (``MixedOrder``) is the list of draws; position p holds the next record, in that source's
own epoch order (``epoch_pieces``: blocks of the source permuted when shuffled), of the source
drawn at p. Everything after that is the one epoch plan of every loader
(``loaders.common.epoch_windows``): equal shares per rank, windows of ``buffer_size`` records,
shuffled within the window when the mixture is shuffled. So TensorFlow and PyTorch read the
same records in the same batches for a seed, ranks and workers split a mixture exactly once,
and the PyTorch ``state_dict`` of a mixture is as small as a single dataset's (positions and
seeds, not lists of ids).

Where dlpipe differs from HF (documented, tested):

- A shuffled mixture (``mix.shuffle(seed)``, a loader's ``shuffle=True``, or sources shuffled
  before mixing) draws the sources with ``seed + epoch`` from epoch 1 on, so every epoch mixes
  differently; HF redraws only when the interleaved dataset itself is shuffled.
- Records are permuted within a window of ``buffer_size`` records of the mixed stream when the
  mixture is shuffled (HF's shuffle buffer after interleaving): each window holds exactly the
  records the draws put there, so proportions hold per window, not only on average.
- Sources must share format, columns (select a common set with ``select_columns``), column
  encodings and pad values, and be stored uncompressed (windows read from the middle of shards).
- ``all_exhausted_without_replacement`` is not offered.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from dlpipe.defaults import SHUFFLE_BUFFER
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import PieceOrder, epoch_pieces, shuffle_block_records
from dlpipe.loaders.dataset import BLOCK_REQUEST_BYTES, ShardDataset
from dlpipe.manifest import DatasetInfo

STOPPING = ("first_exhausted", "all_exhausted")
DRAW_BATCH = 1000  # HF draws sources 1000 at a time; the same calls give the same sequence


def source_choices(lengths: Sequence[int], probabilities: Sequence[float] | None, seed: int,
                   stopping_strategy: str) -> np.ndarray:
    """The source of each record of a mixed epoch (``int16``), ending where HF's stream ends."""
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    if probabilities is None:  # round robin: ends at source k's last record in round m - 1
        m = int(lengths.min() if stopping_strategy == "first_exhausted" else lengths.max())
        hits = np.flatnonzero(lengths == m)
        k = int(hits[0] if stopping_strategy == "first_exhausted" else hits[-1])
        return (np.arange(n * (m - 1) + k + 1) % n).astype(np.int16)
    rng = np.random.default_rng(seed)
    p = np.asarray(probabilities, np.float64)
    counts = np.zeros(n, np.int64)
    reached = np.zeros(n, bool)
    out = []
    while True:
        draws = np.concatenate([rng.choice(n, size=DRAW_BATCH, p=p) for _ in range(16)])
        cum = counts + np.cumsum(draws[:, None] == np.arange(n), axis=0)
        if stopping_strategy == "first_exhausted":
            ends = np.flatnonzero(cum[np.arange(len(draws)), draws] == lengths[draws])
        else:
            ends = np.flatnonzero(((cum >= lengths) | reached).all(axis=1))
        if len(ends):
            out.append(draws[: ends[0] + 1])
            return np.concatenate(out).astype(np.int16)
        out.append(draws)
        counts = cum[-1]
        reached |= counts >= lengths


class MixedOrder:
    """A mixture's epoch in reading order (the ``loaders.common.epoch_windows`` order protocol):
    position p is the next record of source ``choices[p]`` in that source's own order (wrapping
    around, for ``all_exhausted``). Shard numbers run through the sources' shards in turn."""

    def __init__(self, sources: Sequence[PieceOrder], shard_offsets: Sequence[int], choices: np.ndarray, *,
                 sort: bool) -> None:
        self.sources, self.offsets, self.choices, self.sort = list(sources), list(shard_offsets), choices, sort
        self.total = len(choices)
        self.where = [np.flatnonzero(choices == i) for i in range(len(self.sources))]  # positions per source

    def ranges(self, a: int, b: int, *, positions: bool = False) -> list[tuple]:
        """Positions [a, b) as (shard, start, stop) runs: grouped by source when windows are
        permuted anyway (``sort``), else in position order (one run per run of one source)."""
        if self.sort:
            return [r for i in range(len(self.sources)) for r in self._source(i, *self._count(i, a, b), positions)]
        runs = np.flatnonzero(np.diff(self.choices[a:b])) + 1
        out = []
        for lo, hi in zip([0, *runs.tolist()], [*runs.tolist(), b - a]):
            i = int(self.choices[a + lo])
            first, _ = self._count(i, a + lo, a + lo)
            out.extend(self._source(i, first, first + hi - lo, positions))
        return out

    def _count(self, i: int, a: int, b: int) -> tuple[int, int]:
        """Source ``i``'s records drawn before positions a and b: [first, last) of its order."""
        w = self.where[i]
        return int(np.searchsorted(w, a)), int(np.searchsorted(w, b))

    def _source(self, i: int, lo: int, hi: int, positions: bool) -> list[tuple]:
        """Source ``i``'s records [lo, hi) of its draws (wrapping around its order) as runs."""
        src, out = self.sources[i], []
        while lo < hi:
            base = lo - lo % src.total
            take = min(hi, base + src.total) - lo
            for r in src.ranges(lo - base, lo - base + take, positions=positions):
                run = (r[0] + self.offsets[i], r[1], r[2])
                out.append((*run, self.where[i][r[3] + base]) if positions else run)
            lo += take
        return out


class MixedDataset(ShardDataset):
    """``interleave_datasets``'s result: a ShardDataset (loaders, ``shuffle``, ``set_epoch``,
    ``map``/``filter``, ``select_columns``) whose epoch order is a mixture of its sources'."""

    def __init__(self, sources: Sequence[ShardDataset], probabilities: Sequence[float] | None, seed: int | None,
                 stopping_strategy: str) -> None:
        self.sources = [_checked_source(s, k) for k, s in enumerate(sources)]
        first = self.sources[0]
        _check_alike(self.sources)
        self.probabilities = None if probabilities is None else [float(p) for p in probabilities]
        self.stopping_strategy = stopping_strategy
        # as HF: no seed draws one (recorded, so a checkpoint replays it); ranks must agree on it
        self.mix_seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)
        self.mix_seed_given = seed is not None or probabilities is None
        self.info = _combined_info(self.sources)
        self.split = first.split
        self.shards = self.info.shards
        self.columns = list(first.columns)
        shuffled = [s for s in self.sources if s.shuffled]
        self.shuffle_seed = shuffled[0].shuffle_seed if shuffled else None
        self.seed_given = all(s.seed_given for s in shuffled) if shuffled else False
        self.buffer_size = max((s.buffer_size for s in shuffled), default=SHUFFLE_BUFFER)
        self.chosen_block_records = None
        self.epoch = first.epoch
        self.transforms = ()
        self.read_options = dict(first.read_options)
        self._reader = None
        self._orders: dict[tuple, MixedOrder] = {}
        self.reader()

    def __repr__(self) -> str:
        return (f"MixedDataset(sources={len(self.sources)}, probabilities={self.probabilities}, "
                f"stopping_strategy={self.stopping_strategy!r}, features={list(self.columns)})")

    @property
    def num_rows(self) -> int:
        """Records of one epoch of the mixture (epoch 0's draws; a shuffled mixture's later epochs
        draw again, and their length varies a little with ``probabilities``)."""
        return self.epoch_order(shuffle=self.shuffled, seed=self.shuffle_seed or 0, epoch=self.epoch,
                                block_records=None).total

    @property
    def mixture(self) -> dict[str, Any]:
        """What the mixed order depends on besides the shuffle (in checkpoints' plan settings)."""
        return {"sources": [s.fingerprint for s in self.sources], "probabilities": self.probabilities,
                "seed": self.mix_seed, "stopping_strategy": self.stopping_strategy}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.mixture, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def block_records(self) -> int | None:
        """Records per shuffle block of every source: as for one dataset of all their records
        (``ShardDataset.block_records``), so a window of the mixture touches as many blocks as
        a window of one dataset would (small sources' own rule would cut them finer)."""
        if self.chosen_block_records is not None:
            return self.chosen_block_records
        rows = sum(s.num_rows for s in self.sources)
        per_request = self.info.remote and self.reader().cache_dir is None
        nbytes = sum(sh.num_bytes for sh in self.shards)
        return shuffle_block_records(rows, min_bytes=BLOCK_REQUEST_BYTES if per_request else 0,
                                     bytes_per_record=nbytes / max(rows, 1))

    def shuffle(self, seed: int | None = None, buffer_size: int = SHUFFLE_BUFFER, *,
                block_records: int | None = None) -> MixedDataset:
        """Shuffle every source (blocks, each with its own seed derived from ``seed``), draw the
        sources with ``seed + epoch``'s mixing seed per epoch, and permute records within windows
        of ``buffer_size`` records of the mixed stream."""
        out = super().shuffle(seed, buffer_size, block_records=block_records)
        out.sources = [s.shuffle(_source_seed(out.shuffle_seed, k), buffer_size, block_records=block_records)
                       for k, s in enumerate(self.sources)]
        out._orders = {}
        return out

    def select_columns(self, columns: str | Sequence[str]) -> MixedDataset:
        out = copy.copy(self)
        out.sources = [s.select_columns(columns) for s in self.sources]
        out.columns = list(out.sources[0].columns)
        return out

    def reader(self):
        """One reader of every source's shards, each decoded with its own dataset's encodings."""
        reader = super().reader()
        if not reader.layouts:
            for s in self.sources:
                layout = ({c: s.info.columns[c] for c in self.columns}, dict(s.info.columns))
                reader.layouts.update({_absolute(s.info, sh.path): layout for sh in s.shards})
        return reader

    def to_tf_dataset(self, *args, **kwargs):
        if not self.reader().uniform:
            stored = {c for s in self.sources for c in s.info.columns}
            differ = sorted(c for c in stored if len({s.info.columns.get(c) for s in self.sources}) > 1)
            raise ConfigError(
                f"the mixture's sources store {', '.join(map(repr, differ))} differently (value ranges pick the "
                "narrowest dtype per dataset), and tf.data parses one layout: reshard every source with "
                "--int-encoding int64_list (one layout for all), or read the mixture with to_torch_dataloader")
        return super().to_tf_dataset(*args, **kwargs)

    def epoch_order(self, *, shuffle: bool, seed: int, epoch: int, block_records: int | None) -> MixedOrder:
        """The mixed order of ``epoch`` (cached: the last few epochs asked)."""
        key = (shuffle, seed, epoch)
        if key not in self._orders:
            orders, offsets, at = [], [], 0
            for k, s in enumerate(self.sources):
                mine = s.shuffled or shuffle
                own = s.shuffle_seed if s.shuffled else _source_seed(seed, k)
                br = (s.chosen_block_records or self.block_records) if mine else None
                pieces = epoch_pieces([x.num_records for x in s.shards], shuffle=mine, seed=own or 0,
                                      epoch=epoch, block_records=br)
                orders.append(PieceOrder(pieces, sort=bool(mine and br)))
                offsets.append(at)
                at += len(s.shards)
            draws = self.mix_seed + epoch if shuffle and epoch else self.mix_seed
            choices = source_choices([o.total for o in orders], self.probabilities, draws, self.stopping_strategy)
            if len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = MixedOrder(orders, offsets, choices, sort=shuffle)
        return self._orders[key]


def interleave_datasets(datasets: Sequence[ShardDataset], probabilities: Sequence[float] | None = None,
                        seed: int | None = None, stopping_strategy: str = "first_exhausted") -> MixedDataset:
    """Mix dlpipe datasets (``load_dataset`` results) into one, as HF ``interleave_datasets``
    (see the module docstring): round robin, or each record's source drawn with
    ``probabilities`` and ``seed``; ``stopping_strategy`` ``"first_exhausted"`` or
    ``"all_exhausted"``. The result reads like any dataset: ``to_tf_dataset``,
    ``to_torch_dataloader`` (padding, buckets, packing), ``shuffle``, ``set_epoch``."""
    datasets = list(datasets)
    if not datasets:
        raise ConfigError("interleave_datasets needs at least one dataset")
    if stopping_strategy not in STOPPING:
        raise ConfigError(f"stopping_strategy={stopping_strategy!r}; use 'first_exhausted' or 'all_exhausted'")
    if probabilities is not None:
        p = np.asarray(probabilities, np.float64)
        if p.shape != (len(datasets),) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ConfigError(f"probabilities={list(probabilities)!r}; need one weight >= 0 per dataset "
                              f"({len(datasets)}), summing to 1")
        if stopping_strategy == "all_exhausted" and (p == 0).any():
            raise ConfigError("stopping_strategy='all_exhausted' with a probability of 0: that dataset would never "
                              "be exhausted; drop it from the mixture")
    return MixedDataset(datasets, probabilities, seed, stopping_strategy)


# ---------------------------------------------------------------------------------------------


def _source_seed(seed: int | None, k: int) -> int:
    """Source ``k``'s block-shuffle seed in a mixture shuffled with ``seed``."""
    return int(np.random.default_rng([seed or 0, k]).integers(2**31))


def _checked_source(ds: Any, k: int) -> ShardDataset:
    if not isinstance(ds, ShardDataset):
        raise ConfigError(f"datasets[{k}] is a {type(ds).__name__}; interleave_datasets takes dlpipe datasets "
                          "(dlpipe.load_dataset(...))")
    if isinstance(ds, MixedDataset):
        raise ConfigError(f"datasets[{k}] is a mixture already; pass its sources with their weights instead")
    if ds.transforms:
        raise ConfigError(f"datasets[{k}] has map/filter transforms; apply them to the mixture instead "
                          "(interleave_datasets(...).map(...))")
    if ds.num_rows == 0:
        raise ConfigError(f"datasets[{k}] ({ds.info.root}, split {ds.split!r}) has no records")
    if ds.info.compression is not None:
        raise ConfigError(f"datasets[{k}] ({ds.info.root}) is {ds.info.compression}-compressed; a mixture reads "
                          "shards from the middle: reshard it with --compression none")
    return ds


def _check_alike(sources: list[ShardDataset]) -> None:
    """Same format, columns, encodings and pad values, else a message saying what differs."""
    first = sources[0]
    for k, s in enumerate(sources[1:], 1):
        if set(s.columns) != set(first.columns):
            common = [c for c in first.columns if c in s.columns]
            raise ConfigError(
                f"datasets[{k}] has columns {sorted(s.columns)}, datasets[0] {sorted(first.columns)}; select a "
                f"common set first: ds.select_columns({common!r})")
        if s.info.format != first.info.format:
            raise ConfigError(f"datasets[{k}] is {s.info.format}, datasets[0] {first.info.format}; reshard them to "
                              "one format")
        for c in first.columns:
            a, b = first.info.columns[c], s.info.columns[c]
            if (a.dtype, a.shape) != (b.dtype, b.shape):
                raise ConfigError(f"column {c!r} is {b.dtype} of shape {b.shape} in datasets[{k}] but {a.dtype} "
                                  f"of shape {a.shape} in datasets[0]; a mixture's columns must agree")
            pa, pb = first.info.pad_values.get(c), s.info.pad_values.get(c)
            if pa != pb:
                raise ConfigError(f"column {c!r} pads with {pb!r} in datasets[{k}] but {pa!r} in datasets[0]; "
                                  "reshard them with the same --pad-id")


def _combined_info(sources: list[ShardDataset]) -> DatasetInfo:
    """One DatasetInfo over every source's shards of the chosen split (shard and index paths
    absolute, so one reader reads them all; storage options those of the first source)."""
    first = sources[0].info
    shards = []
    for s in sources:
        for sh in s.shards:
            shards.append(replace(sh, path=_absolute(s.info, sh.path), index=_absolute(s.info, sh.index)))
    columns = {c: first.columns[c] for c in sources[0].columns}
    raw = {**first.raw, "features": {c: v for c, v in first.raw.get("features", {}).items() if c in columns}}
    return DatasetInfo(first.root, first.format, first.compression, columns, shards, dict(first.pad_values), raw,
                       first.location)


def _absolute(info: DatasetInfo, path: str) -> str:
    loc = info.location.join(path)
    return loc.url if loc.remote else os.path.abspath(loc.url)
