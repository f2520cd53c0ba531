"""Batches from DataLoader workers through a ring of reused shared-memory buffers.

PyTorch's DataLoader sends what a worker yields through a pipe: numpy arrays are pickled (the
main process unpickles, a copy of every byte), tensors each get a new shared-memory segment
(created, mapped and passed as a file descriptor per tensor, per batch). Either way the main
process, which must stay free for the training step, pays per byte or per segment.

Here each worker owns a ring of up to ``MAX_SLOTS`` POSIX shared-memory buffers and one shared
array of flags. A batch is copied into a free slot and sent as a ``SlotBatch``: the slot's number
and where each array lies in it (key, offset, bytes, shape, dtype), a few hundred bytes. The main
process (``Receiver``) makes the batch's tensors as views of the slot, O(1) work per batch
whatever its size. A slot the main process has not seen yet is opened by its name
(``dlpipe-<main pid>-<worker pid>-<n>``), never by asking the worker for a file descriptor, so a
stopped or dying worker cannot block the main process outside the DataLoader's ``timeout``.

**A slot is reused only when nothing refers to its batch any more.** The views hang off one
``_Lease`` object per batch (numpy's base of every array, which the tensors keep alive); when
the last tensor, view or storage of the batch is gone, the lease's finalizer marks the slot
free and the worker may write it again. A user who keeps batches (a list of them, a view of
one) keeps their slots; when every slot is taken the worker sends the batch the old way
(pickled), so nothing waits and nothing is overwritten.

**Nothing is left in /dev/shm.** The main process unlinks each name as soon as it has opened it
(the memory lives while a process maps it); a worker that dies between creating a slot and the
main process opening it leaves a name, which the main process removes when it finds the worker
gone (``Receiver.keep_only``, run at every new iteration and after a worker failure) and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import mmap
import multiprocessing.util
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlpipe._deps import require

torch = require("torch", "dlpipe's PyTorch loader")

try:
    import _posixshmem
except ImportError:  # not POSIX: batches go through the pipe
    _posixshmem = None

MAX_SLOTS = 24  # per worker: the batches in flight (prefetch_factor bundles) plus those the user holds
ALIGN = 64
MIN_SLOT_BYTES = 1 << 16
SHM_DIR = "/dev/shm"


def _name(owner: int, worker: int, n: int) -> str:
    return f"/dlpipe-{owner}-{worker}-{n}"


def _create(name: str, size: int) -> mmap.mmap:
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _open(name: str) -> mmap.mmap:
    fd = _posixshmem.shm_open(name, os.O_RDWR, 0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
        _posixshmem.shm_unlink(name)  # mapped now: the memory lives as long as a mapping does


def _open_new(new: tuple[str, str | None]) -> tuple[mmap.mmap, mmap.mmap | None]:
    name, flags = new
    return _open(name), None if flags is None else _open(flags)


def remove_names(owner: int, *, only_dead: bool = True, worker: int | None = None) -> None:
    """Unlink slot names of ``owner``'s workers still in /dev/shm: created by a worker that
    died before the main process opened them (``only_dead``), all of them (the main process at
    exit), or one ``worker``'s (that worker at exit)."""
    for path in glob.glob(os.path.join(SHM_DIR, f"dlpipe-{owner}-{'*' if worker is None else worker}-*")):
        pid = int(os.path.basename(path).split("-")[2])
        if worker is None and only_dead and _alive(pid):
            continue
        with contextlib.suppress(OSError):
            _posixshmem.shm_unlink("/" + os.path.basename(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class SlotBatch:
    """A worker's batch in slot ``slot`` of its ring (``ring``: the worker's pid); ``layout``:
    (key, offset, bytes, shape, dtype) per array; ``new``: the slot's buffer (and, the first time, the
    ring's flags) when the main process has not seen this buffer yet."""

    ring: int
    slot: int
    generation: int
    layout: tuple[tuple[str, int, int, tuple[int, ...], str], ...]
    new: tuple[str, str | None] | None = None
    opened: tuple[mmap.mmap, mmap.mmap | None] | None = None  # the main process's mappings of ``new``

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "opened": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled in the main process as the message arrives, possibly long before the batch
        # is handed out (the DataLoader keeps order): open the names now, while the worker that
        # made them surely runs (it exits only after all it sent has been read)
        self.__dict__.update(state)
        if self.new is not None:
            self.opened = _open_new(self.new)


class _Ring:
    """A worker's slots and the flags (one shared page) the main process sets to free them."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.owner = os.getppid()
        self.count = 0  # names made so far
        self.flags_name = self._next_name()
        self.flags_map = _create(self.flags_name, MAX_SLOTS * 4)
        self.free = np.frombuffer(self.flags_map, np.int32)
        self.free[:] = 1  # 1: free
        self.slots: list[list[Any]] = []  # [name, mmap, uint8 view, generation, not yet sent]
        self.flags_sent = False
        # names never opened (batches still queued when the iteration was shut down) go when the
        # worker exits; multiprocessing runs these finalizers in its children, atexit does not
        multiprocessing.util.Finalize(self, remove_names, args=(self.owner,), kwargs={"worker": self.pid},
                                      exitpriority=0)

    def _next_name(self) -> str:
        self.count += 1
        return _name(self.owner, self.pid, self.count)

    def put(self, batch: dict[str, np.ndarray]) -> SlotBatch | None:
        layout, at = [], 0
        for key, value in batch.items():
            if not isinstance(value, np.ndarray) or value.dtype.hasobject:
                return None
            layout.append((key, at, value.nbytes, value.shape, value.dtype.str))
            at += -(-value.nbytes // ALIGN) * ALIGN
        slot = self._slot(at)
        if slot is None:
            return None
        name, _, buf, generation, fresh = self.slots[slot]
        for (_, offset, nbytes, _, _), value in zip(layout, batch.values()):
            np.copyto(buf[offset : offset + nbytes].view(value.dtype).reshape(value.shape), value, casting="no")
        new = None
        if fresh:
            new = (name, None if self.flags_sent else self.flags_name)
            self.flags_sent = True
            self.slots[slot][4] = False
        return SlotBatch(self.pid, slot, generation, tuple(layout), new)

    def _slot(self, nbytes: int) -> int | None:
        """A free slot of at least ``nbytes`` (a free one grown, or a new one), marked in use."""
        free = [i for i in range(len(self.slots)) if self.free[i]]
        fits = [i for i in free if self.slots[i][2].nbytes >= nbytes]
        if fits:
            i = fits[0]
        elif len(self.slots) < MAX_SLOTS or free:
            i = len(self.slots) if len(self.slots) < MAX_SLOTS else free[0]
            size = max(MIN_SLOT_BYTES, -(-int(nbytes * 1.25) // ALIGN) * ALIGN)
            name = self._next_name()
            mapped = _create(name, size)
            generation = self.slots[i][3] + 1 if i < len(self.slots) else 0
            entry = [name, mapped, np.frombuffer(mapped, np.uint8), generation, True]
            if i < len(self.slots):
                self.slots[i] = entry  # the old mapping goes when the main process lets go too
            else:
                self.slots.append(entry)
        else:
            return None
        self.free[i] = 0
        return i


_RING: _Ring | None = None


def to_slot(batch: dict[str, np.ndarray]) -> SlotBatch | None:
    """``batch`` copied into this worker's ring, or None when it cannot go that way."""
    global _RING
    if _posixshmem is None or MAX_SLOTS < 1:
        return None
    if _RING is None or _RING.pid != os.getpid():
        _RING = _Ring()
    return _RING.put(batch)


class _Lease:
    """The owner of one batch's arrays: numpy's base of each, so its finalizer runs when the
    last tensor of the batch is gone, and frees the slot."""

    def __init__(self, buf: np.ndarray, free: np.ndarray, slot: int) -> None:
        self.__array_interface__ = {"data": (buf.ctypes.data, False), "shape": (buf.nbytes,), "typestr": "|u1",
                                    "version": 3}
        self._buf = buf  # the mapping lives as long as any batch in it
        weakref.finalize(self, _release, free, slot)


def _release(free: np.ndarray, slot: int) -> None:
    free[slot] = 1


class Receiver:
    """The main process's side: the rings of the loader's workers, and batches as tensors."""

    def __init__(self) -> None:
        self.rings: dict[int, dict[str, Any]] = {}
        self.pid = os.getpid()
        _RECEIVERS.add(self)

    def keep_only(self, pids: set[int]) -> None:
        """Forget the rings of workers that are gone (their memory goes with the last batch) and
        unlink names they created but did not get to send."""
        for pid in [p for p in self.rings if p not in pids]:
            del self.rings[pid]
        if _posixshmem is not None and os.getpid() == self.pid:
            remove_names(self.pid)

    def take(self, msg: SlotBatch, pin: bool = False) -> dict[str, Any]:
        ring = self.rings.setdefault(msg.ring, {"slots": {}})
        if msg.new is not None:
            mapped, flags = msg.opened if msg.opened is not None else _open_new(msg.new)
            msg.opened = None
            if flags is not None:
                ring["flags"], ring["free"] = flags, np.frombuffer(flags, np.int32)
            ring["slots"][msg.slot] = (msg.generation, mapped, np.frombuffer(mapped, np.uint8))
        generation, _, buf = ring["slots"][msg.slot]
        if generation != msg.generation:
            raise RuntimeError(f"worker {msg.ring} sent slot {msg.slot} generation {msg.generation}, "
                               f"held {generation}")
        whole = np.asarray(_Lease(buf, ring["free"], msg.slot))
        out = {}
        for key, offset, nbytes, shape, dtype in msg.layout:
            t = torch.from_numpy(whole[offset : offset + nbytes].view(dtype).reshape(shape))
            out[key] = t.pin_memory() if pin else t
        return out


_RECEIVERS: weakref.WeakSet[Receiver] = weakref.WeakSet()


@atexit.register
def _remove_all() -> None:
    if _posixshmem is not None and _RECEIVERS:
        remove_names(os.getpid(), only_dead=False)
