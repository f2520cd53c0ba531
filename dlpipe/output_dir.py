"""The output directory's life cycle: fresh, resumed, already complete, or refused.

While a reshard runs, ``DIR/.dlpipe/plan.json`` holds the plan's hash and ``DIR/.dlpipe/done/``
one note per finished shard. A shard reaches its final name only when it is complete: locally
it is written under a hidden ``.NAME.tmp`` name, synced and renamed; in object storage it is
written to a local staging file and uploaded, and an object appears under its key only when its
upload completes. The index goes first and the data last, then the done note. A rerun with the
same plan reuses finished shards; the manifest, written last, is the commit point: readers
treat a directory without it as no dataset.

**One run at a time.** A reshard holds a lock on its output from before its scan to its end, so
a second run into the same output (which would delete the first one's temporary files, or with
--overwrite its shards) is refused with ``OutputLockedError`` naming the holder. Locally the lock
is an ``flock`` on ``DIR/.dlpipe.lock``: the kernel drops it when the holding process dies, even
by ``kill -9``, so a crashed run never leaves it stuck (the file may stay, unlocked and
harmless); on NFS it works across machines as far as the server's locking does. Object stores
have no locks: there the lock is an object, ``PREFIX/.dlpipe-lock/owner.json``, holding the
owner's host, pid and a heartbeat the run rewrites every ``HEARTBEAT_S``; another run refuses
while that heartbeat is younger than ``STALE_S`` (or while its holder is a live process on this
host) and otherwise takes over. It is best effort: two runs started within the same second can
both get it, and it trusts the clocks of the machines to agree to well under ``STALE_S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from dlpipe.errors import OutputError
from dlpipe.manifest import MANIFEST, ShardInfo
from dlpipe.storage import Location, staging_dir

STATE_DIR = ".dlpipe"
LOCK_FILE = ".dlpipe.lock"  # a local output's lock file
# an object store's lock object: one level down, so that a listing of the output's files (what a
# reader or a check of a failed run sees) never shows it
REMOTE_LOCK = ".dlpipe-lock/owner.json"
_LOCK_NAMES = (LOCK_FILE, REMOTE_LOCK.split("/")[0])
HEARTBEAT_S = 30.0  # how often a run refreshes its lock object in object storage
STALE_S = 300.0  # a lock object this long without a heartbeat belonged to a run that stopped
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{5}-of-\d{5}\.(tfrecord|tar)(\.gz|\.zz)?(\.index)?$")


class OutputLockedError(OutputError):
    """Another reshard is writing to the same output; ``holder`` is what it recorded about
    itself (host, pid, start time; {} when unknown)."""

    def __init__(self, message: str, holder: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})


class OutputDir:
    """Where a reshard writes: a local directory or an fsspec URL prefix. Picklable."""

    def __init__(self, output: str | os.PathLike[str] | Location,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.location = output if isinstance(output, Location) else Location(output, storage_options)

    def __str__(self) -> str:
        return self.location.url

    @property
    def remote(self) -> bool:
        return self.location.remote

    def _state(self, *names: str) -> Location:
        return self.location.join(STATE_DIR, *names)

    # -- before the run ------------------------------------------------------------------------

    def lock(self) -> RunLock:
        """Hold this output for the calling run until ``release()``; raises OutputLockedError
        while another run holds it (see the module docstring)."""
        return RemoteRunLock(self) if self.remote else LocalRunLock(self)

    def prepare(self, plan_hash: str, overwrite: bool) -> dict[str, ShardInfo] | None:
        """Make the output ready; return finished shards to reuse, or None if all is done already."""
        out = self.location
        try:
            return self._prepare(plan_hash, overwrite)
        except OSError as e:
            raise OutputError(f"{out}: cannot write there ({e.strerror or type(e).__name__}); check the "
                              "location (and its credentials, for a URL), or choose another --output") from None

    def _prepare(self, plan_hash: str, overwrite: bool) -> dict[str, ShardInfo] | None:
        out = self.location
        if out.isfile():
            raise OutputError(f"{out}: exists and is not a directory; choose another --output")
        manifest, state = out.join(MANIFEST), self._state("plan.json")
        if manifest.isfile():
            same = _read_json(manifest, ("dlpipe", "plan", "hash")) == plan_hash
            if same and not overwrite:
                return None
            if not overwrite:
                raise OutputError(f"{out}: already holds a dataset made from other inputs or options; pass "
                                  "--overwrite to replace it, or choose another --output")
            self._clean()
        elif state.isfile():
            if _read_json(state, ("hash",)) != plan_hash:
                if not overwrite:
                    raise OutputError(f"{out}: holds an unfinished reshard with other inputs or options; pass "
                                      "--overwrite to replace it, or choose another --output")
                self._clean()
        elif [f for f in out.listdir() if f not in _LOCK_NAMES]:
            if not overwrite:
                raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace dlpipe shards "
                                  "there, or choose another --output")
            self._clean()
            others = [f for f in out.listdir() if not _SHARD_FILE.match(f) and f not in _LOCK_NAMES]
            if others:
                raise OutputError(f"{out}: holds files dlpipe did not write ({', '.join(sorted(others)[:3])}...); "
                                  "choose an empty --output")
        self._state("done").makedirs()
        self.remove_temporaries()
        if not state.isfile():
            state.write_bytes(_json_bytes({"hash": plan_hash}))
        return self._finished_shards()

    def _finished_shards(self) -> dict[str, ShardInfo]:
        """Shards with a done note whose data and index are in place at the noted size."""
        sizes = self.location.file_sizes()
        done = {}
        notes = self._state("done")
        for name in notes.listdir():
            try:
                info = ShardInfo(**json.loads(notes.join(name).read_bytes()))
            except (OSError, ValueError, TypeError):
                continue
            if sizes.get(info.path) == info.num_bytes and info.path + ".index" in sizes:
                done[info.path] = info
        return done

    def _clean(self) -> None:
        # the manifest goes first: from then on no reader takes the directory for a dataset
        out = self.location
        out.join(MANIFEST).remove()
        for name in out.listdir():
            if _SHARD_FILE.match(name) or (name.startswith(".") and name.endswith(".tmp")):
                out.join(name).remove()
        self._state().remove_tree()

    # -- during the run ------------------------------------------------------------------------

    @contextlib.contextmanager
    def shard_files(self, name: str) -> Iterator[tuple[Any, Any]]:
        """(data file, index text file) for shard ``name``; on a clean exit both are made durable
        and moved to their final names, index first; on an error neither appears."""
        if self.remote:
            with staging_dir() as tmpdir:
                data_tmp, index_tmp = os.path.join(tmpdir, name), os.path.join(tmpdir, name + ".index")
                with open(data_tmp, "wb") as data, open(index_tmp, "w") as index:
                    yield data, index
                self.location.join(name + ".index").put_file(index_tmp)
                self.location.join(name).put_file(data_tmp)
            return
        final = os.path.join(self.location.url, name)
        data_tmp, index_tmp = os.path.join(self.location.url, f".{name}.tmp"), os.path.join(self.location.url, f".{name}.index.tmp")
        try:
            with open(data_tmp, "wb") as data, open(index_tmp, "w") as index:
                yield data, index
                data.flush()
                os.fsync(data.fileno())
            os.replace(index_tmp, final + ".index")
            os.replace(data_tmp, final)
        except BaseException:
            for p in (data_tmp, index_tmp):
                with contextlib.suppress(OSError):
                    os.remove(p)
            raise

    def mark_done(self, info: ShardInfo) -> None:
        self._state("done", info.path + ".json").write_bytes(_json_bytes(info.to_json()))

    # -- after the run -------------------------------------------------------------------------

    def commit(self, manifest: dict) -> None:
        """Write the manifest (the commit point), then drop the run's state."""
        self.location.join(MANIFEST).write_bytes(_json_bytes(manifest))
        self._state().remove_tree()

    def remove_temporaries(self) -> None:
        if self.remote:  # nothing temporary lives in object storage
            return
        out = self.location.url
        if not os.path.isdir(out):
            return
        for name in os.listdir(out):
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out, name))


# -- the run lock --------------------------------------------------------------------------------


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

    def __init__(self, out: OutputDir) -> None:
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
            os.pwrite(fd, _json_bytes(_holder_record()), 0)
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

    def __init__(self, out: OutputDir) -> None:
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
            self.location.write_bytes(_json_bytes(self.record))
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
                self.location.write_bytes(_json_bytes(self.record))

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


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _read_json(loc: Location, keys: tuple[str, ...]):
    try:
        value = json.loads(loc.read_bytes())
        for k in keys:
            value = value[k]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None
