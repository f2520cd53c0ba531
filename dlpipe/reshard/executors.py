"""Executors for the reshard's tasks: ``map``/``shutdown`` like ``concurrent.futures``.

The reshard hands pure task functions (scan a record range, write one shard) to an executor
built with ``initializer=``/``initargs=`` as a ``ProcessPoolExecutor`` is; the initializer
installs the job (source, padding, output) in each worker once. Three kinds, one shape:

- ``InlineExecutor``: this process (one worker: no pool to start).
- ``process_pool``: a ``ProcessPoolExecutor`` on this machine (``--engine local``).
- ``RayExecutor``: Ray tasks (``--engine ray``). The initargs go into the object store once and
  each worker runs the initializer once; every call becomes one Ray task, and results come back
  in submission order. The tasks are the same functions, so plan, shard bytes and manifest are
  the same; nothing depends on how many workers run them.

Ray failures: a task whose worker process dies (killed, out of memory, node lost) is retried up
to ``max_retries`` times; a shard only reaches its final name when complete, so a retry writes
the same bytes. A DlpipeError raised by a task (bad input, unwritable output) is not retried and
reaches the caller as itself, so the CLI prints its one line.

Ray that dlpipe started (or connected to) is shut down when the executor shuts down; Ray the
caller initialized is left as it is. On a cluster of several nodes, every worker must reach the
sources and the output by the same names: URLs (``s3://``) or a shared filesystem. Remote
sources that are copied to a local cache before reading (all kinds but .npy and raw) exist on
the driver's node only.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

from dlpipe._deps import require
from dlpipe.errors import ConfigError, DlpipeError


class InlineExecutor:
    """``map``/``shutdown`` in this process: the one worker, for ``workers=1``. The initializer
    runs before each ``map``, so the installed job is this executor's."""

    def __init__(self, *, initializer: Callable, initargs: tuple = ()) -> None:
        self._initializer = initializer
        self._initargs = initargs

    def map(self, fn: Callable, args: Iterable) -> Iterator:
        """The results of ``fn`` over ``args``, in order, computed as they are taken."""
        self._initializer(*self._initargs)
        return (fn(a) for a in args)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def process_pool(workers: int, *, initializer: Callable, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes started by ``pool_context()``."""
    return ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=initializer, initargs=initargs)


def pool_context():
    """fork where the platform has it, as PyTorch's DataLoader does: workers start in
    milliseconds and need no ``__main__`` guard. Workers run only numpy and file I/O, so the
    threads of a framework imported by the parent do not matter to them. ``DLPIPE_START_METHOD``
    overrides it (spawn, forkserver)."""
    method = os.environ.get("DLPIPE_START_METHOD")
    if method is None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


# ---------------------------------------------------------------------------------------------
# Ray

_STARTED_HERE = False  # dlpipe called ray.init, so dlpipe calls ray.shutdown
_WORKER_JOB: str | None = None  # in a Ray worker: the object id of the job it holds


def connect(address: str | None = None) -> int:
    """Join Ray at ``address`` (default: ``RAY_ADDRESS``, then a ``ray start`` cluster on this
    machine, else a new local instance); return the cluster's CPU count."""
    global _STARTED_HERE
    ray = require("ray", "--engine ray")
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or None
        _probe(target)
        # a remote cluster's workers do not share this environment; fault injection must reach them
        env = {k: v for k, v in os.environ.items() if k.startswith("DLPIPE_")}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="error",
                     configure_logging=True, runtime_env={"env_vars": env} if env and target else None)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConfigError(_cannot_connect(target or "a new local instance", _first_line(e))) from None
        _STARTED_HERE = True
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _probe(target: str | None) -> None:
    """Refuse an unreachable ``host:port`` at once: Ray itself retries for minutes."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", target or "")
    if found is None:  # None, "auto", "local": Ray looks for the cluster itself
        return
    try:
        socket.create_connection((found[1], int(found[2])), timeout=5).close()
    except OSError as e:
        raise ConfigError(_cannot_connect(target, e.strerror or type(e).__name__)) from None


def _cannot_connect(target: str, why: str) -> str:
    return (f"--ray-address {target}: cannot connect to Ray ({why}); start the cluster (ray start --head) "
            "or pass its address, e.g. --ray-address HOST:6379 or ray://HOST:10001")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run_task(setup_box: list, fn: Callable, arg):
    """One task on a Ray worker: run the executor's initializer once per worker and setup (the
    box keeps Ray from resolving the reference for every task), then the function."""
    global _WORKER_JOB
    initializer, ref = setup_box
    if ref.hex() != _WORKER_JOB:
        import ray

        initializer(*ray.get(ref))
        _WORKER_JOB = ref.hex()
    return fn(arg)


class RayExecutor:
    """``map``/``shutdown`` like ``concurrent.futures.Executor``, on Ray tasks; ``initializer``
    runs with ``initargs`` once in each worker before its first task, as in
    ``ProcessPoolExecutor``."""

    def __init__(self, *, initializer: Callable, initargs: tuple = (), address: str | None = None,
                 max_retries: int = 3) -> None:
        self._ray = require("ray", "--engine ray")
        connect(address)
        self._job = [initializer, self._ray.put(initargs)]
        self._max_retries = max_retries
        self._task = self._ray.remote(max_retries=max_retries, retry_exceptions=False)(_run_task)
        self._pending: set = set()

    def map(self, fn: Callable, args: Iterable) -> Iterator:
        """Submit every call now; yield the results in submission order."""
        refs = [self._task.remote(self._job, fn, a) for a in args]
        self._pending.update(refs)
        return self._results(refs, fn.__name__)

    def _results(self, refs: list, name: str) -> Iterator:
        ray = self._ray
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, DlpipeError):
                    raise e.cause from None
                raise
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError) as e:
                raise DlpipeError(f"Ray task {name} failed after {self._max_retries} retries "
                                  f"({_first_line(e)}); rerun to resume from the finished shards") from e
            finally:
                self._pending.discard(ref)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        ray = self._ray
        pending = list(self._pending)
        self._pending.clear()
        if cancel_futures:
            for ref in pending:
                ray.cancel(ref, force=True)
        if wait and pending:  # a cancelled task is done once its worker is gone
            ray.wait(pending, num_returns=len(pending), timeout=60)
        disconnect()


def disconnect() -> None:
    """Shut Ray down if ``connect`` started it (or joined a cluster for dlpipe); a Ray the
    caller initialized is left as it is."""
    global _STARTED_HERE
    if _STARTED_HERE:
        import ray

        ray.shutdown()
        _STARTED_HERE = False
