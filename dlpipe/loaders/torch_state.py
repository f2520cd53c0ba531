"""Checkpointing for the PyTorch loader: where a resumed epoch starts, and the loaders that save it.

``DlpipeDataLoader`` counts the batches its iterator hands out in the main process; that count
and the epoch are its ``state_dict``. Because the epoch plan is a pure function of the settings,
the count alone says how far every worker got: PyTorch takes batches from workers in turn and
skips exhausted ones, so ``resume_point`` replays that order arithmetically, each worker skips
its finished windows without reading them, and the DataLoader's round robin is rotated so the
resumed stream continues with the worker that was next (a plain restart would begin at worker 0
and reorder batches).

``DlpipeStatefulDataLoader`` is torchdata's ``StatefulDataLoader``, which instead asks every
worker's dataset copy for its ``state_dict`` and restores each worker itself.
"""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError, DlpipeError

torch = require("torch", "dlpipe's PyTorch loader")
from torch.utils.data import DataLoader  # noqa: E402

STATE_VERSION = 2  # 2: shuffled epochs permute blocks across the split (block_records)
# settings that shape the epoch plan: a checkpoint only resumes under the same ones
PLAN_KEYS = (
    "batch_size",
    "drop_last",
    "shuffle",
    "seed",
    "buffer_size",
    "block_records",
    "world_size",
    "rank",
    "uneven",
    "num_workers",
)


def resume_point(batches_per_worker: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """(batches each worker had yielded, worker whose batch comes next) after the loader yielded
    ``consumed`` batches, taking them from workers in turn and skipping exhausted ones.

    Agrees with ``common.batches_consumed_per_worker`` on the counts; also says who is next, which
    resuming needs to keep the order.
    """
    n = len(batches_per_worker)
    remaining = list(batches_per_worker)
    done = [0] * n
    left = consumed
    while left > 0:
        active = [w for w in range(n) if remaining[w] > 0]
        if not active:
            break
        rounds = min(min(remaining[w] for w in active), left // len(active))
        if rounds == 0:  # a partial round ends the count; it began at worker 0 (full rounds did)
            for w in active[:left]:
                done[w] += 1
                remaining[w] -= 1
            return done, (active[left - 1] + 1) % n
        for w in active:
            done[w] += rounds
            remaining[w] -= rounds
        left -= rounds * len(active)
    return done, 0


class WorkerError:
    """A DlpipeError caught in a loader worker, sent as a batch so the main process re-raises the
    original exception (PyTorch's ExceptionWrapper would rebuild it from its message alone, and
    FormatError's path and offset would be lost)."""

    def __init__(self, error: DlpipeError, worker_id: int) -> None:
        self.error = error
        self.worker_id = worker_id
        self.trace = traceback.format_exc()

    def reraise(self) -> None:
        err, self.error = self.error, None
        if hasattr(err, "add_note"):
            err.add_note(
                f"raised in DataLoader worker process {self.worker_id}; worker traceback:\n"
                f"{self.trace}"
            )
        try:
            raise err
        finally:
            # no frame of this traceback may hold the exception: that cycle would leave the
            # DataLoader iterator to the garbage collector, whose shutdown of workers hangs
            del err


def numpy_to_tensors(batch: dict[str, Any], pin: bool = False) -> dict[str, Any]:
    """The numpy arrays of a dict batch as tensors (zero copy unless pinned)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if pin:
                v = v.pin_memory()
        out[k] = v
    return out


def identity(batch: Any) -> Any:
    """The DataLoader's collate_fn: the dataset already yields finished batches."""
    return batch


class LoaderIterator:
    """Wraps a DataLoader iterator: re-raises worker errors, makes tensors of numpy batches sent
    by workers, and tells ``on_batch`` about each batch as the user receives it (``len`` is kept,
    so progress bars still work)."""

    def __init__(
        self,
        inner: Iterator[Any],
        length: int,
        *,
        pin_memory: bool = False,
        on_batch: Callable[[LoaderIterator], None] | None = None,
    ) -> None:
        self._inner = inner
        self._len = length
        self._pin = pin_memory and torch.cuda.is_available()
        self._on_batch = on_batch

    def __iter__(self) -> LoaderIterator:
        return self

    def __len__(self) -> int:
        return self._len

    def __next__(self) -> Any:
        batch = next(self._inner)
        if isinstance(batch, dict):
            batch = numpy_to_tensors(batch, self._pin)
        elif isinstance(batch, WorkerError):
            error, batch = batch, None
            error.reraise()
        if self._on_batch is not None:
            self._on_batch(self)
        return batch


class DlpipeDataLoader(DataLoader):
    """A ``torch.utils.data.DataLoader`` over a ``ShardIterableDataset`` that can be checkpointed.

    ``state_dict()`` is ``{"epoch", "batches_yielded", ...plan settings}``; after
    ``load_state_dict`` the next iteration continues that epoch with the next batch, exactly as
    the uninterrupted stream would have. ``set_epoch(n)`` reshuffles; a pending resume is dropped
    when the epoch is changed to another one.
    """

    def __init__(self, dataset, **kwargs: Any) -> None:
        kwargs.setdefault("collate_fn", identity)
        super().__init__(dataset, batch_size=None, **kwargs)
        self._batches_yielded = 0
        # weak: the iterator refers to the loader, and a reference cycle would leave a dropped
        # iterator's workers to the garbage collector, which cannot shut them down cleanly
        self._active: weakref.ref[LoaderIterator] | None = None

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.dataset.epoch:
            self._batches_yielded = 0
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> LoaderIterator:  # type: ignore[override]
        pending = self.dataset._resume
        if pending and self.persistent_workers and self._iterator is not None:
            # persistent workers hold the dataset copy they were started with, which lacks the
            # resume; new ones get it (and consume it in their first iteration)
            self._iterator._shutdown_workers()
            self._iterator = None
        self._batches_yielded = pending.get("batches_yielded", 0) if pending else 0
        inner = super().__iter__()
        self.dataset._resume = None  # workers (or the main-process iterator) took their copy
        it = LoaderIterator(
            inner, len(self.dataset), pin_memory=self.pin_memory, on_batch=self._count
        )
        self._active = weakref.ref(it)
        return it

    def _count(self, it: LoaderIterator) -> None:
        if (
            self._active is not None and it is self._active()
        ):  # an older iterator of this loader no longer moves the count
            self._batches_yielded += 1

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "epoch": ds.epoch,
            "batches_yielded": self._batches_yielded,
            **ds.plan_settings(),
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds = self.dataset
        mine = {**ds.plan_settings(), "num_workers": self.num_workers}
        changed = {k: (state.get(k), mine[k]) for k in PLAN_KEYS if state.get(k) != mine[k]}
        if changed:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"cannot resume this checkpoint under other loader settings ({what}); "
                "the epoch plan depends on them"
            )
        total = len(ds)
        consumed = int(state["batches_yielded"])
        if not 0 <= consumed <= total:
            raise ConfigError(
                f"batches_yielded={consumed} is outside this epoch's 0..{total} batches"
            )
        ds.set_epoch(state["epoch"])
        ds._resume = {"epoch": int(state["epoch"]), "batches_yielded": consumed}
        self._batches_yielded = consumed


def stateful_loader_class() -> type:
    """``DlpipeStatefulDataLoader``, built on first use so torchdata stays optional."""
    global _STATEFUL
    if _STATEFUL is None:
        sdl = require("torchdata.stateful_dataloader", "stateful=True (StatefulDataLoader)")

        class DlpipeStatefulDataLoader(sdl.StatefulDataLoader):
            """torchdata's StatefulDataLoader with ``set_epoch`` and worker errors re-raised."""

            def __init__(self, dataset, **kwargs: Any) -> None:
                kwargs.setdefault("collate_fn", identity)
                super().__init__(dataset, batch_size=None, **kwargs)

            def set_epoch(self, epoch: int) -> None:
                self.dataset.set_epoch(epoch)

            def __iter__(self) -> LoaderIterator:  # type: ignore[override]
                return LoaderIterator(
                    super().__iter__(), len(self.dataset), pin_memory=self.pin_memory
                )

        _STATEFUL = DlpipeStatefulDataLoader
    return _STATEFUL


_STATEFUL: type | None = None
