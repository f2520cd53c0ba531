"""Executors for the reshard's tasks: ``map``/``shutdown`` like ``concurrent.futures``, and
``close`` (no more maps) like ``multiprocessing.Pool``.

The reshard hands pure task functions (scan a record range, write one shard) to an executor
built with ``initializer=``/``initargs=`` as a ``ProcessPoolExecutor`` is; the initializer
installs the job (source, padding, output) in each worker once. Two kinds, one shape:

- ``LocalPool``: this process and ``workers - 1`` helper processes on this machine
  (``--engine local``; one worker: no process to start).
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

import contextlib
import multiprocessing
import os
import pickle
import re
import signal
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import connection

from dlpipe._deps import require
from dlpipe.errors import ConfigError, DlpipeError


class LocalPool:
    """``map``/``shutdown`` on this machine, with this process as one of the ``workers``.

    ``workers - 1`` helper processes are started (by ``pool_context()``) when the pool is made,
    so they start while this process goes on; then every ``map`` runs its calls in the helpers
    and in this process alike, each process claiming its next call (``_Claims``) when it is
    ready to start it. Why not a ``ProcessPoolExecutor``: a reshard has few calls (8 shards for
    2 workers is common), so a worker idle at the end while another still has a call queued, as
    a ``ProcessPoolExecutor`` queues one ahead, costs a large share of the run; and this process
    already has the source's pages mapped and its heap faulted in, where each fresh worker would
    fault them in again (and fork once more). ``workers=1`` starts no process.

    Results come back in call order. An error of a call stops new claims at once (a bad record
    is reported in the time of a call, not after every call before it); the calls running
    finish, then the results before the first missing one are given, and the error of the
    lowest-numbered call that failed is raised in place of the rest.
    """

    def __init__(self, workers: int, *, initializer: Callable, initargs: tuple = ()) -> None:
        self._initializer = initializer
        self._initargs = initargs
        ctx = pool_context()
        self._claims = _Claims(ctx, workers)
        self._maps = 0  # maps so far: the next one's number
        self._helpers: list[tuple] = []
        self._idle: set[int] = set()  # helpers that found no call of the current map left
        self._closed = False
        for p in range(1, workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_helper_main, args=(theirs, self._claims, p, initializer, initargs),
                               name="dlpipe-reshard-worker", daemon=True)
            proc.start()
            theirs.close()
            self._helpers.append((proc, ours))

    def map(self, fn: Callable, args: Iterable) -> Iterator:
        """The results of ``fn`` over ``args``, in order; the helpers start at once, this process
        as the results are taken."""
        args = list(args)
        self._initializer(*self._initargs)  # the installed job is this pool's
        number = self._maps
        self._maps += 1
        self._claims.start(number, len(args))
        self._idle = set()
        calls = _write_calls(args) if self._helpers else None
        for _, conn in self._helpers:
            with contextlib.suppress(OSError):  # a helper that died is reported as the results are taken
                conn.send((number, fn, *calls))
        return self._results(fn, args, number, calls[0] if calls else None)

    def _results(self, fn: Callable, args: list, number: int, calls: str | None) -> Iterator:
        results: dict[int, tuple[bool, object]] = {}
        try:
            for k in range(len(args)):
                while k not in results:
                    if any(not ok for ok, _ in results.values()):  # no new claims: wait for the running calls, then k is there or never runs
                        while len(self._idle) < len(self._helpers):
                            self._collect(results, number, block=True)
                        if k not in results:
                            raise results[min(i for i, (ok, _) in results.items() if not ok)][1]
                        continue
                    i = self._claims.take(0, number)
                    if i is None:
                        self._collect(results, number, block=True)
                        continue
                    try:
                        results[i] = True, fn(args[i])
                    except Exception as e:
                        results[i] = False, e
                        self._claims.stop(number)
                    self._collect(results, number, block=False)
                ok, value = results.pop(k)
                if not ok:
                    raise value
                yield value
        finally:
            self._claims.stop(number)
            if calls:  # every claimed call has reported (or the map failed): none reads it now
                with contextlib.suppress(OSError):
                    os.unlink(calls)

    def _collect(self, results: dict, number: int, *, block: bool) -> None:
        """Take the helpers' finished results and idle notes (waiting for one if ``block``)."""
        if not self._helpers:
            return
        conns = [conn for _, conn in self._helpers]
        ready = connection.wait(conns + [proc.sentinel for proc, _ in self._helpers], timeout=None if block else 0)
        for proc, conn in list(self._helpers):
            gone = proc.sentinel in ready
            try:
                while conn in ready and conn.poll():
                    which, i, ok, value = conn.recv()
                    if which != number:  # a note of an earlier map, stopped by an error: dropped
                        continue
                    if i is None:
                        self._idle.add(proc.pid)
                        continue
                    results[i] = ok, value
                    if not ok:
                        self._claims.stop(number)
            except (EOFError, OSError):
                gone = True
            if gone:
                proc.join()
                if self._closed and proc.exitcode == 0:  # done with every map it was sent
                    self._helpers.remove((proc, conn))
                    self._idle.discard(proc.pid)
                    conn.close()
                    continue
                self._claims.stop(number)
                raise DlpipeError(f"a reshard worker process (pid {proc.pid}) died ({_exit_reason(proc.exitcode)}); "
                                  "rerun to resume from the finished shards")

    def close(self) -> None:
        """No more maps: each helper exits once it finds no call left to claim, so that its
        exit overlaps the calls still running here rather than delaying ``shutdown``."""
        if not self._closed:
            self._closed = True
            for _, conn in self._helpers:
                with contextlib.suppress(OSError):
                    conn.send(None)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Let each helper finish its current call (no new ones are claimed) and exit."""
        self._claims.stop()
        self.close()
        for proc, conn in self._helpers:
            if wait:
                proc.join()
            conn.close()
        self._helpers = []


class _Claims:
    """The calls of the current map that no process has claimed yet, shared by the pool's
    processes.

    A map's calls are cut into one contiguous segment per process. A process takes calls from
    the front of its own segment, and once that is empty, from the back of the segment with the
    most calls left, so the processes still finish together. Neighbouring calls read
    neighbouring records (the scan's record ranges; shards, in record order), so each process
    reads one region of the source in both passes: it maps each page of it once, where taking
    turns has every process map most of the source (and tear its mappings down at the end), and
    it reads a cold file front to back.
    """

    def __init__(self, ctx, processes: int) -> None:
        self._processes = processes
        # the current map's number, then [front, back) of each process's segment of its calls
        self._shared = ctx.Array("q", 1 + 2 * processes)

    def start(self, number: int, count: int) -> None:
        """Map ``number``, of ``count`` calls; the previous map's calls are over."""
        n = self._processes
        with self._shared.get_lock():
            a = self._shared.get_obj()
            a[0] = number
            for p in range(n):
                a[1 + 2 * p], a[2 + 2 * p] = count * p // n, count * (p + 1) // n

    def take(self, process: int, number: int) -> int | None:
        """The next call of map ``number`` for ``process`` to run; None when none is left."""
        with self._shared.get_lock():
            a = self._shared.get_obj()
            if a[0] != number:
                return None
            front, back = a[1 + 2 * process], a[2 + 2 * process]
            if front < back:
                a[1 + 2 * process] = front + 1
                return front
            left = [a[2 + 2 * p] - a[1 + 2 * p] for p in range(self._processes)]
            p = max(range(self._processes), key=left.__getitem__)
            if left[p] <= 0:
                return None
            a[2 + 2 * p] -= 1
            return a[2 + 2 * p]

    def stop(self, number: int | None = None) -> None:
        """No more calls of map ``number`` (None: of any map) are taken."""
        with self._shared.get_lock():
            a = self._shared.get_obj()
            if number is None or a[0] == number:
                for p in range(self._processes):
                    a[1 + 2 * p] = a[2 + 2 * p]


def _write_calls(args: list) -> tuple[str, list[int]]:
    """The map's arguments pickled once into a temporary file, and where each one starts: a
    helper reads only the calls it claims (a write task's arguments hold its records' lengths,
    so sending every helper all of them would copy the dataset's length table to each)."""
    fd, path = tempfile.mkstemp(prefix="dlpipe-reshard-calls-")
    offsets = [0]
    with os.fdopen(fd, "wb") as f:
        for a in args:
            offsets.append(offsets[-1] + f.write(pickle.dumps(a, protocol=pickle.HIGHEST_PROTOCOL)))
    return path, offsets


def _helper_main(conn, claims: _Claims, process: int, initializer: Callable, initargs: tuple) -> None:
    """A helper process: for each map the pool sends, run calls while there are any to claim
    and the pool's process lives (if it is killed, the helper claims no more), then say so."""
    initializer(*initargs)
    pool_pid = os.getppid()
    try:
        while (message := conn.recv()) is not None:
            number, fn, path, offsets = message
            while os.getppid() == pool_pid and (i := claims.take(process, number)) is not None:
                try:
                    with open(path, "rb") as f:  # still there: the pool waits for this call's result
                        f.seek(offsets[i])
                        arg = pickle.loads(f.read(offsets[i + 1] - offsets[i]))
                    conn.send((number, i, True, fn(arg)))
                except Exception as e:
                    conn.send((number, i, False, _portable(e)))
            conn.send((number, None, True, None))  # idle until the next map
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # Ctrl-C reaches every process of the group, and the pool raises it; or the pool is gone


def _portable(e: Exception) -> Exception:
    """``e`` as it can cross to the pool's process; an error that is not a DlpipeError (a bug)
    carries this process's traceback as a note."""
    if not isinstance(e, DlpipeError):
        e.add_note(f"in reshard worker process {os.getpid()}:\n{traceback.format_exc().rstrip()}")
    try:
        pickle.dumps(e)
        return e
    except Exception:
        plain = RuntimeError(f"{type(e).__name__}: {e}")
        plain.__notes__ = getattr(e, "__notes__", [])
        return plain


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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

    def close(self) -> None:
        """Nothing to release before ``shutdown``: Ray's workers are not this executor's."""

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
