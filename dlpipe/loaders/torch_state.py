"""Checkpointing for the PyTorch loader: where a resumed epoch starts, and the loaders that save it.

``DlpipeDataLoader`` counts the batches its iterator hands out in the main process; that count
and the epoch are its ``state_dict``. Because the epoch plan is a pure function of the settings,
the count alone says how far every worker got: PyTorch takes batches from workers in turn and
skips exhausted ones, so ``common.resume_point`` replays that order arithmetically, each worker skips
its finished windows without reading them, and the DataLoader's round robin is rotated so the
resumed stream continues with the worker that was next (a plain restart would begin at worker 0
and reorder batches).

``DlpipeStatefulDataLoader`` is torchdata's ``StatefulDataLoader``, which instead asks every
worker's dataset copy for its ``state_dict`` and restores each worker itself.

**A worker that dies** (SIGKILL from the out-of-memory killer, a crash in native code) ends the
epoch with ``LoaderWorkerError`` naming the worker, its pid and the signal, in bounded time: the
iterator stops the other workers and the loader starts fresh ones on the next iteration. The
batches the user received are all counted, so ``loader.state_dict()`` taken after the error (or
any earlier one) resumes exactly. In the main thread PyTorch's SIGCHLD handler raises at once,
wherever the program is (dlpipe's handler, chained to it, raises ``LoaderWorkerError``
instead). Elsewhere PyTorch checks its workers every ``MP_STATUS_CHECK_INTERVAL`` (5 s) of
waiting, but a worker killed halfway through writing a batch into the result pipe leaves a
partial message that the reader would wait on forever: a watchdog thread (``_Watchdog``)
unblocks a ``next()`` that has waited a second while a worker is dead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from dlpipe._deps import require
from dlpipe.errors import ConfigError, LoaderWorkerError
from dlpipe.loaders.torch_faults import (
    _WATCHDOG,
    RESCUE_AFTER_S,
    _chain_sigchld_handler,
    _how_it_ended,
    stop_workers,
)

torch = require("torch", "dlpipe's PyTorch loader")
from torch.utils.data import DataLoader  # noqa: E402

from dlpipe.loaders.torch_batches import (  # noqa: E402
    Bundle,
    FilteredBatch,
    WorkerError,
    identity,
    numpy_to_tensors,
)
from dlpipe.loaders.torch_shm import Receiver, SlotBatch  # noqa: E402

STATE_VERSION = 3  # 3: the dataset's fingerprint, and stages (elastic resume, loaders.elastic)
# settings that shape the epoch plan: a checkpoint only resumes under the same ones
PLAN_KEYS = (
    "dataset",  # ShardDataset.fingerprint: which records (a mixture's: its sources and weights)
    "batch_size",
    "drop_last",
    "shuffle",
    "seed",
    "buffer_size",
    "block_records",
    "run_records",  # windows dealt to DataLoader workers a run at a time (common.worker_windows)
    "uneven",
    "packing",  # None, or dlpipe.loaders.packed.PackedEpochs.settings()
)

_RESUME = (
    "To continue exactly where it stopped: loader.load_state_dict(loader.state_dict()) (the "
    "state counts every batch you received; an earlier saved state_dict works too), then iterate "
    "again"
)


class LoaderIterator:
    """Wraps a DataLoader iterator: re-raises worker errors, makes tensors of numpy batches sent
    by workers, turns a dead worker into ``LoaderWorkerError`` (after stopping the others), and
    tells ``on_batch`` about each batch as the user receives it (``len`` is kept, so progress
    bars still work)."""

    def __init__(
        self,
        inner: Iterator[Any],
        length: int,
        *,
        pin_memory: bool = False,
        on_batch: Callable[[LoaderIterator], None] | None = None,
        on_failure: Callable[[Any], None] | None = None,
        epoch: int = 0,
        first: int = 0,
        receiver: Receiver | None = None,
    ) -> None:
        self._inner = inner
        self._receiver = receiver if receiver is not None else Receiver()
        self._receiver.keep_only({w.pid for w in getattr(inner, "_workers", None) or []})
        self._len = length
        self._pin = pin_memory and torch.cuda.is_available()
        self._on_batch = on_batch
        self._on_failure = on_failure
        self._epoch = epoch
        self._yielded = first  # batches of the epoch handed out, counting a resumed start
        self._bundled: list[Any] = []  # the rest of a worker's Bundle message, last batch first
        self._waiting: float | None = None  # since when a next() waits for the DataLoader
        self._rescued = False
        if getattr(inner, "_workers", None):
            _WATCHDOG.watch(self)
            _chain_sigchld_handler()

    def __iter__(self) -> LoaderIterator:
        return self

    def __len__(self) -> int:
        return self._len

    @property
    def worker_pids(self) -> list[int]:
        """The pids of this iterator's DataLoader worker processes ([] without workers)."""
        return [w.pid for w in getattr(self._inner, "_workers", None) or []]

    def __next__(self) -> Any:
        batch = self._next()
        while isinstance(batch, FilteredBatch):  # ds.filter emptied it: counted, not handed out
            batch = self._next()
        return batch

    def _next(self) -> Any:
        self._waiting = time.monotonic()
        try:
            if self._bundled:
                batch = self._bundled.pop()
            else:
                batch = next(self._inner)
                if isinstance(batch, Bundle):
                    self._bundled = batch[::-1]
                    batch = self._bundled.pop()
            if isinstance(batch, SlotBatch):
                batch = self._receiver.take(batch, self._pin)
            elif isinstance(batch, dict):
                batch = numpy_to_tensors(batch, self._pin)
            elif isinstance(batch, WorkerError):
                error, batch = batch, None
                error.reraise()
        except (RuntimeError, ConnectionError, EOFError) as e:
            # a worker that dies while the main process fetches a new shared-memory buffer from
            # it (torch_shm) shows as a reset connection rather than PyTorch's RuntimeError
            failure = self._worker_failure(e)
            if failure is None:
                raise
            try:
                raise failure from e
            finally:
                del failure  # no frame of the traceback may hold it (see WorkerError.reraise)
        finally:
            self._waiting = None
        self._yielded += 1
        if self._on_batch is not None:
            self._on_batch(self)
        return batch

    def _worker_failure(self, error: Exception) -> LoaderWorkerError | None:
        """LoaderWorkerError when ``error`` came from a dead (or, on timeout, silent) worker;
        the workers are stopped first. None for any other error."""
        dead = self._dead_workers()
        waited = time.monotonic()
        while not dead and not isinstance(error, RuntimeError) and time.monotonic() - waited < 2.0:
            # the connection closes as the process exits: it is reaped soon after (a RuntimeError
            # here is SIGCHLD: PyTorch's handler, or dlpipe's, saw the death too)
            with contextlib.suppress(RuntimeError):
                time.sleep(0.01)
            dead = self._dead_workers()
        timed_out = str(error).startswith("DataLoader timed out")
        if not dead and not timed_out:
            return None
        stop_workers(self._inner)
        self._receiver.keep_only(set())  # the rings go; names the dead worker left are removed
        self._inner._dlpipe_failed = True
        if self._on_failure is not None:
            self._on_failure(self._inner)
        if dead:
            return self._describe(dead, "the loader stopped its other workers")
        pids = ", ".join(str(p) for p in self.worker_pids)
        return LoaderWorkerError(
            f"{error} {self._where()}: the workers (pids {pids}) were alive but sent no batch; "
            f"the loader stopped them. {_RESUME}",
            epoch=self._epoch,
            batches_yielded=self._yielded,
        )

    def _dead_workers(self, needed_only: bool = False) -> list[tuple[int, Any]]:
        """Workers that died, or exited while this iterator still needed them. A worker whose
        share of the epoch is done is told to exit (code 0) while the others go on: not dead.
        ``needed_only``: only those PyTorch still waits for (it stops waiting for a dead one
        once it has noticed it)."""
        if getattr(self._inner, "_shutdown", False) or getattr(self._inner, "_dlpipe_failed", False):
            return []  # stopped on purpose (end of an epoch, a failure already reported)
        workers = getattr(self._inner, "_workers", None) or []
        status = getattr(self._inner, "_workers_status", None) or []
        needed = [i < len(status) and bool(status[i]) for i in range(len(workers))]
        return [
            (i, w)
            for i, w in enumerate(workers)
            if w.exitcode is not None and (needed[i] or (not needed_only and w.exitcode != 0))
        ]

    def _where(self) -> str:
        return f"in epoch {self._epoch} after the loader had yielded {self._yielded} of its {self._len} batches"

    def _describe(self, dead: list[tuple[int, Any]], then: str) -> LoaderWorkerError:
        worker_id, w = dead[0]
        others = f" (also dead: pids {', '.join(str(o.pid) for _, o in dead[1:])})" if dead[1:] else ""
        message = (
            f"DataLoader worker {worker_id} (pid {w.pid}) {_how_it_ended(w.exitcode)} "
            f"{self._where()}{others}; {then}. {_RESUME}"
        )
        if w.exitcode == -signal.SIGKILL:
            message += (
                " (SIGKILL often comes from the out-of-memory killer: see dmesg; fewer workers "
                "or a smaller prefetch_factor or batch_size need less memory)"
            )
        return LoaderWorkerError(
            message,
            worker_id=worker_id,
            pid=w.pid,
            exitcode=w.exitcode,
            epoch=self._epoch,
            batches_yielded=self._yielded,
        )

    def _rescue_if_stuck(self) -> None:
        """Called by the watchdog: unblock a next() stuck on a dead worker's partial message."""
        since = self._waiting
        if self._rescued or since is None or time.monotonic() - since < RESCUE_AFTER_S:
            return
        if not self._dead_workers(needed_only=True):
            return  # (a dead worker PyTorch no longer waits for cannot block the reader)
        queue = getattr(self._inner, "_worker_result_queue", None)
        writer = getattr(queue, "_writer", None)
        if writer is None or writer.closed:
            return
        self._rescued = True
        fd = writer.fileno()
        os.set_blocking(fd, False)  # the epoch is lost anyway: its workers get stopped
        zeros = bytes(1 << 16)
        deadline = time.monotonic() + 60
        while self._waiting is not None and time.monotonic() < deadline:
            try:
                os.write(fd, zeros)
            except BlockingIOError:  # the pipe is full: the reader has yet to take some
                time.sleep(0.01)
            except OSError:
                return


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
        if self.num_workers > 0 and getattr(dataset, "loader_transport", False):
            dataset.bundle = dataset.bundle_size()  # this loader's iterator unpacks Bundles
        self._batches_yielded = 0
        self._stages: list[dict[str, int]] = []  # earlier topologies of this epoch (loaders.elastic)
        self._receiver = Receiver()  # the workers' shared-memory rings (persistent workers keep theirs)
        # weak: the iterator refers to the loader, and a reference cycle would leave a dropped
        # iterator's workers to the garbage collector, which cannot shut them down cleanly
        self._active: weakref.ref[LoaderIterator] | None = None

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.dataset.epoch:
            self._batches_yielded = 0
            self._stages = []
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> LoaderIterator:  # type: ignore[override]
        pending = self.dataset._resume
        if pending and self.persistent_workers and self._iterator is not None:
            # persistent workers hold the dataset copy they were started with, which lacks the
            # resume; new ones get it (and consume it in their first iteration)
            self._iterator._shutdown_workers()
            self._iterator = None
        self._batches_yielded = pending.get("batches_yielded", 0) if pending else 0
        self._stages = list(pending.get("stages", [])) if pending else []
        length = self.dataset.num_batches(self.dataset.epoch, self._stages)
        inner = super().__iter__()
        self.dataset._resume = None  # workers (or the main-process iterator) took their copy
        it = LoaderIterator(
            inner,
            length,
            pin_memory=self.pin_memory,
            on_batch=self._count,
            on_failure=self._worker_failed,
            epoch=self.dataset.epoch,
            first=self._batches_yielded,
            receiver=self._receiver,
        )
        self._active = weakref.ref(it)
        return it

    def _worker_failed(self, inner: Any) -> None:
        if self._iterator is inner:  # persistent workers: the next iteration starts new ones
            self._iterator = None

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
            "stages": [dict(s) for s in self._stages],
            **ds.plan_settings(),
            "num_workers": self.num_workers,
            "bundle": ds.bundle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch with its next batch. The state may come from another world
        size or number of workers (every rank of the new job loads rank 0's state): the rest of
        the epoch is then split anew, each remaining record once (``loaders.elastic``)."""
        ds = self.dataset
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"this loader state has version {state.get('version')!r}; this dlpipe reads version "
                f"{STATE_VERSION}: start the epoch again (loader.set_epoch(epoch)) instead of resuming it"
            )
        mine = {**ds.plan_settings(), "num_workers": self.num_workers}
        changed = {k: (state.get(k), mine[k]) for k in PLAN_KEYS if state.get(k) != mine[k]}
        if changed:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            why = "another dataset" if "dataset" in changed else "other loader settings"
            raise ConfigError(
                f"cannot resume this checkpoint: it was saved from {why} ({what}); the epoch plan depends on them"
            )
        stages = [dict(s) for s in state.get("stages", [])]
        consumed = int(state["batches_yielded"])
        saved = {k: int(state[k]) for k in ("world_size", "num_workers")}
        saved["bundle"] = int(state.get("bundle", 1))  # batches per worker message (loaders.elastic)
        if saved != {"world_size": mine["world_size"], "num_workers": self.num_workers, "bundle": ds.bundle}:
            ds.check_elastic(saved)
            stages.append({**saved, "batches_yielded": consumed})
            consumed = 0
        total = ds.num_batches(int(state["epoch"]), stages)
        if not 0 <= consumed <= total:
            raise ConfigError(
                f"batches_yielded={consumed} is outside this epoch's 0..{total} batches"
            )
        ds.set_epoch(state["epoch"])
        ds._resume = {"epoch": int(state["epoch"]), "batches_yielded": consumed, "stages": stages}
        self._batches_yielded = consumed
        self._stages = stages


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
                self._receiver = Receiver()

            def set_epoch(self, epoch: int) -> None:
                # a loaded state of another epoch is dropped, as DlpipeDataLoader drops it: a
                # state saved at the end of epoch e, then set_epoch(e + 1), starts epoch e + 1
                pending = _state_epoch(self.next_iter_state)
                if pending is not None and pending != int(epoch):
                    self.next_iter_state = None
                self.dataset.set_epoch(epoch)

            def __iter__(self) -> LoaderIterator:  # type: ignore[override]
                if getattr(self._iterator, "_dlpipe_failed", False):
                    # its workers are gone: start new ones (load_state_dict first to resume)
                    self._iterator = None
                inner = super().__iter__()
                return LoaderIterator(
                    inner,
                    len(self.dataset),
                    pin_memory=self.pin_memory,
                    epoch=self.dataset.epoch,
                    first=getattr(inner, "_num_yielded", 0),
                    receiver=self._receiver,
                )

        _STATEFUL = DlpipeStatefulDataLoader
    return _STATEFUL


_STATEFUL: type | None = None


def _state_epoch(state: Any) -> int | None:
    """The epoch of dlpipe's dataset state inside a (torchdata) loader state, if any."""
    if isinstance(state, dict):
        if "epoch" in state and "batches_yielded" in state:
            return int(state["epoch"])
        for v in state.values():
            found = _state_epoch(v)
            if found is not None:
                return found
    return None
