"""``dlpipe reshard --engine ray``: the engine's tasks as Ray tasks.

The local engine hands pure task functions (scan a record range, write one shard) to a process
pool. ``RayExecutor`` offers the same two calls the engine uses (``map`` in order, ``shutdown``)
over Ray: the job (source, padding, output location) goes into the object store once, every
call becomes one Ray task, and the results come back in submission order, so the plan, the
shard bytes and the manifest are the same as with the local engine.

Failures: a task whose worker process dies (killed, out of memory, node lost) is retried up to
``max_retries`` times by Ray; a shard is a pure function of the plan and only reaches its final
name when complete, so a retry writes the same bytes. A DlpipeError raised by a task (bad
input, unwritable output) is not retried and reaches the caller as the same exception.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator

from dlpipe._deps import require
from dlpipe.errors import ConfigError, DlpipeError

_STARTED_HERE = False


def connect(address: str | None = None) -> int:
    """Join the Ray cluster at ``address`` (default: the running one, else start a local one);
    return its CPU count."""
    global _STARTED_HERE
    ray = require("ray", "--engine ray")
    if not ray.is_initialized():
        env_address = os.environ.get("RAY_ADDRESS")
        _check_reachable(address or env_address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="warning", configure_logging=True,
                     # workers inherit this process's environment (credentials, DLPIPE_* settings)
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                               if k.startswith(("AWS_", "DLPIPE_", "GOOGLE_"))}})
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = address or env_address or "a new local instance"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--ray-address {where}: cannot connect to Ray ({first}); start the cluster "
                              "(ray start --head) or pass its address, e.g. --ray-address ray://HOST:10001") from None
        _STARTED_HERE = address is None and env_address is None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on an address nothing listens at (Ray itself keeps retrying for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
                          "(ray start --head) or pass its address, e.g. --ray-address ray://HOST:10001") from None


def _run_task(job, fn: Callable, arg):
    from dlpipe import engine

    if engine._JOB is not job:
        engine._init_worker(job)
    return fn(arg)


class RayExecutor:
    """``map``/``shutdown`` like ``concurrent.futures.Executor``, on Ray tasks."""

    def __init__(self, job, *, address: str | None = None, max_retries: int = 3) -> None:
        self._ray = require("ray", "--engine ray")
        connect(address)
        self._job = self._ray.put(job)
        self._task = self._ray.remote(max_retries=max_retries, retry_exceptions=False)(_run_task)
        self._pending: list = []

    def map(self, fn: Callable, args: Iterable) -> Iterator:
        refs = [self._task.remote(self._job, fn, a) for a in args]
        self._pending.extend(refs)
        return self._results(refs)

    def _results(self, refs: list) -> Iterator:
        ray = self._ray
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, DlpipeError):
                    raise cause from None
                raise
            finally:
                if ref in self._pending:
                    self._pending.remove(ref)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        ray = self._ray
        if cancel_futures:
            for ref in self._pending:
                ray.cancel(ref, force=True)
        elif wait and self._pending:
            ray.wait(self._pending, num_returns=len(self._pending))
        self._pending.clear()
        if _STARTED_HERE:  # a local instance this run started; a user's cluster is left alone
            _shutdown(ray)


def _shutdown(ray) -> None:
    global _STARTED_HERE
    ray.shutdown()
    _STARTED_HERE = False
