"""One reshard at a time per output: the lock a run holds from before its scan to its end.

Locally the lock is an ``flock`` on ``DIR/.dlpipe.lock`` (the kernel drops it when the holder
dies, even by ``kill -9``); object stores have no locks, so there it is an object with a
heartbeat, taken over once stale (see ``OutputDir``'s docstring for the limits).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from dlpipe.errors import OutputError, OutputLockedError
from dlpipe.storage import Location

LOCK_FILE = ".dlpipe.lock"  # a local output's lock file
# an object store's lock object: one level down, so that a listing of the output's files (what a
# reader or a check of a failed run sees) never shows it
REMOTE_LOCK = ".dlpipe-lock/owner.json"
HEARTBEAT_S = 30.0  # how often a run refreshes its lock object in object storage
STALE_S = 300.0  # a lock object this long without a heartbeat belonged to a run that stopped

class RunLock:
    """A held output lock; ``release()`` gives it up (idempotent)."""

    def release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _describe_holder(holder: Mapping[str, Any]) -> str:
    if not holder.get("pid"):
        return "by a process that has not said who it is yet"
    text = f"by pid {holder['pid']} on {holder.get('host', '?')}"
    started = holder.get("started")
    if isinstance(started, (int, float)):
        text += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
    return text


_HELD_FDS: set[int] = set()  # lock files this process holds open


def _drop_inherited_locks() -> None:
    # a forked child (a pool worker) shares the lock's open file: closing its copy keeps the
    # lock's life that of the run's process, so a killed run's lock goes with it at once
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class LocalRunLock(RunLock):
    """``flock`` on ``DIR/.dlpipe.lock``, which records the holder. Released by ``release()`` or
    by the kernel when the process dies. Where ``flock`` is missing (Windows) or the filesystem
    refuses it, the run goes on unlocked (with a warning in the second case); where the output
    cannot be created, ``prepare`` reports that as before."""

    def __init__(self, out: Any) -> None:  # an output_dir.OutputDir
        self.out = out
        self.directory = out.location.url
        self.path = os.path.join(self.directory, LOCK_FILE)
        self._fd: int | None = None
        self._pid = os.getpid()
        self._made_dir = False
        try:
            import fcntl
        except ImportError:
            return
        for _ in range(20):
            if not os.path.isdir(self.directory):
                try:
                    os.makedirs(self.directory)
                    self._made_dir = True
                except FileExistsError:
                    pass
                except OSError:
                    return
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory went away (a run that made it ended): again
                continue
            except OSError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder_fd(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"{out}: another reshard is writing there (held {_describe_holder(holder)}); "
                    "wait for it to finish, or choose another --output",
                    holder,
                ) from None
            except OSError as e:
                os.close(fd)
                warnings.warn(f"{out}: cannot lock {LOCK_FILE} ({e.strerror or e}); nothing stops a "
                              "second reshard into this output while this one runs", stacklevel=3)
                return
            # its last holder removes the file before unlocking it: then ours is a dead file
            try:
                st, now = os.fstat(fd), os.stat(self.path)
                current = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record_bytes(_holder_record()), 0)
            self._fd = fd
            _HELD_FDS.add(fd)
            return
        raise OutputError(f"{out}: cannot take the lock {self.path} (it keeps changing); rerun")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:
            return
        _HELD_FDS.discard(fd)
        with contextlib.suppress(OSError):
            os.remove(self.path)  # still locked: a run that opened it meanwhile sees it is dead
        os.close(fd)
        if self._made_dir:  # a run that wrote nothing leaves no directory behind
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)


def _read_holder_fd(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RemoteRunLock(RunLock):
    """A lock object ``PREFIX/.dlpipe-lock/owner.json`` (see the module docstring): taken when absent,
    stale, or left by a dead process of this host; refreshed by a daemon thread; deleted by
    ``release()``."""

    def __init__(self, out: Any) -> None:  # an output_dir.OutputDir
        self.out = out
        self.location = out.location.join(*REMOTE_LOCK.split("/"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.token = uuid.uuid4().hex
        try:
            holder = self._read()
            if holder and not self._stale(holder):
                raise OutputLockedError(self._message(holder), holder)
            self.record = {**_holder_record(), "token": self.token}
            self.record["heartbeat"] = self.record["started"]
            self.location.write_bytes(_record_bytes(self.record))
            now = self._read()
        except OSError as e:
            raise OutputError(f"{out}: cannot write there ({e.strerror or type(e).__name__}); check the "
                              "location (and its credentials), or choose another --output") from None
        if now.get("token") != self.token:  # another run wrote its lock at the same time
            raise OutputLockedError(self._message(now), now)
        self._thread = threading.Thread(target=self._beat, name="dlpipe-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.location.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:  # not ours to judge: treat as held, until stale by its mtime
            return {"heartbeat": _mtime(self.location)}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _stale(holder: Mapping[str, Any]) -> bool:
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)) or time.time() - beat > STALE_S:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        return False

    def _message(self, holder: Mapping[str, Any]) -> str:
        beat = holder.get("heartbeat")
        ago = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
        return (f"{self.out}: another reshard is writing there (held {_describe_holder(holder)}{ago}); wait "
                f"for it to finish, or choose another --output (a run that stopped loses the lock "
                f"{STALE_S:.0f} s after its last heartbeat; deleting {self.location} frees it now)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError, ValueError):
                if self._read().get("token") != self.token:
                    return  # taken over (this run stalled past STALE_S): leave it to the new one
                self.record["heartbeat"] = time.time()
                self.location.write_bytes(_record_bytes(self.record))

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with contextlib.suppress(OSError, ValueError):
            if self._read().get("token") == self.token:
                self.location.remove()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, someone else's
        return True
    return True


def _mtime(loc: Location) -> float | None:
    with contextlib.suppress(Exception):
        info = loc.fs.info(loc.fs_path)
        stamp = info.get("LastModified") or info.get("mtime")
        return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    return None


def _record_bytes(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()
