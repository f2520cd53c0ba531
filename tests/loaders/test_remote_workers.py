"""PyTorch loader workers over object storage (a real moto S3 server on 127.0.0.1, through a
counting proxy): windows go to workers in runs of neighbouring windows (``common.worker_windows``),
so each worker fetches them with few range requests; every record is still read exactly once
per epoch across ranks and workers, batches match local disk under the same plan, and a
checkpoint resumes exactly (same topology) or elastically (another one)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from resume_helper import run_save_load_state
from token_rows import numbered_shards, padded_tokens

import dlpipe
from dlpipe.loaders.common import MIN_RUNS, epoch_windows, run_windows, worker_windows

N = 600
KW = {"batch_size": 4, "seed": 7}


def test_runs_deal_every_window_once():
    sizes = [150, 7, 0, 443]
    for run_records in (None, 1, 40, 10_000):
        windows = epoch_windows(sizes, batch_size=4, window_batches=2, shuffle=True, seed=3,
                                block_records=run_records, run_records=run_records)
        run = run_windows(run_records, 8, len(windows))
        assert run == (1 if run_records in (None, 1) else min(run_records // 8, len(windows) // MIN_RUNS))
        for workers in (1, 2, 3, 5):
            dealt = [worker_windows(windows, workers, k) for k in range(workers)]
            assert sorted(w.index for ws in dealt for w in ws) == list(range(len(windows)))
            if run == 1:  # one window per run: plain round robin, as before runs
                assert dealt == [windows[k::workers] for k in range(workers)]
            for k, ws in enumerate(dealt):  # whole runs of consecutive windows, every workers-th run
                assert all(w.index // run % workers == k for w in ws)
    assert run_windows(10_000, 8, 5 * MIN_RUNS) == 5  # at most 1/MIN_RUNS of the windows
    assert run_windows(7, 8, 1000) == 1  # a block smaller than a window: one window per run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from s3_server import running

    with running(tmp_path_factory.mktemp("s3")) as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy(server):
    from fault_proxy import FaultProxy

    p = FaultProxy(server.port)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def dataset(server, tmp_path_factory):
    """(local dir, s3 URL): 4 uncompressed TFRecord shards of N records with a record id."""
    root = numbered_shards(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("tfrecord"), N, "rid")
    return root, server.upload(root, "s3://dlpipe/workers")


def remote(server, url, proxy=None):
    """The S3 dataset shuffled in windows of 8 records (blocks over object storage are >= 1 MiB:
    here a whole shard, so a block holds many windows and the runs are long)."""
    so = server.storage_options if proxy is None else {**server.storage_options, "endpoint_url": proxy.endpoint}
    return dlpipe.load_dataset(url, storage_options=so).shuffle(seed=KW["seed"], buffer_size=8)


def rids(loader) -> list[list[int]]:
    return [b["rid"].tolist() for b in loader]


@pytest.mark.torch
def test_two_workers_read_each_record_once_in_few_requests(server, proxy, dataset):
    pytest.importorskip("torch")
    local, url = dataset
    shards = [f"/{url.removeprefix('s3://')}/{s.path}" for s in dlpipe.load_dataset(local).info.shards]

    def shard_gets() -> int:
        return sum(1 for method, path, _ in proxy.log if method == "GET" and path in shards)

    counts = {}
    for workers in (0, 2):
        ds = remote(server, url, proxy)
        dl = ds.to_torch_dataloader(**KW, num_workers=workers)
        before = shard_gets()
        got = rids(dl)
        counts[workers] = shard_gets() - before
        assert collections.Counter(r for b in got for r in b) == collections.Counter(range(N))
        # the same plan from local disk (the same blocks) gives the same batches in the same order
        same = dlpipe.load_dataset(local).shuffle(seed=KW["seed"], buffer_size=8, block_records=ds.block_records)
        assert got == rids(same.to_torch_dataloader(**KW, num_workers=workers))
    windows = dl.dataset.windows()
    runs = len({w.run for w in windows})
    run = run_windows(ds.block_records, 8, len(windows))
    assert run > 1 and runs == -(-len(windows) // run)
    # a worker reads a run's windows (neighbours in one shard) with one request, up to two more
    # where a window crosses into another shard; one request per window would be len(windows)
    assert counts[2] <= runs + 2 * len(shards) < len(windows)
    assert counts[0] <= 2 * len(shards)


@pytest.mark.torch
def test_resume_with_two_workers_is_exact(server, dataset):
    pytest.importorskip("torch")
    _, url = dataset
    make = lambda: remote(server, url).to_torch_dataloader(**KW, num_workers=2)  # noqa: E731
    full = run_save_load_state(make, [0, 5, 41, 150], key=lambda b: b["rid"].tolist())
    assert len(full) == N // KW["batch_size"]


@pytest.mark.torch
def test_ranks_and_workers_read_each_record_once_and_resume_elastically(server, dataset):
    """2 ranks x 2 workers stop after 9 batches each; 1 rank with 0 workers reads the rest."""
    pytest.importorskip("torch")
    _, url = dataset
    seen, state = [], None
    for world, workers, stop in ((2, 2, 9), (1, 0, None)):
        for rank in range(world):
            dl = remote(server, url).to_torch_dataloader(**KW, num_workers=workers, world_size=world, rank=rank)
            if state is not None:
                dl.load_state_dict(state)
            it = iter(dl)
            for i, batch in enumerate(it, 1):
                seen += batch["rid"].tolist()
                if i == stop:
                    break
            if rank == 0:
                saved = dl.state_dict()
            del it
        state = saved
    assert collections.Counter(seen) == collections.Counter(range(N))


@pytest.fixture(scope="module")
def long_dataset(server, tmp_path_factory):
    """(local dir, s3 URL): 40,000 records in 2 shards, 40 unshuffled windows of the default 1,000."""
    src = tmp_path_factory.mktemp("long-src")
    ids, _ = padded_tokens(np.random.default_rng(6), 40_000, 24)
    np.save(src / "input_ids.npy", ids)
    np.save(src / "rid.npy", np.arange(40_000, dtype=np.int64))
    root = tmp_path_factory.mktemp("long")
    dlpipe.reshard([str(src / "input_ids.npy"), str(src / "rid.npy")], root, pad_id=0, num_shards=2, workers=1,
                   progress=False)
    return str(root), server.upload(root, "s3://dlpipe/long")


@pytest.mark.torch
def test_unshuffled_workers_read_runs_too_and_resume_only_under_the_same_runs(server, proxy, long_dataset):
    """Unshuffled, workers take runs of the block the dataset would shuffle by (over object storage
    >= 1 MiB), not every other window; locally a block is within a window, so nothing changes
    there, and a state saved under one dealing is refused under the other."""
    pytest.importorskip("torch")
    local, url = long_dataset
    so = {**server.storage_options, "endpoint_url": proxy.endpoint}
    shards = [f"/{url.removeprefix('s3://')}/{s.path}" for s in dlpipe.load_dataset(local).info.shards]
    dl = dlpipe.load_dataset(url, storage_options=so).to_torch_dataloader(batch_size=250, num_workers=2)
    windows = dl.dataset.windows()
    assert len(windows) == 40 and dl.dataset.run_records == dl.dataset.source.block_records
    assert len({w.run for w in windows}) == 20  # runs of 2: capped at 1/MIN_RUNS of the windows
    before = sum(1 for method, path, _ in proxy.log if method == "GET" and path in shards)
    got = rids(dl)
    gets = sum(1 for method, path, _ in proxy.log if method == "GET" and path in shards) - before
    assert collections.Counter(r for b in got for r in b) == collections.Counter(range(40_000))
    assert gets <= 20 + 2 * len(shards) < len(windows)
    here = dlpipe.load_dataset(local).to_torch_dataloader(batch_size=250, num_workers=2)
    assert here.dataset.run_records is None and len({w.run for w in here.dataset.windows()}) == 40
    it = iter(here)
    next(it)
    state = here.state_dict()
    del it
    with pytest.raises(dlpipe.ConfigError, match="run_records"):
        dl.load_state_dict(state)
