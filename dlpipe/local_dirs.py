"""Local directories dlpipe works in: the download cache of remote objects, the staging area of
files on their way to object storage, and the lock that lets one process on a machine fetch a
file while the others wait."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock between processes on this machine (one download of a file)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks: processes may download the same file twice
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # gone before it is unlocked: a later process finds the target, or (after a failed
            # download) locks a new file and tries again; a waiter on this one then may too
            with contextlib.suppress(OSError):
                os.remove(path)
            fcntl.flock(f, fcntl.LOCK_UN)


def default_cache_dir() -> str:
    return os.environ.get("DLPIPE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dlpipe")


@contextlib.contextmanager
def staging_dir() -> Iterator[str]:
    """A private local directory for files on their way to object storage (``$DLPIPE_STAGING_DIR``
    or the system temp directory)."""
    base = os.environ.get("DLPIPE_STAGING_DIR")
    if base:
        os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="dlpipe-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
