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
    and in this process alike, each process claiming the next call from a shared counter when
    it is ready to start it. Why not a ``ProcessPoolExecutor``: a reshard has few calls (8
    shards for 2 workers is common), so a worker idle at the end while another still has a call
    queued, as a ``ProcessPoolExecutor`` queues one ahead, costs a large share of the run; and
    this process already has the source's pages mapped and its heap faulted in, where each
    fresh worker would fault them in again (and fork once more). ``workers=1`` starts no
    process.

    Results come back in call order, and so does the first error: an error of a call stops new
    claims; calls before it finish, and the error is raised when the caller reaches its result.
    """

    def __init__(self, workers: int, *, initializer: Callable, initargs: tuple = ()) -> None:
        self._initializer = initializer
        self._initargs = initargs
        ctx = pool_context()
        # the next call to claim, counted over every map of the pool: a helper still finishing
        # one map cannot claim a call of the next
        self._next = ctx.Value("q", 0)
        self._helpers: list[tuple] = []
        self._closed = False
        for _ in range(workers - 1):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_helper_main, args=(theirs, self._next, initializer, initargs),
                               name="dlpipe-reshard-worker", daemon=True)
            proc.start()
            theirs.close()
            self._helpers.append((proc, ours))

    def map(self, fn: Callable, args: Iterable) -> Iterator:
        """The results of ``fn`` over ``args``, in order; the helpers start at once, this process
        as the results are taken."""
        args = list(args)
        self._initializer(*self._initargs)  # the installed job is this pool's
        with self._next.get_lock():
            base = self._next.value
        end = base + len(args)
        calls = _write_calls(args) if self._helpers else None
        for _, conn in self._helpers:
            with contextlib.suppress(OSError):  # a helper that died is reported as the results are taken
                conn.send((base, end, fn, *calls))
        return self._results(fn, args, base, end, calls[0] if calls else None)

    def _results(self, fn: Callable, args: list, base: int, end: int, calls: str | None) -> Iterator:
        results: dict[int, tuple[bool, object]] = {}
        try:
            for k in range(base, end):
                while k not in results:
                    i = _claim(self._next, end)
                    if i is None:
                        self._collect(results, base, end, block=True)
                        continue
                    try:
                        results[i] = True, fn(args[i - base])
                    except Exception as e:  # raised in order, after the calls before it
                        results[i] = False, e
                        _stop_claims(self._next, end)
                    self._collect(results, base, end, block=False)
                ok, value = results.pop(k)
                if not ok:
                    raise value
                yield value
        finally:
            _stop_claims(self._next, end)
            if calls:  # every claimed call has reported (or the map failed): none reads it now
                with contextlib.suppress(OSError):
                    os.unlink(calls)

    def _collect(self, results: dict, base: int, end: int, *, block: bool) -> None:
        """Take the helpers' finished results (waiting for one if ``block``)."""
        if not self._helpers:
            return
        conns = [conn for _, conn in self._helpers]
        ready = connection.wait(conns + [proc.sentinel for proc, _ in self._helpers], timeout=None if block else 0)
        for proc, conn in list(self._helpers):
            gone = proc.sentinel in ready
            try:
                while conn in ready and conn.poll():
                    start, i, ok, value = conn.recv()
                    if start == base:  # a result of an earlier map, stopped by an error, is dropped
                        results[i] = ok, value
                        if not ok:
                            _stop_claims(self._next, end)
            except (EOFError, OSError):
                gone = True
            if gone:
                proc.join()
                if self._closed and proc.exitcode == 0:  # done with every map it was sent
                    self._helpers.remove((proc, conn))
                    conn.close()
                    continue
                _stop_claims(self._next, end)
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
        _stop_claims(self._next, 1 << 62)
        self.close()
        for proc, conn in self._helpers:
            if wait:
                proc.join()
            conn.close()
        self._helpers = []


def _claim(next_call, end: int) -> int | None:
    """The next call to run, or None once all calls of the map up to ``end`` are claimed."""
    with next_call.get_lock():
        i = next_call.value
        if i >= end:
            return None
        next_call.value = i + 1
        return i


def _stop_claims(next_call, end: int) -> None:
    with next_call.get_lock():
        next_call.value = max(next_call.value, end)


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


def _helper_main(conn, next_call, initializer: Callable, initargs: tuple) -> None:
    """A helper process: for each map the pool sends, run calls while there are any to claim
    and the pool's process lives (if it is killed, the helper claims no more)."""
    initializer(*initargs)
    pool_pid = os.getppid()
    try:
        while (message := conn.recv()) is not None:
            base, end, fn, path, offsets = message
            while os.getppid() == pool_pid and (i := _claim(next_call, end)) is not None:
                try:
                    with open(path, "rb") as f:  # still there: the pool waits for this call's result
                        f.seek(offsets[i - base])
                        arg = pickle.loads(f.read(offsets[i - base + 1] - offsets[i - base]))
                    conn.send((base, i, True, fn(arg)))
                except Exception as e:
                    conn.send((base, i, False, _portable(e)))
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
