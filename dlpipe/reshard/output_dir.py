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
from collections.abc import Iterator, Mapping
from typing import Any

from dlpipe.errors import OutputError
from dlpipe.local_dirs import staging_dir
from dlpipe.manifest import MANIFEST, ShardInfo
from dlpipe.reshard.output_lock import LOCK_FILE, REMOTE_LOCK, LocalRunLock, RemoteRunLock, RunLock
from dlpipe.storage import Location

STATE_DIR = ".dlpipe"
_LOCK_NAMES = (LOCK_FILE, REMOTE_LOCK.split("/")[0])
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{5}-of-\d{5}\.(tfrecord|tar)(\.gz|\.zz)?(\.index)?$")


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
