"""What dlpipe's PyTorch loaders do when a DataLoader worker dies: stop the others, unblock a
reader stuck on a half-written batch, and raise ``LoaderWorkerError`` instead of PyTorch's
message (see ``dlpipe.loaders.torch_state.LoaderIterator``)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import weakref
from typing import Any

from dlpipe.errors import LoaderWorkerError


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def stop_workers(inner: Any) -> None:
    """Stop a failed multiprocessing iterator's workers now: SIGKILL the survivors (one may wait
    forever for a lock its dead sibling held), then let PyTorch close the queues. Their pids leave
    PyTorch's SIGCHLD registry first, so these deaths raise nothing in the main thread."""
    workers = list(getattr(inner, "_workers", None) or [])
    if getattr(inner, "_worker_pids_set", False):
        try:
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(inner))
            inner._worker_pids_set = False
        except Exception:  # another torch layout: its shutdown removes them itself
            pass
    for w in workers:
        if w.exitcode is None:
            w.kill()
    for w in workers:
        w.join(timeout=5)
    shutdown = getattr(inner, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


RESCUE_AFTER_S = 1.0  # a next() waiting this long while a worker is dead is unblocked (_Watchdog)


class _Watchdog:
    """One daemon thread per process that watches the live multi-worker ``LoaderIterator``s.

    A worker killed while writing a batch into the shared result pipe (a batch of more than
    4 KiB, i.e. more than the kernel writes atomically, into a full pipe) leaves part of a
    message there. The reader then blocks in ``recv`` for bytes that never come: in the main
    thread PyTorch's SIGCHLD handler interrupts it, in any other thread nothing does, and its
    5-second worker check never runs. When a ``next()`` has waited ``RESCUE_AFTER_S`` while one
    of its workers is dead, this thread writes zeros into the pipe (the main process holds its
    write end) until the reader returns: the completed message fails to unpickle and PyTorch's
    own check reports the dead worker, which ``LoaderIterator`` turns into ``LoaderWorkerError``.
    The thread exits when no iterator is left to watch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def watch(self, it: Any) -> None:  # a torch_state.LoaderIterator
        with self._lock:
            self._watched.add(it)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="dlpipe-loader-watchdog", daemon=True
                )
                self._thread.start()

    def dead_worker_error(self) -> LoaderWorkerError | None:
        """The error for a dead worker of a watched iterator (for the SIGCHLD handler)."""
        for _ in range(3):  # a weakref callback may drop an entry while the set is copied
            try:
                watched = list(self._watched)
                break
            except RuntimeError:
                continue
        else:
            return None
        for it in watched:
            dead = it._dead_workers(needed_only=True)
            if dead:
                return it._describe(dead, "the epoch cannot go on")
        return None

    def _run(self) -> None:
        while True:
            time.sleep(RESCUE_AFTER_S / 2)
            with self._lock:
                watched = list(self._watched)
                if not watched:
                    self._thread = None
                    return
            for it in watched:
                # never let the watchdog die over one iterator; the 5 s check still runs
                with contextlib.suppress(Exception):
                    it._rescue_if_stuck()
            del watched, it


_WATCHDOG = _Watchdog()
_SIGCHLD_CHAINED = False


def _chain_sigchld_handler() -> None:
    """Put dlpipe's message on PyTorch's SIGCHLD error.

    PyTorch's handler (installed by the first multi-worker iterator made in the main thread)
    raises "DataLoader worker (pid N) is killed by signal: Killed." wherever the main thread is
    when a worker dies, usually in the training step. dlpipe's handler calls it and, when the
    dead worker is one of a dlpipe loader's, raises ``LoaderWorkerError`` from it instead, with
    the epoch, the batch count and how to resume. Installed once, in the main thread, over a
    callable handler only; other deaths pass through unchanged.
    """
    global _SIGCHLD_CHAINED
    if _SIGCHLD_CHAINED or threading.current_thread() is not threading.main_thread():
        return
    if not hasattr(signal, "SIGCHLD"):
        return
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous):
        return
    _SIGCHLD_CHAINED = True

    def handler(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        except RuntimeError as e:
            failure = _WATCHDOG.dead_worker_error()
            if failure is None:
                raise
            try:
                raise failure from e
            finally:
                del failure

    signal.signal(signal.SIGCHLD, handler)


