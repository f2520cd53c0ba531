"""The workers' shared-memory rings (``dlpipe.loaders.torch_shm``): batches arrive through them,
slots are reused only when nothing refers to their batch, a full ring falls back to the pipe,
and a batch outlives its worker."""

from __future__ import annotations

import gc
import glob
import os

import numpy as np
import pytest

import dlpipe

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from dlpipe.loaders import torch_shm  # noqa: E402
from dlpipe.loaders.torch_shm import Receiver, SlotBatch, to_slot  # noqa: E402

N = 700


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    src = tmp_path_factory.mktemp("shm-src")
    rng = np.random.default_rng(1)
    ids = np.zeros((N, 40), np.int32)
    for i, k in enumerate(rng.integers(1, 40, N)):
        ids[i, :k] = rng.integers(1, 300, k)
    np.save(src / "input_ids.npy", ids)
    np.save(src / "rid.npy", np.arange(N, dtype=np.int64))
    out = tmp_path_factory.mktemp("shm")
    dlpipe.reshard([src / "input_ids.npy", src / "rid.npy"], out, pad_id=0, num_shards=3, workers=1, overwrite=True,
                   progress=False)
    return str(out)


def loader(root, workers=2, **kw):
    return dlpipe.load_dataset(root).to_torch_dataloader(batch_size=8, shuffle=True, seed=4, num_workers=workers, **kw)


def plain(batches):
    return [{k: v.clone() for k, v in b.items()} for b in batches]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_batches_come_through_the_rings_and_slots_are_reused(root, monkeypatch):
    seen = []
    take = Receiver.take
    monkeypatch.setattr(Receiver, "take", lambda self, msg, pin=False: seen.append(msg) or take(self, msg, pin))
    dl = loader(root)
    got = [b["rid"].tolist() for b in dl]
    assert len(seen) == len(got) == -(-N // 8)
    # per worker: prefetch_factor (2) bundles in flight, one being filled, the user's batch;
    # then the slots are reused
    assert dl.dataset.bundle > 1
    assert sum(m.new is not None for m in seen) <= 2 * (3 * dl.dataset.bundle + 1)
    assert sorted(r for b in got for r in b) == list(range(N))


def test_a_held_batch_is_never_overwritten_and_a_full_ring_falls_back(root):
    reference = plain(loader(root, workers=0))
    held = list(loader(root))  # every batch kept: more than MAX_SLOTS per worker
    assert len(held) > 2 * torch_shm.MAX_SLOTS
    assert same(held, reference)
    views = [b["input_ids"][1:3] for b in loader(root)]  # only views kept: the slots stay taken
    assert all(torch.equal(v, r["input_ids"][1:3]) for v, r in zip(views, reference))


def test_a_batch_outlives_its_worker(root):
    reference = plain(loader(root, workers=0))
    dl = loader(root)
    it = iter(dl)
    first = next(it)
    pids = it.worker_pids
    del it
    gc.collect()
    for pid in pids:  # the workers have exited; the batch's memory stays mapped here
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert same([first], reference[:1])


def test_ring_in_one_process():
    receiver = Receiver()
    msgs = [to_slot({"a": np.arange(k * 1000), "m": np.ones((3, k), bool)}) for k in (1, 2)]
    assert all(isinstance(m, SlotBatch) for m in msgs)
    batches = [receiver.take(m) for m in msgs]
    assert batches[1]["a"][-1].item() == 1999 and batches[1]["m"].shape == (3, 2)
    slot = msgs[0].slot
    assert torch_shm._RING.free[slot] == 0
    del batches[0]
    gc.collect()
    assert torch_shm._RING.free[slot] == 1  # freed with its last tensor
    assert to_slot({"o": np.array([object()])}) is None  # not for object arrays


def shm_names(owner, worker="*"):
    return [os.path.basename(p) for p in glob.glob(os.path.join(torch_shm.SHM_DIR, f"dlpipe-{owner}-{worker}-*"))]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm")
def test_nothing_is_left_in_dev_shm(root):
    import signal
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    torch_shm._create(f"/dlpipe-{os.getpid()}-{dead}-1", 4096).close()  # as a worker killed before sending it
    assert shm_names(os.getpid(), dead)
    dl = loader(root)
    it = iter(dl)  # a new iteration removes names of workers that are gone
    assert not shm_names(os.getpid(), dead)
    next(it)
    killed, other = it.worker_pids
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(dlpipe.LoaderWorkerError):
        list(it)
    del it
    assert not shm_names(os.getpid(), killed) and not shm_names(os.getpid(), other)
    it = iter(dl)  # the next epoch, on new workers, left after one batch
    next(it)
    pids = it.worker_pids
    del it
    gc.collect()
    for pid in pids:  # a worker exiting unlinks what it made and the main process did not open
        assert not shm_names(os.getpid(), pid)
