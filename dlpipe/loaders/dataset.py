"""``dlpipe.load_dataset``: a dlpipe dataset directory as an HF-style dataset object.

The directory may be local or any fsspec URL (``s3://bucket/prefix``, with ``storage_options``
as in HF ``datasets``); see ``dlpipe.loaders.shard_reader`` for how remote shards are read
(range requests with read-ahead, or a local ``cache_dir``).

Follows HF ``datasets`` conventions: ``load_dataset(path, split=...)``, ``features``,
``num_rows``, ``shuffle(seed=..., buffer_size=...)`` and ``set_epoch`` as on
``datasets.IterableDataset`` (small blocks of records permuted across the whole split with
(seed, epoch), then records shuffled within a buffer of ``buffer_size``; see
``dlpipe.loaders.common``), ``to_tf_dataset`` with HF's parameter names. Framework code is
imported only when ``to_tf_dataset`` / ``to_torch_dataloader`` is called.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dlpipe.defaults import SHUFFLE_BUFFER
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import (
    PieceOrder,
    Window,
    epoch_pieces,
    epoch_windows,
    shuffle_block_records,
    window_batches,
)
from dlpipe.loaders.options import ShuffleConfig
from dlpipe.loaders.remote import DEFAULT_PREFETCH_BYTES, DEFAULT_REQUEST_BYTES
from dlpipe.loaders.shard_reader import ShardReader
from dlpipe.loaders.transforms import Transform, apply_transforms, make_transform
from dlpipe.loaders.windows import read_window, read_windows
from dlpipe.manifest import DatasetInfo, load_manifest

__all__ = ["ShardDataset", "load_dataset", "read_window"]

BLOCK_REQUEST_BYTES = 1 << 20  # least bytes per shuffle block where each block is a request


class ShardDataset:
    """One split of a dlpipe dataset. Iterating yields one dict of numpy arrays per record."""

    def __init__(self, info: DatasetInfo, split: str, columns: Sequence[str] | None = None, *,
                 cache_dir: str | os.PathLike[str] | None = None, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
                 request_bytes: int = DEFAULT_REQUEST_BYTES) -> None:
        self.info = info
        self.split = split
        self.shards = info.split_shards(split)
        self.columns = list(info.columns) if columns is None else list(columns)
        for c in self.columns:
            if c not in info.columns:
                raise ConfigError(f"column {c!r} is not in {info.root}; columns: {', '.join(info.columns)}")
        self.shuffle_seed: int | None = None
        self.seed_given = False
        self.buffer_size = SHUFFLE_BUFFER
        self.chosen_block_records: int | None = None
        self.epoch = 0
        self.transforms: tuple[Transform, ...] = ()
        self.read_options = {"cache_dir": cache_dir, "prefetch_bytes": prefetch_bytes, "request_bytes": request_bytes}
        self._reader: ShardReader | None = None
        self.reader()  # validates the read options

    # -- HF-style description
    @property
    def features(self) -> dict:
        """HF ``features`` (JSON form of ``Value``/``List``) of the selected columns."""
        return {k: v for k, v in self.info.raw["features"].items() if k in self.columns}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    @property
    def num_rows(self) -> int:
        return sum(s.num_records for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shuffled(self) -> bool:
        return self.shuffle_seed is not None

    def __len__(self) -> int:
        return self.num_rows

    @property
    def fingerprint(self) -> str:
        """What identifies this split's records: a hash of its shards' SHA-256 (a checkpoint
        resumes only the dataset it was saved from)."""
        h = hashlib.sha256(self.split.encode())
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"ShardDataset(split={self.split!r}, num_rows={self.num_rows}, num_shards={self.num_shards}, "
                f"features={list(self.columns)}, format={self.info.format!r})")

    # -- HF-style transforms (return new objects)
    def shuffle(self, seed: int | None = None, buffer_size: int = SHUFFLE_BUFFER, *,
                block_records: int | None = None) -> ShardDataset:
        """Shuffle per epoch: blocks of records across the whole split with (seed, epoch), then
        records within a buffer of ``buffer_size``. ``block_records`` (a dlpipe extension; None
        picks it, see the ``block_records`` property) sets the records per block."""
        if buffer_size < 1:
            raise ConfigError(f"buffer_size={buffer_size}; must be >= 1")
        if block_records is not None and (block_records < 1 or self.info.compression is not None):
            raise ConfigError(f"block_records={block_records}; must be None or >= 1, and None for "
                              f"{self.info.compression}-compressed shards (they are read whole)")
        out = copy.copy(self)
        # as HF: no seed draws one; loaders refuse that under several ranks, which must agree
        out.shuffle_seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)
        out.seed_given = seed is not None
        out.buffer_size = buffer_size
        out.chosen_block_records = block_records
        return out

    @property
    def shuffle_config(self) -> ShuffleConfig:
        """This dataset's shuffle state, as the loaders read it (``loaders.options``): shuffled
        or not, the seed in use (drawn when ``shuffle`` got none) and whether it was given, the
        buffer size, records per shuffle block (``block_records``; None unshuffled) and the
        epoch the next iteration plays. A loader's ``shuffle``/``seed`` arguments apply to it
        through ``loaders.options.resolve_shuffle``."""
        return ShuffleConfig(shuffled=self.shuffled, seed=self.shuffle_seed, seed_given=self.seed_given,
                             buffer_size=self.buffer_size,
                             block_records=self.block_records if self.shuffled else None, epoch=self.epoch)

    def select_columns(self, columns: str | Sequence[str]) -> ShardDataset:
        out = copy.copy(self)
        out.columns = [columns] if isinstance(columns, str) else list(columns)
        ShardDataset(self.info, self.split, out.columns)  # validates
        return out

    def reader(self) -> ShardReader:
        """The ShardReader of these columns with this dataset's read options; kept, so its index
        cache lasts across epochs and its ``stats`` can be looked at."""
        if self._reader is None or list(self._reader.encodings) != self.columns:
            self._reader = ShardReader(self.info, self.columns, **self.read_options)
        return self._reader

    @property
    def block_records(self) -> int | None:
        """Records per block of the global shuffle (``loaders.common.epoch_pieces``), or None
        where shards are read whole (compressed: they cannot be read from the middle, so whole
        shards are permuted and mixing is only as good as the shard count allows). Over object
        storage without ``cache_dir`` each block costs a request, so blocks hold >= 1 MiB."""
        if self.info.compression is not None:
            return None
        if self.chosen_block_records is not None:
            return self.chosen_block_records
        per_request = self.info.remote and self.reader().cache_dir is None
        nbytes = sum(s.num_bytes for s in self.shards)
        return shuffle_block_records(self.num_rows, min_bytes=BLOCK_REQUEST_BYTES if per_request else 0,
                                     bytes_per_record=nbytes / max(self.num_rows, 1))

    # -- the epoch plan (``loaders.common``): the one way every loader orders an epoch
    def epoch_order(self, *, shuffle: bool, seed: int, epoch: int, block_records: int | None) -> PieceOrder:
        """The records of ``epoch`` in reading order (pieces of the split, ``epoch_pieces``)."""
        arrays = epoch_pieces([s.num_records for s in self.shards], shuffle=shuffle, seed=seed, epoch=epoch,
                              block_records=block_records)
        return PieceOrder(arrays, sort=bool(shuffle and block_records))

    def plan_windows(self, *, batch_size: int, epoch: int, shuffle: bool, seed: int,
                     block_records: int | None, **kwargs: Any) -> list[Window]:
        """One rank's windows of ``epoch`` (``loaders.common.epoch_windows``; ``kwargs``: its
        world, window and remainder arguments)."""
        order = self.epoch_order(shuffle=shuffle, seed=seed, epoch=epoch, block_records=block_records)
        return epoch_windows(order, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """As ``datasets.IterableDataset.set_epoch``: reshuffles with seed + epoch."""
        self.epoch = int(epoch)

    def map(self, function: Callable[..., Any] | None = None, *, batched: bool = False, batch_size: int | None = 1000,
            remove_columns: str | Sequence[str] | None = None,
            fn_kwargs: Mapping[str, Any] | None = None) -> ShardDataset:
        """As ``datasets.IterableDataset.map``: ``function(record) -> dict`` of columns to add or
        replace (``batched``: a dict of lists in and out), applied lazily while iterating and in
        the PyTorch loader's workers (``dlpipe.loaders.transforms``). ``to_tf_dataset`` refuses
        Python transforms: map the tf.data dataset with TensorFlow ops instead."""
        t = make_transform(function if function is not None else (lambda r: {}), keep=False, batched=batched,
                           batch_size=batch_size, remove_columns=remove_columns, fn_kwargs=fn_kwargs)
        return self._with(t)

    def filter(self, function: Callable[..., Any], *, batched: bool = False, batch_size: int | None = 1000,
               fn_kwargs: Mapping[str, Any] | None = None) -> ShardDataset:
        """As ``datasets.IterableDataset.filter``: keep the records for which ``function(record)``
        is true (``batched``: one bool per record of a dict of lists). In the PyTorch loader a
        filter leaves fewer records in a batch (see ``dlpipe.loaders.transforms``)."""
        return self._with(make_transform(function, keep=True, batched=batched, batch_size=batch_size,
                                         remove_columns=None, fn_kwargs=fn_kwargs))

    def _with(self, transform: Transform) -> ShardDataset:
        out = copy.copy(self)
        out.transforms = (*self.transforms, transform)
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        records = self._records()
        for t in self.transforms:
            records = _staged(records, t)
        return records

    def _records(self) -> Iterator[dict[str, np.ndarray]]:
        reader = self.reader()
        enc = reader.encodings
        windows = self.plan_windows(batch_size=1, shuffle=self.shuffled, seed=self.shuffle_seed or 0,
                                    epoch=self.epoch, window_batches=self.buffer_size,
                                    block_records=self.block_records)
        for window, cols in zip(windows, read_windows(reader, self.shards, windows)):
            for rows in window_batches(window, None, batch_size=max(window.num_records, 1),
                                       shuffle=self.shuffled, seed=self.shuffle_seed or 0, epoch=self.epoch,
                                       rank=0):
                for i in rows.tolist():
                    yield {n: _row(cols[n], i, enc[n]) for n in self.columns}

    # -- framework front ends
    def to_tf_dataset(self, *args, **kwargs):
        """A native ``tf.data.Dataset`` of padded batches; see ``dlpipe.loaders.tf_data``."""
        if self.transforms:
            kinds = ", ".join(t.kind for t in self.transforms)
            raise ConfigError(f"this dataset has Python transforms ({kinds}); tf.data runs graph functions: "
                              "call to_tf_dataset on the dataset without them and use tf_ds.map(fn) / "
                              "tf_ds.filter(fn) with TensorFlow ops on its batches")
        from dlpipe.loaders.tf_data import to_tf_dataset

        return to_tf_dataset(self, *args, **kwargs)

    def to_torch_dataloader(self, *args, **kwargs):
        """A PyTorch ``DataLoader`` of padded batches; see ``dlpipe.loaders.torch_data``."""
        from dlpipe.loaders.torch_loader import to_torch_dataloader

        return to_torch_dataloader(self, *args, **kwargs)


def _staged(records: Iterator[dict[str, Any]], t: Transform) -> Iterator[dict[str, Any]]:
    """One transform over a stream of records (a batched one over runs of ``t.batch_size``)."""
    size = t.batch_size if t.batched else 1
    while True:
        chunk = list(itertools.islice(records, size))
        if not chunk:
            return
        yield from apply_transforms(chunk, (t,))


def _row(col, i: int, enc) -> np.ndarray:
    values, splits = col
    v = values[splits[i] : splits[i + 1]]
    if enc.variable:
        return v.reshape((-1, *enc.shape[1:]))
    return v.reshape(enc.shape)


def load_dataset(path: str | os.PathLike[str], split: str = "train", *,
                 columns: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
                 request_bytes: int = DEFAULT_REQUEST_BYTES) -> ShardDataset:
    """Open a dataset written by ``dlpipe reshard`` as a ShardDataset.

    ``path``: a local directory, ``file://`` or fsspec URL; ``storage_options`` go to its
    filesystem (credentials, ``endpoint_url``). For a remote dataset: ``cache_dir`` keeps a
    verified local copy of each shard read (reused by later epochs and processes); without it,
    records are read with range requests of up to ``request_bytes``, and at most
    ``prefetch_bytes`` are fetched ahead per reading process.
    """
    return ShardDataset(load_manifest(path, storage_options), split, columns, cache_dir=cache_dir,
                        prefetch_bytes=prefetch_bytes, request_bytes=request_bytes)
