"""PyTorch front end: padded batches from dlpipe shards through a ``torch.utils.data.DataLoader``.

``ShardIterableDataset`` yields whole *batches* (the DataLoader runs with ``batch_size=None``):
each loader step reads one window of records with the index-driven ``ShardReader``, orders it with
the shared epoch plan (``dlpipe.loaders.common``) and pads every batch with numpy, so there is no
per-record Python on the hot path; tensors are ``torch.from_numpy`` views of those arrays.

Batches are dicts column -> tensor in the manifest's logical dtypes: variable columns padded to
``[B, L, ...]`` (the padding rule of ``common.collate``), fixed columns ``[B, *shape]``, and
``attention_mask`` ``[B, L]`` int64 from the first variable column.

**Work split.** Rank and world size come from the explicit ``rank``/``world_size`` arguments when
given (so a test or a custom launcher can say exactly what it wants), else from an initialized
``torch.distributed`` group, else from the ``RANK``/``WORLD_SIZE`` environment variables, else
1 process. Each rank takes an equal share of the epoch's record order and cuts it into windows
of about ``buffer_size`` records; DataLoader workers take those windows in turn. With world
size 1, or when the number of records divides by it, every record is read exactly once per
epoch. Otherwise every rank still gets the same number of batches, so DDP never waits at the end
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

**collate_fn** (optional) replaces the padding rule: it receives the batch as a list of
per-record dicts of numpy arrays (variable columns unpadded, as ``ShardDataset`` yields them),
like a ``torch`` collate_fn; numpy arrays in a returned dict become tensors, anything else is
yielded as it is. It is a per-record path: the built-in padding is much faster.
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
    UNEVEN,
    Ragged,
    buffer_batches,
    collate,
    default_boundaries,
    epoch_windows,
    take_rows,
    window_batches,
    worker_windows,
)
from dlpipe.loaders.shard_reader import ShardReader  # noqa: E402
from dlpipe.loaders.torch_state import (  # noqa: E402
    PLAN_KEYS,
    STATE_VERSION,
    DlpipeDataLoader,
    LoaderWorkerError,
    WorkerError,
    numpy_to_tensors,
    resume_point,
    stateful_loader_class,
)
from dlpipe.loaders.windows import read_windows  # noqa: E402

# A worker sends a batch up to this size as numpy arrays, pickled through the result pipe: for
# small batches that is ~8x faster than tensors, each of which PyTorch moves into its own
# shared-memory segment and passes as a file descriptor; bigger batches go as tensors.
PIPE_BYTES = 1 << 20
BUCKET_WINDOW_BATCHES = 64  # records grouped by length bucket come from windows of this many batches

__all__ = [
    "DlpipeDataLoader",
    "LoaderWorkerError",
    "ShardIterableDataset",
    "resolve_world",
    "to_torch_dataloader",
]


def resolve_world(world_size: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world_size, rank): explicit arguments, else torch.distributed, else RANK/WORLD_SIZE, else (1, 0)."""
    if (world_size is None) != (rank is None):
        raise ConfigError(
            f"pass both world_size and rank, or neither (got world_size={world_size}, rank={rank})"
        )
    if world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        else:
            world_size, rank = 1, 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank={rank}, world_size={world_size}; need world_size >= 1 and 0 <= rank < world_size"
        )
    return int(world_size), int(rank)


class ShardIterableDataset(IterableDataset):
    """Padded batches of a ShardDataset for one rank; see the module docstring.

    Shuffling (seed, ``buffer_size``) and the starting epoch come from the ShardDataset's
    ``shuffle``/``set_epoch`` state. ``len()`` is the number of batches per epoch on this rank.
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
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}; must be an int >= 1")
        if pad_to_multiple_of is not None and (
            not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
        ):
            raise ConfigError(
                f"pad_to_multiple_of={pad_to_multiple_of!r}; must be None or an int >= 1"
            )
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side={padding_side!r}; use 'right' or 'left'")
        if uneven not in UNEVEN:
            raise ConfigError(f"uneven={uneven!r}; use 'pad' or 'drop'")
        self.source = source
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.collate_fn = collate_fn
        self.uneven = uneven
        self.return_attention_mask = return_attention_mask
        self.world_size, self.rank = resolve_world(world_size, rank)
        if self.world_size > 1 and source.shuffled and not source.seed_given:
            raise ConfigError("shuffling across several ranks needs the same seed on every rank; pass "
                              "ds.shuffle(seed=...) or to_torch_dataloader(seed=...)")
        self.encodings = {n: source.info.columns[n] for n in source.columns}
        self.length_column = next((n for n, e in self.encodings.items() if e.variable), None)
        self.boundaries = self._boundaries(bucket_boundaries)
        # records per window = the shuffle buffer; whole batches so windows never share one
        self.window_batches = buffer_batches(source.buffer_size, batch_size)
        if self.boundaries is not None:  # grouping by length needs many batches to choose from
            self.window_batches = max(self.window_batches, BUCKET_WINDOW_BATCHES)
        self.block_records = source.block_records if source.shuffled else None
        self._epoch = torch.tensor(int(source.epoch), dtype=torch.int64).share_memory_()
        self._reader = source.reader()
        self._resume: dict[str, int] | None = None
        self._progress = {
            "epoch": int(source.epoch),
            "batches_yielded": 0,
            "worker": 0,
            "num_workers": 1,
        }
        # set by dlpipe's loaders, whose iterators re-raise WorkerError batches and turn numpy
        # batches from workers into tensors (see ``_collate``)
        self.loader_transport = False

    def _boundaries(self, spec: Sequence[int] | str | None) -> list[int] | None:
        if spec is None:
            return None
        if self.length_column is None:
            raise ConfigError(
                "bucket_boundaries need a variable-length column; the selected columns have none"
            )
        if spec == "auto":
            return default_boundaries(
                self.source.info, self.length_column, pad_to_multiple_of=self.pad_to_multiple_of
            )
        if isinstance(spec, str):
            raise ConfigError(f"bucket_boundaries={spec!r}; use a list of lengths or 'auto'")
        bounds = [int(b) for b in spec]
        if not bounds or bounds != sorted(set(bounds)) or bounds[0] < 1:
            raise ConfigError(f"bucket_boundaries={list(spec)!r}; need increasing lengths >= 1")
        return bounds

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
        return self.source.shuffled

    @property
    def seed(self) -> int:
        return self.source.shuffle_seed or 0

    def plan_settings(self) -> dict[str, Any]:
        """The settings the epoch plan depends on (a checkpoint resumes only under the same)."""
        return {
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "buffer_size": self.source.buffer_size,
            "block_records": self.block_records,
            "world_size": self.world_size,
            "rank": self.rank,
            "uneven": self.uneven,
        }

    def windows(self, epoch: int | None = None):
        """This rank's windows of ``epoch`` (default: the current one)."""
        return epoch_windows(
            [s.num_records for s in self.source.shards],
            batch_size=self.batch_size,
            world_size=self.world_size,
            rank=self.rank,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            window_batches=self.window_batches,
            drop_last=self.drop_last,
            uneven=self.uneven,
            block_records=self.block_records,
        )

    def __len__(self) -> int:
        return sum(w.num_batches for w in self.windows())

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
            for k in PLAN_KEYS
            if k in state and k != "num_workers" and state[k] != self.plan_settings()[k]
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
        windows = self.windows(epoch)
        role, skip = worker_id, 0  # role: which worker's share of the windows this one plays
        if resume is not None and resume["epoch"] == epoch:
            if "worker_batches" in resume:
                role, skip = resume["worker"] % num_workers, resume["worker_batches"]
            else:
                per_worker = [
                    sum(w.num_batches for w in worker_windows(windows, num_workers, k))
                    for k in range(num_workers)
                ]
                done, next_worker = resume_point(per_worker, resume["batches_yielded"])
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
                order = window_batches(
                    window,
                    lengths,
                    batch_size=self.batch_size,
                    shuffle=self.shuffle,
                    seed=self.seed,
                    epoch=epoch,
                    rank=self.rank,
                    boundaries=self.boundaries,
                )
                for rows in order[first:]:
                    batch = self._collate(cols, rows, in_worker)
                    self._progress["batches_yielded"] += 1
                    yield batch
        except GeneratorExit:  # closed early (or at exit, when module globals may be gone)
            raise
        except DlpipeError as e:
            if worker_id is None or not self.loader_transport:
                raise
            yield WorkerError(e, worker_id)
        finally:
            windows_read.close()

    def _collate(self, cols: dict[str, Ragged], rows: np.ndarray, in_worker: bool) -> Any:
        if self.collate_fn is not None:
            out = self.collate_fn(self._records(cols, rows))
        else:
            out = collate(
                {n: cols[n] for n in self.encodings},
                self.encodings,
                self.source.info.pad_values,
                rows=rows,
                pad_to_multiple_of=self.pad_to_multiple_of,
                boundaries=self.boundaries,
                padding_side=self.padding_side,
                return_attention_mask=self.return_attention_mask,
            )
        if not isinstance(out, dict):
            return out
        if (
            in_worker
            and sum(v.nbytes for v in out.values() if isinstance(v, np.ndarray)) <= PIPE_BYTES
        ):
            return out  # pickled through the pipe; the loader's iterator makes the tensors
        return numpy_to_tensors(out)

    def _records(self, cols: dict[str, Ragged], rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = [{} for _ in rows]
        for name, enc in self.encodings.items():
            values, splits = take_rows(cols[name], rows)
            inner = tuple(enc.shape[1:]) if enc.variable else tuple(enc.shape)
            for rec, part in zip(out, np.split(values, splits[1:-1])):
                rec[name] = part.reshape((-1, *inner)) if enc.variable else part.reshape(inner)
        return out


def to_torch_dataloader(
    ds: Any,  # a loaders.dataset.ShardDataset
    batch_size: int = 1,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list[dict[str, np.ndarray]]], Any] | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
    bucket_boundaries: Sequence[int] | str | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    world_size: int | None = None,
    rank: int | None = None,
    uneven: str = "pad",
    seed: int | None = None,
    stateful: bool = False,
    return_attention_mask: bool = True,
    timeout: float = 0,
):
    """A DataLoader of padded batches of ``ds`` (see the module docstring).

    ``shuffle=True`` on a dataset not yet ``ds.shuffle(...)``-d shuffles it with ``seed`` (a
    random one when None, recorded in ``state_dict``); a shuffled ``ds`` is shuffled either way,
    and ``seed`` then replaces its seed (``ShardDataset.with_shuffle``, shared with tf.data).
    ``bucket_boundaries``: lengths, or ``"auto"`` for ``default_boundaries`` of the first variable
    column; each batch is padded to the smallest boundary that fits (records are grouped by
    bucket within a window). Returns a ``DlpipeDataLoader``, or with ``stateful=True`` a
    torchdata ``StatefulDataLoader`` subclass; both have ``set_epoch``, ``state_dict`` and
    ``load_state_dict``. A worker that dies, or with ``timeout`` > 0 sends no batch for that many
    seconds, ends the epoch with ``LoaderWorkerError``.
    """
    require("torch", "to_torch_dataloader")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}; must be an int >= 0")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ConfigError(f"timeout={timeout!r}; must be a number of seconds >= 0 (0: wait forever)")
    if num_workers == 0 and (prefetch_factor is not None or persistent_workers):
        raise ConfigError(
            "prefetch_factor and persistent_workers need num_workers > 0 "
            f"(got num_workers=0, prefetch_factor={prefetch_factor}, "
            f"persistent_workers={persistent_workers})"
        )
    if num_workers == 0 and timeout:
        raise ConfigError(f"timeout={timeout!r} needs num_workers > 0 (it bounds the wait for workers)")
    ds = ds.with_shuffle(shuffle, seed)
    dataset = ShardIterableDataset(
        ds,
        batch_size=batch_size,
        drop_last=drop_last,
        pad_to_multiple_of=pad_to_multiple_of,
        padding_side=padding_side,
        bucket_boundaries=bucket_boundaries,
        collate_fn=collate_fn,
        world_size=world_size,
        rank=rank,
        uneven=uneven,
        return_attention_mask=return_attention_mask,
    )
    dataset.loader_transport = True
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": persistent_workers,
    }
    if prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    if timeout:
        kwargs["timeout"] = float(timeout)
    if stateful:
        return stateful_loader_class()(dataset, **kwargs)
    return DlpipeDataLoader(dataset, **kwargs)
