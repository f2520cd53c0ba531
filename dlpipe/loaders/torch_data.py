"""PyTorch front end: padded batches from dlpipe shards through a ``torch.utils.data.DataLoader``.

``ShardIterableDataset`` yields whole *batches* (the DataLoader runs with ``batch_size=None``):
each loader step reads one window of records with the index-driven ``ShardReader``, orders it with
the shared epoch plan (``dlpipe.loaders.common``) and pads every batch with numpy, so there is no
per-record Python on the hot path; tensors are ``torch.from_numpy`` views of those arrays.

Batches are dicts column -> tensor in the manifest's logical dtypes: variable columns padded to
``[B, L, ...]`` (the padding rule of ``collate.collate``), fixed columns ``[B, *shape]``, and
``attention_mask`` ``[B, L]`` int64 from the first variable column.

**Work split.** Rank and world size come from the explicit ``rank``/``world_size`` arguments when
given (so a test or a custom launcher can say exactly what it wants), else from an initialized
``torch.distributed`` group, else from the ``RANK``/``WORLD_SIZE`` environment variables, else
1 process. Each rank takes an equal share of the epoch's record order and cuts it into windows
of about ``buffer_size`` records; DataLoader workers take those windows in turn, a run of
neighbouring windows at a time where a block holds several (the shuffle block; unshuffled, the
block the dataset would shuffle by): over object storage, where blocks are >= 1 MiB, a worker
then fetches its windows with a few large requests instead of one per window
(``common.worker_windows``). With world size 1, or when the number of records divides by it,
every record is read exactly once per epoch. Otherwise every rank still gets the same number of
batches, so DDP never waits at the end
of an epoch: ``uneven="pad"`` (default, as ``DistributedSampler``) repeats records from the start
of the epoch to fill the last ranks' shares; ``uneven="drop"`` skips the last
``num_rows % world_size`` records of the epoch order (other ones each epoch when shuffled).

**Epochs** follow the HF / ``DistributedSampler`` convention: iterating the loader again replays
the same epoch until you call ``loader.set_epoch(n)``; shuffled data is then reordered with
``(seed, n)`` (blocks of records across the whole split, ``common.epoch_pieces``) and
``(seed, n, rank, window)`` (records within a window). The epoch is held in shared
memory, so ``set_epoch`` also reaches ``persistent_workers``.

**Checkpoints.** ``DlpipeDataLoader.state_dict()`` = ``{"epoch", "batches_yielded", ...}``; after
``load_state_dict`` the next iteration yields exactly the batches the uninterrupted one would
have yielded next (see ``dlpipe.loaders.torch_state``). With ``stateful=True`` the loader is
torchdata's ``StatefulDataLoader``, which saves ``ShardIterableDataset.state_dict()`` per worker.
Either way, resuming needs the same batch size, shuffle, seed, world size and number of workers.

**A dead worker** (SIGKILL, a crash) ends the epoch with ``LoaderWorkerError`` (which worker,
its pid, the signal) within seconds, never a hang; the other workers are stopped, and
``load_state_dict(loader.state_dict())`` continues the epoch exactly (``torch_state``).
``timeout=`` (seconds, as the DataLoader's) also turns a worker that sends nothing that long
into ``LoaderWorkerError``.

**Object storage.** ``ds`` may come from ``load_dataset("s3://...", storage_options=...)``: each
process (main or worker) opens its own filesystem and reads its windows with range requests,
fetching the next ones on background threads while it pads the current one (bounded by the
dataset's ``prefetch_bytes``), or from a local ``cache_dir`` (see ``dlpipe.loaders.shard_reader``).

**Sequence packing** (``packing=...``, ``max_length=...``): batches of ``batch_size`` packed rows
instead of padded records, resumable alike; ``dlpipe.loaders.packed`` (shared with tf.data).

**collate_fn** (optional) replaces the padding rule: it receives the batch as a list of
per-record dicts of numpy arrays (variable columns unpadded, as ``ShardDataset`` yields them),
like a ``torch`` collate_fn; numpy arrays in a returned dict become tensors, anything else is
yielded as it is. It is a per-record path: the built-in padding is much faster.

The arguments shared with ``to_tf_dataset`` are checked once, as a
``dlpipe.loaders.options.LoaderOptions``; shuffling follows ``options.resolve_shuffle``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError, DlpipeError

torch = require("torch", "dlpipe's PyTorch loader")
from torch.utils.data import IterableDataset, get_worker_info  # noqa: E402

from dlpipe.loaders.common import (  # noqa: E402
    BUCKET_WINDOW_BATCHES,
    MASK,
    buffer_batches,
    resume_point,
    window_batches,
    worker_windows,
)
from dlpipe.loaders.elastic import check_elastic, epoch_remainder  # noqa: E402
from dlpipe.loaders.options import LoaderOptions, resolve_shuffle  # noqa: E402
from dlpipe.loaders.packed import PACKED_KEYS, PackedEpochs, refuse_collate_fn  # noqa: E402
from dlpipe.loaders.shard_reader import ShardReader  # noqa: E402
from dlpipe.loaders.torch_batches import (  # noqa: E402
    FilteredBatch,
    WorkerError,
    bundle_size,
    bundled,
    make_batch,
    transport,
)
from dlpipe.loaders.torch_state import (  # noqa: E402
    PLAN_KEYS,
    STATE_VERSION,
    DlpipeDataLoader,
    LoaderWorkerError,
)
from dlpipe.loaders.windows import read_windows  # noqa: E402

__all__ = [
    "DlpipeDataLoader",
    "LoaderWorkerError",
    "ShardIterableDataset",
    "resolve_world",
]


def resolve_world(world_size: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world_size, rank): explicit arguments, else torch.distributed, else RANK/WORLD_SIZE, else (1, 0)."""
    LoaderOptions(world_size=world_size, rank=rank)  # both or neither, in range
    if world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        else:
            world_size, rank = 1, 0
        LoaderOptions(world_size=world_size, rank=rank)
    return int(world_size), int(rank)


class ShardIterableDataset(IterableDataset):
    """Padded batches of a ShardDataset for one rank; see the module docstring.

    Shuffling (seed, ``buffer_size``) and the starting epoch come from the ShardDataset's
    ``shuffle``/``set_epoch`` state (its ``shuffle_config``). ``len()`` is the number of batches
    per epoch on this rank. ``from_options`` makes one from checked ``LoaderOptions``.
    """

    def __init__(
        self,
        source: Any,  # a loaders.dataset.ShardDataset
        *,
        batch_size: int,
        drop_last: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        bucket_boundaries: Sequence[int] | str | None = None,
        collate_fn: Callable[[list[dict[str, np.ndarray]]], Any] | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        uneven: str = "pad",
        return_attention_mask: bool = True,
    ) -> None:
        options = LoaderOptions(
            batch_size=batch_size, drop_last=drop_last, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, bucket_boundaries=bucket_boundaries, world_size=world_size,
            rank=rank, uneven=uneven, return_attention_mask=return_attention_mask,
        )
        self._setup(source, options, collate_fn)

    @classmethod
    def from_options(
        cls,
        source: Any,
        options: LoaderOptions,
        collate_fn: Callable[[list[dict[str, np.ndarray]]], Any] | None = None,
    ) -> ShardIterableDataset:
        """The dataset of ``source`` under ``options`` (its shuffle, seed, world and padding)."""
        self = cls.__new__(cls)
        self._setup(source, options, collate_fn)
        return self

    def _setup(self, source: Any, options: LoaderOptions, collate_fn: Callable | None) -> None:
        if options.batch_size is None:
            raise ConfigError("batch_size=None; the PyTorch loader needs an int >= 1 (None, "
                              "unbatched records, is to_tf_dataset's)")
        options = options.with_world(*resolve_world(options.world_size, options.rank))
        if options.label_cols:
            raise ConfigError(f"label_cols={list(options.label_cols)!r}: PyTorch batches are dicts; "
                              "select columns with columns=[...] (or ds.select_columns)")
        made = {MASK, *(k for keys in PACKED_KEYS.values() for k in keys)}
        if options.columns is not None:  # the mask follows return_attention_mask
            source = source.select_columns([c for c in options.columns if c not in made])
        self.source, self.shuffle_config = resolve_shuffle(source, options)
        self.options = options  # shuffle/seed as passed; as resolved: self.shuffle_config
        self.batch_size, self.drop_last, self.uneven = options.batch_size, options.drop_last, options.uneven
        self.pad_to_multiple_of, self.padding_side = options.pad_to_multiple_of, options.padding_side
        self.return_attention_mask = options.return_attention_mask
        self.world_size, self.rank = options.world_size, options.rank
        self.collate_fn = collate_fn
        self.encodings = {n: self.source.info.columns[n] for n in self.source.columns}
        self.length_column = next((n for n, e in self.encodings.items() if e.variable), None)
        self.boundaries = options.boundaries(self.source.info, self.encodings)
        # records per window = the shuffle buffer; whole batches so windows never share one
        self.window_batches = buffer_batches(self.shuffle_config.buffer_size, self.batch_size)
        if self.boundaries is not None:  # grouping by length needs many batches to choose from
            self.window_batches = max(self.window_batches, BUCKET_WINDOW_BATCHES)
        self.block_records = self.shuffle_config.block_records
        # workers read runs of neighbouring windows about a block long (common.worker_windows): the
        # shuffle block, or unshuffled the block the dataset would shuffle by (over object storage
        # >= 1 MiB: a request's worth); None where a block holds under two windows (one a run)
        block = self.block_records if self.shuffle_config.shuffled else getattr(self.source, "block_records", None)
        self.run_records = block if block and block >= 2 * self.window_batches * self.batch_size else None
        refuse_collate_fn(collate_fn, options.packing)
        self.packer = None  # packed batches (dlpipe.loaders.packed) instead of padded ones
        if options.packing is not None:
            if self.source.transforms:
                raise ConfigError("packing with ds.map/ds.filter is not supported: packing plans rows from "
                                  "the stored lengths; apply the transforms before resharding")
            self.packer = PackedEpochs(self.source, options, self.shuffle_config, self.encodings)
            self.packer.lengths()  # one pass, here: worker processes get the table with the loader
        epoch = self.shuffle_config.epoch
        self._epoch = torch.tensor(epoch, dtype=torch.int64).share_memory_()
        self._reader = self.source.reader()
        self._resume: dict[str, Any] | None = None
        self._remainder: tuple[Any, Any] | None = None  # (key, common.Remainder) of an elastic resume
        self._progress = {"epoch": epoch, "batches_yielded": 0, "worker": 0, "num_workers": 1}
        # set by dlpipe's loaders, whose iterators re-raise WorkerError batches and turn numpy
        # batches from workers into tensors (see ``torch_batches``)
        self.loader_transport = False
        # batches per worker message; set by DlpipeDataLoader (``bundle_size``), whose iterator
        # unpacks them. 1 for anyone else's DataLoader, and torchdata's StatefulDataLoader,
        # which saves each worker's state per message
        self.bundle = 1

    def bundle_size(self) -> int:
        """Batches a worker sends per message under dlpipe's loader (``torch_batches.bundle_size``
        of this dataset and settings, so the order of batches is fixed by them too)."""
        records = float(self.batch_size)
        if self.packer is not None:  # rows of packed records: tokens per batch / mean length
            opts, lengths = self.packer.packing, self.packer.lengths()
            tokens = opts.max_tokens or opts.rows_per_batch * opts.max_length
            records = tokens / max(float(lengths.mean()) if len(lengths) else 1.0, 1.0)
        stored = sum(s.num_bytes for s in self.source.shards) / max(self.source.num_rows, 1)
        return bundle_size(records, stored)

    # -- epoch and plan
    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (seed + epoch), in this process and in persistent workers."""
        epoch = int(epoch)
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None  # a checkpoint resumes only the epoch it was saved in
        self._epoch.fill_(epoch)

    @property
    def shuffle(self) -> bool:
        return self.shuffle_config.shuffled

    @property
    def seed(self) -> int:
        return self.shuffle_config.plan_seed

    def plan_settings(self) -> dict[str, Any]:
        """The settings the epoch plan depends on (a checkpoint resumes only under the same)."""
        return {
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "buffer_size": self.shuffle_config.buffer_size,
            "block_records": self.block_records,
            "run_records": self.run_records,
            "world_size": self.world_size,
            "rank": self.rank,
            "uneven": self.uneven,
            "packing": None if self.packer is None else self.packer.settings(),
            "dataset": self.source.fingerprint,
        }

    def windows(self, epoch: int | None = None, stages: Sequence[dict[str, int]] = ()):
        """This rank's windows of ``epoch`` (default: the current one); after ``stages`` (an
        elastic resume, ``loaders.elastic``) only what they left of it."""
        epoch = self.epoch if epoch is None else epoch
        if self.packer is not None:
            return self.packer.windows(epoch)
        remainder = self.remainder(epoch, stages) if stages else None
        return self._plan(epoch, self.world_size, self.rank, remainder)

    def _plan(self, epoch: int, world_size: int, rank: int, remainder: Any, indices: bool = False):
        return self.source.plan_windows(
            batch_size=self.batch_size,
            world_size=world_size,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            window_batches=self.window_batches,
            drop_last=self.drop_last,
            uneven=self.uneven,
            block_records=self.block_records,
            remainder=remainder,
            indices=indices,
            run_records=self.run_records,
        )

    def remainder(self, epoch: int, stages: Sequence[dict[str, int]]):
        """What ``stages`` left of ``epoch`` (``loaders.elastic``), kept for the last one asked."""
        key = (epoch, tuple(tuple(sorted(s.items())) for s in stages))
        if self._remainder is None or self._remainder[0] != key:
            total = self.source.epoch_order(shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                                            block_records=self.block_records).total
            plan = lambda world, rank, rest: self._plan(epoch, world, rank, rest, indices=True)  # noqa: E731
            rest = epoch_remainder(plan, total, stages, batch_size=self.batch_size, shuffle=self.shuffle,
                                   seed=self.seed, epoch=epoch)
            self._remainder = (key, rest)
        return self._remainder[1]

    def check_elastic(self, saved: dict[str, int]) -> None:
        """Refuse an elastic resume (``loaders.elastic.check_elastic``) where it cannot be exact."""
        check_elastic(saved, self.world_size, packing=self.packer is not None, buckets=self.boundaries is not None)

    def num_batches(self, epoch: int, stages: Sequence[dict[str, int]] = ()) -> int:
        """Batches this rank plays in ``epoch`` (after ``stages``: in what they left)."""
        return sum(w.num_batches for w in self.windows(epoch, stages))

    def __len__(self) -> int:
        return self.num_batches(self.epoch)

    @property
    def reader(self) -> ShardReader:
        """This process's reader (its ``stats``: requests, bytes fetched, peak read-ahead bytes)."""
        return self._reader

    # -- checkpointing (StatefulDataLoader calls these on each worker's copy)
    def state_dict(self) -> dict[str, Any]:
        """This copy's progress: the epoch and how many batches this worker has yielded in it."""
        return {"version": STATE_VERSION, **self._progress, **self.plan_settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue where ``state`` (from ``state_dict``) left off."""
        changed = [
            k
            for k in (*PLAN_KEYS, "world_size", "rank")
            if k in state and state[k] != self.plan_settings()[k]
        ]
        if changed:
            raise ConfigError(
                f"cannot resume under other loader settings: {', '.join(changed)} differ "
                "from the checkpoint; the epoch plan depends on them"
            )
        self._epoch.fill_(int(state["epoch"]))
        self._resume = {
            "epoch": int(state["epoch"]),
            "worker_batches": int(state["batches_yielded"]),
            "worker": int(state.get("worker", 0)),
        }

    # -- iteration
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch = self.epoch
        resume, self._resume = self._resume, None
        resumed = resume is not None and resume["epoch"] == epoch
        windows = self.windows(epoch, resume.get("stages", ()) if resumed else ())
        role, skip = worker_id, 0  # role: which worker's share of the windows this one plays
        if resumed:
            if "worker_batches" in resume:
                role, skip = resume["worker"] % num_workers, resume["worker_batches"]
            else:
                per_worker = [
                    sum(w.num_batches for w in worker_windows(windows, num_workers, k))
                    for k in range(num_workers)
                ]
                done, next_worker = resume_point(per_worker, resume["batches_yielded"], self.bundle)
                # the DataLoader restarts its round robin at worker 0: rotate roles to match
                role = (worker_id + next_worker) % num_workers
                skip = done[role]
        self._progress = {
            "epoch": epoch,
            "batches_yielded": skip,
            "worker": role,
            "num_workers": num_workers,
        }
        mine = worker_windows(windows, num_workers, role)
        return self._batches(mine, epoch, skip, None if info is None else worker_id)

    def _batches(self, windows, epoch: int, skip: int, worker_id: int | None) -> Iterator[Any]:
        in_worker = worker_id is not None and self.loader_transport
        batches = self._made(windows, epoch, skip, in_worker, worker_id)
        return bundled(batches, self.bundle, skip) if in_worker and self.bundle > 1 else batches

    def _made(self, windows, epoch: int, skip: int, in_worker: bool, worker_id: int | None) -> Iterator[Any]:
        packer = self.packer  # packed batches (dlpipe.loaders.packed), else padded ones
        if packer is None:
            stream = self._padded(windows, epoch, skip, in_worker)
        else:
            stream = packer.batches(self._reader, windows, epoch, skip)
        try:
            for batch in stream:
                self._progress["batches_yielded"] += 1
                if isinstance(batch, FilteredBatch) and not self.loader_transport:
                    continue  # iterated without dlpipe's loader: nobody else would skip it
                yield batch if packer is None else transport(batch, in_worker)
        except GeneratorExit:  # closed early (or at exit, when module globals may be gone)
            raise
        except DlpipeError as e:
            if not in_worker:
                raise
            yield WorkerError(e, worker_id)
        finally:
            stream.close()

    def _padded(self, windows, epoch: int, skip: int, in_worker: bool) -> Iterator[Any]:
        todo, skips = [], []
        for window in windows:
            if skip >= window.num_batches:  # finished before the checkpoint: not even read
                skip -= window.num_batches
                continue
            todo.append(window)
            skips.append(skip)
            skip = 0
        # over object storage the next windows are fetched while this one is padded and yielded
        windows_read = read_windows(self._reader, self.source.shards, todo)
        try:
            for window, first, cols in zip(todo, skips, windows_read):
                lengths = None
                if self.boundaries is not None:
                    enc = self.encodings[self.length_column]
                    lengths = np.diff(cols[self.length_column][1]) // enc.inner
                order = window_batches(window, lengths, batch_size=self.batch_size, shuffle=self.shuffle,
                                       seed=self.seed, epoch=epoch, rank=self.rank, boundaries=self.boundaries)
                for rows in order[first:]:
                    yield make_batch(cols, rows, self.encodings, self.source.info.pad_values,
                                     self.options, self.boundaries, self.collate_fn,
                                     in_worker=in_worker, transforms=self.source.transforms)
        finally:
            windows_read.close()

