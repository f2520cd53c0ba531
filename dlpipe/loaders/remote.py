"""Reading shards from object storage: byte-bounded read-ahead and a verified local cache.

- ``read_ahead`` runs the fetches of upcoming units on background threads while the caller
  decodes the current one. What a stream holds (the unit handed out plus those fetched or in
  flight) is taken from a ``ByteBudget`` before each fetch starts; a stream that holds nothing
  may always take one unit, so a unit larger than the budget is fetched alone and streams that
  share a budget (tf.data reads several files at once) never wait on each other.
- ``fetch_to_cache`` downloads a whole shard into a cache directory in ranged chunks, hashing
  as it goes, and renames it into place only when its SHA-256 matches the manifest: a cached
  file is always a complete, verified shard. Files are named by that digest, so a re-made
  dataset never reads a stale copy and other processes and later epochs reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from dlpipe.errors import FormatError
from dlpipe.local_dirs import file_lock
from dlpipe.manifest import ShardInfo
from dlpipe.storage import Location, StorageError

DEFAULT_PREFETCH_BYTES = 32 << 20
DEFAULT_REQUEST_BYTES = 4 << 20
READ_THREADS = 4
CACHE_CHUNK = 16 << 20  # bytes per ranged GET while filling the cache
_MAX_PENDING = 64

U = TypeVar("U")
T = TypeVar("T")


class ByteBudget:
    """Bytes held by read-ahead streams (fetched or in flight, not yet released); ``peak`` is the
    most held at once, ``requests`` / ``bytes_fetched`` count what went over the network."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.held = 0
        self.peak = 0
        self.requests = 0
        self.bytes_fetched = 0
        self._pid = os.getpid()
        self._lock_ = threading.Lock()

    def __getstate__(self) -> dict:  # a copy in another process starts empty
        return {"limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"])

    @property
    def _lock(self) -> threading.Lock:
        if self._pid != os.getpid():  # forked (a DataLoader worker): the parent's streams are not here
            self.__init__(self.limit)
        return self._lock_

    def take(self, nbytes: int, *, force: bool) -> bool:
        with self._lock:
            if not force and self.held + nbytes > self.limit:
                return False
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes

    def fetched(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_fetched += nbytes


def read_ahead(units: Iterator[U], fetch: Callable[[U], T], size: Callable[[U], int], budget: ByteBudget,
               *, threads: int = READ_THREADS) -> Iterator[tuple[U, T]]:
    """``(unit, fetch(unit))`` in order, fetching ahead on ``threads`` threads within ``budget``.

    A unit's bytes count from when its fetch is submitted until the caller asks for the next
    unit (so the one being decoded counts too). Closing the generator cancels what is queued.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="dlpipe-fetch")
    pending: deque = deque()
    held = 0
    upcoming = next(units, None)
    try:
        while True:
            while upcoming is not None and len(pending) < _MAX_PENDING:
                n = size(upcoming)
                if not budget.take(n, force=held == 0):
                    break
                held += n
                pending.append((upcoming, n, pool.submit(fetch, upcoming)))
                upcoming = next(units, None)
            if not pending:
                return
            unit, n, future = pending[0]
            result = future.result()
            pending.popleft()
            yield unit, result
            held -= n
            budget.give(n)
    finally:
        for _, _, future in pending:
            future.cancel()
        budget.give(held)
        pool.shutdown(wait=False, cancel_futures=True)


def cached_path(cache_dir: str, shard: ShardInfo) -> str:
    return os.path.join(cache_dir, "shards", f"{shard.sha256[:32]}-{os.path.basename(shard.path)}")


def fetch_to_cache(location: Location, shard: ShardInfo, cache_dir: str, budget: ByteBudget | None = None) -> str:
    """The local path of ``shard`` (at ``location``) in ``cache_dir``, downloading it first if it
    is not there (one process at a time per shard; the others wait and reuse it)."""
    target = cached_path(cache_dir, shard)
    if os.path.isfile(target):
        return target
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    with file_lock(target + ".lock"):
        if os.path.isfile(target):
            return target
        fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=folder)
        try:
            sha = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for start in range(0, shard.num_bytes, CACHE_CHUNK):
                    block = read_range(location, start, min(shard.num_bytes, start + CACHE_CHUNK))
                    if budget is not None:
                        budget.fetched(len(block))
                    sha.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if sha.hexdigest() != shard.sha256:
                raise FormatError(location.url, "SHA-256 of the downloaded shard differs from the manifest",
                                  hint="the shard is corrupt or was replaced; nothing was cached; rerun the reshard")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return target


def write_atomic(path: str, data: bytes) -> None:
    """A complete file at ``path`` or none: written beside it, then renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_range(location: Location, start: int | None, end: int | None) -> bytes:
    """Bytes ``[start, end)`` of a shard (the whole file when both are None), one request (more
    when it fails transiently: ``Location`` retries it, and a short answer is never returned). A
    missing object or a failed request is a one-line FormatError naming the URL; a request that
    failed transiently on every attempt, ``Location``'s StorageError (it names the URL too)."""
    try:
        return location.read_bytes(start, end)
    except StorageError:
        raise
    except FileNotFoundError:
        raise FormatError(location.url, "shard listed in the manifest is missing",
                          hint="check the URL, or rerun the reshard") from None
    except OSError as e:
        what = "the shard" if start is None else f"bytes {start}-{end}"
        raise FormatError(location.url, f"cannot read {what} ({e.strerror or e})", offset=start,
                          hint="check the connection and --storage-option credentials") from None
