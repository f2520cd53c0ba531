"""The PyTorch loader: round trips, the work split, resume, shuffling, bucketing, errors, DDP."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlpipe
from dlpipe.errors import ConfigError, FormatError, MissingDependencyError
from dlpipe.loaders.common import resume_point

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from resume_helper import run_save_load_state  # noqa: E402
from token_rows import padded_tokens  # noqa: E402

N = 600  # divides by world sizes 1, 2 and 3
WIDTH = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Source columns (ids with lengths 0..24, float labels, a record id) and a builder of
    dlpipe datasets from them, cached per (format, compression)."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(7)
    ids, lengths = padded_tokens(rng, N, WIDTH)
    ids[0], lengths[0] = 0, 0  # edge lengths: empty and full
    ids[1], lengths[1] = rng.integers(1, 100, WIDTH), WIDTH
    labels = rng.normal(size=(N, 2)).astype(np.float32)
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", labels)
    np.save(src / "rid.npy", np.arange(N, dtype=np.int64))
    built: dict = {}

    def build(fmt: str = "tfrecord", compression: str | None = None) -> str:
        if (fmt, compression) not in built:
            out = tmp_path_factory.mktemp(f"{fmt}-{compression}")
            specs = [str(src / f"{c}.npy") for c in ("input_ids", "labels", "rid")]
            dlpipe.reshard(
                specs,
                out,
                pad_id=0,
                num_shards=5,
                workers=1,
                format=fmt,
                compression=compression,
                overwrite=True,
            )
            built[(fmt, compression)] = str(out)
        return built[(fmt, compression)]

    return {"ids": ids, "lengths": lengths, "labels": labels, "build": build}


@pytest.fixture(scope="module")
def root(corpus):
    return corpus["build"]()


def rids(batches) -> list[list[int]]:
    return [b["rid"].tolist() for b in batches]


def flat(batches) -> list[int]:
    return [r for b in rids(batches) for r in b]


# ---------------------------------------------------------------------------------------------
# values


def lengths_of(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A user collate_fn: record ids and unpadded lengths."""
    assert all(isinstance(r["input_ids"], np.ndarray) for r in records)
    return {
        "rid": np.array([r["rid"] for r in records]),
        "n": np.array([len(r["input_ids"]) for r in records]),
    }


@pytest.mark.parametrize(
    "fmt,compression", [("tfrecord", None), ("tfrecord", "gzip"), ("webdataset", "gzip")]
)
def test_round_trip_equals_source(corpus, fmt, compression):
    ds = dlpipe.load_dataset(corpus["build"](fmt, compression))
    loader = ds.to_torch_dataloader(batch_size=7)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-N // 7)
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "labels", "rid", "attention_mask"}
        assert b["input_ids"].dtype == torch.int64 and b["labels"].dtype == torch.float32
        assert (
            b["attention_mask"].dtype == torch.int64
            and b["attention_mask"].shape == b["input_ids"].shape
        )
        assert b["labels"].shape == (len(b["rid"]), 2)
        for row, mask, label, r in zip(
            b["input_ids"], b["attention_mask"], b["labels"], b["rid"].tolist()
        ):
            n = int(corpus["lengths"][r])
            assert mask.tolist() == [1] * n + [0] * (len(mask) - n)
            assert row.tolist() == corpus["ids"][r, :n].tolist() + [0] * (len(row) - n)
            assert np.array_equal(label.numpy(), corpus["labels"][r])
            seen.append(r)
        assert b["input_ids"].shape[1] == int(corpus["lengths"][b["rid"].numpy()].max())
    assert seen == list(range(N))


def test_padding_options_and_collate_fn(corpus, root):
    ds = dlpipe.load_dataset(root)
    for b in ds.to_torch_dataloader(batch_size=16, pad_to_multiple_of=8, padding_side="left"):
        assert b["input_ids"].shape[1] % 8 == 0
        n = corpus["lengths"][b["rid"].numpy()]
        assert b["attention_mask"].sum(1).tolist() == n.tolist()
        assert (
            b["attention_mask"][:, -1].tolist() == (n > 0).astype(int).tolist()
        )  # real tokens at the right

    got = list(ds.to_torch_dataloader(batch_size=50, collate_fn=lengths_of, num_workers=1))
    assert all(isinstance(b["n"], torch.Tensor) for b in got)
    assert (
        torch.cat([b["n"] for b in got]).tolist()
        == corpus["lengths"][torch.cat([b["rid"] for b in got])].tolist()
    )


def test_bad_arguments(root):
    ds = dlpipe.load_dataset(root)
    for kwargs in [
        {"batch_size": 0},
        {"padding_side": "middle"},
        {"uneven": "wrap"},
        {"bucket_boundaries": [8, 4]},
        {"bucket_boundaries": "quantiles"},
        {"world_size": 2},
        {"world_size": 2, "rank": 2},
        {"prefetch_factor": 2},
    ]:
        with pytest.raises(ConfigError):
            ds.to_torch_dataloader(**kwargs)


# ---------------------------------------------------------------------------------------------
# work split


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_record_once_and_equal_batch_counts(root, world, num_workers):
    ds = dlpipe.load_dataset(root).shuffle(seed=3, buffer_size=40)
    per_rank = []
    for rank in range(world):
        loader = ds.to_torch_dataloader(
            batch_size=8, num_workers=num_workers, world_size=world, rank=rank
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1
    seen = [r for batches in per_rank for r in flat(batches)]
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("uneven", ["pad", "drop"])
def test_uneven_world(root, uneven):
    ds = dlpipe.load_dataset(root)
    world = 7  # 600 = 7 * 85 + 5
    per_rank = [
        flat(ds.to_torch_dataloader(batch_size=10, world_size=world, rank=r, uneven=uneven))
        for r in range(world)
    ]
    assert len({len(r) for r in per_rank}) == 1
    seen = [r for part in per_rank for r in part]
    if uneven == "pad":
        assert len(seen) == 7 * 86 and set(seen) == set(range(N))
    else:
        assert len(seen) == len(set(seen)) == 7 * 85


def test_rank_from_environment(root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    loader = dlpipe.load_dataset(root).to_torch_dataloader(batch_size=10)
    assert (loader.dataset.world_size, loader.dataset.rank) == (3, 2)
    assert flat(loader) == list(range(400, 600))


# ---------------------------------------------------------------------------------------------
# epochs and shuffling


def test_shuffle_is_deterministic_per_seed_and_epoch(root):
    ds = dlpipe.load_dataset(root)

    def stream(seed, epoch, **kw):
        loader = ds.to_torch_dataloader(batch_size=16, shuffle=True, seed=seed, **kw)
        loader.set_epoch(epoch)
        return flat(loader)

    a = stream(1, 0)
    assert a == stream(1, 0) and a != list(range(N))
    assert stream(1, 1) != a and sorted(stream(1, 1)) == list(range(N))
    assert stream(2, 0) != a
    # the same stream with workers, and set_epoch reaches persistent workers
    loader = ds.to_torch_dataloader(
        batch_size=16, shuffle=True, seed=1, num_workers=2, persistent_workers=True
    )
    with_workers = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        with_workers.append(sorted(flat(loader)))
    assert with_workers == [list(range(N))] * 2


def test_bucketing_pads_to_boundaries(root):
    ds = dlpipe.load_dataset(root).shuffle(seed=0, buffer_size=200)

    def efficiency(loader):
        real = padded = 0
        for b in loader:
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
        return real / padded

    plain = efficiency(ds.to_torch_dataloader(batch_size=16))
    loader = ds.to_torch_dataloader(batch_size=16, bucket_boundaries="auto")
    bounds = loader.dataset.boundaries
    assert all(b["input_ids"].shape[1] in bounds for b in loader)
    assert sorted(flat(loader)) == list(range(N))
    bucketed = efficiency(loader)
    print(
        f"padding efficiency (real / padded tokens): {plain:.3f} plain, {bucketed:.3f} bucketed {bounds}"
    )
    assert bucketed > plain
    fixed = ds.to_torch_dataloader(batch_size=16, bucket_boundaries=[8, 16, 24])
    assert {b["input_ids"].shape[1] for b in fixed} <= {8, 16, 24}


# ---------------------------------------------------------------------------------------------
# checkpoints


def rid_key(batch) -> list[int]:
    return batch["rid"].tolist()


def set_epoch_1(obj) -> None:
    obj.set_epoch(1)  # after load_state_dict, as a training loop does: the same epoch keeps the resume


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(root, num_workers, stateful):
    """DlpipeDataLoader and torchdata's StatefulDataLoader, through tests/resume_helper.py."""
    if stateful:
        pytest.importorskip("torchdata")
    # 600 records / (buffer 40 -> windows of 5 batches of 8) = 15 windows, the last one short:
    # with 2 workers, worker 0 yields 8 windows and worker 1 seven, so late stops see one exhausted
    ds = dlpipe.load_dataset(root).shuffle(seed=5, buffer_size=40)

    def make():
        return ds.to_torch_dataloader(batch_size=8, num_workers=num_workers, stateful=stateful)

    full = run_save_load_state(make, (0, 3, 11, 70, 74, 75), prepare=set_epoch_1, key=rid_key)
    assert len(full) == 75 and sorted(r for b in full for r in b) == list(range(N))


@pytest.mark.parametrize("stateful", [False, True])
def test_state_of_a_finished_epoch_then_set_epoch_plays_the_next_one(root, stateful):
    """As a trainer does at an epoch boundary: load the state saved at the end of epoch 0, then
    set_epoch(1): epoch 1 is played whole (the old state belongs to another epoch)."""
    if stateful:
        pytest.importorskip("torchdata")
    ds = dlpipe.load_dataset(root).shuffle(seed=5, buffer_size=40)
    first = ds.to_torch_dataloader(batch_size=8, stateful=stateful)
    list(first)
    state = first.state_dict()
    again = ds.to_torch_dataloader(batch_size=8, stateful=stateful)
    again.load_state_dict(state)
    again.set_epoch(1)
    rids = [r for b in again for r in rid_key(b)]
    assert sorted(rids) == list(range(N))


@pytest.mark.parametrize("shuffle", [False, True])
def test_shard_iterable_dataset_resumes_alone(root, shuffle):
    """The dataset itself (what StatefulDataLoader saves per worker), iterated in this process."""
    from dlpipe.loaders.torch_data import ShardIterableDataset

    ds = dlpipe.load_dataset(root)
    ds = ds.shuffle(seed=2, buffer_size=40) if shuffle else ds

    def make():
        return ShardIterableDataset(ds, batch_size=16, bucket_boundaries="auto")

    full = run_save_load_state(make, (0, 1, 17, 38), prepare=set_epoch_1, key=rid_key)
    assert len(full) == 38 and sorted(r for b in full for r in b) == list(range(N))


def test_resume_state_and_epoch_rules(root):
    ds = dlpipe.load_dataset(root).shuffle(seed=5, buffer_size=40)
    loader = ds.to_torch_dataloader(batch_size=8, num_workers=2, persistent_workers=True)
    loader.set_epoch(2)
    it = iter(loader)
    head = [next(it) for _ in range(9)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches_yielded"] == 9
    rest = list(it)
    assert loader.state_dict()["batches_yielded"] == 75
    loader.load_state_dict(state)  # the same loader, persistent workers restarted
    assert rids(head) + rids(loader) == rids(head) + rids(rest)
    assert sorted(flat(loader)) == list(range(N))  # and afterwards, a whole epoch again
    loader.load_state_dict(state)
    loader.set_epoch(3)  # another epoch drops the resume
    assert len(list(loader)) == 75 and loader.state_dict()["epoch"] == 3
    other = ds.to_torch_dataloader(batch_size=4, num_workers=2)
    with pytest.raises(ConfigError, match="batch_size"):
        other.load_state_dict(state)


def dataloader_order(batches_per_worker, bundle):
    """(worker, its batch number) in the order PyTorch's DataLoader hands out an iterable
    dataset's messages (workers in turn, exhausted ones skipped), ``bundle`` batches a message."""
    sent = [0] * len(batches_per_worker)
    order = []
    while any(s < n for s, n in zip(sent, batches_per_worker)):
        for w, n in enumerate(batches_per_worker):
            if sent[w] < n:
                size = min(bundle, n - sent[w])
                order += [(w, sent[w] + i) for i in range(size)]
                sent[w] += size
    return order


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=1, max_size=5), st.integers(1, 5), st.data())
def test_resume_point_replays_the_dataloader_order(per, bundle, data):
    """Counts and the next worker after any number of batches, against a simulation of the
    DataLoader; resuming there (roles rotated, each worker's first bundle cut to realign) gives
    the rest of the same order."""
    order = dataloader_order(per, bundle)
    consumed = data.draw(st.integers(0, len(order)))
    done, nxt = resume_point(per, consumed, bundle)
    assert done == [sum(1 for w, _ in order[:consumed] if w == k) for k in range(len(per))]
    n = len(per)
    roles = [(i + nxt) % n for i in range(n)]  # resumed worker i plays role roles[i]
    rest, sent = [], [done[r] for r in roles]
    while any(s < per[r] for s, r in zip(sent, roles)):
        for i, r in enumerate(roles):
            if sent[i] < per[r]:
                size = min(bundle - sent[i] % bundle, per[r] - sent[i])
                rest += [(r, sent[i] + j) for j in range(size)]
                sent[i] += size
    assert order[:consumed] + rest == order


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_raises_format_error_with_path_and_offset(
    corpus, root, tmp_path, num_workers
):
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    shard = dlpipe.load_dataset(bad).shards[2]
    offset, size = np.loadtxt(bad / shard.index, dtype=np.int64)[50]
    data = bytearray((bad / shard.path).read_bytes())
    data[offset + size // 2] ^= 0xFF  # inside record 50's payload
    (bad / shard.path).write_bytes(bytes(data))
    loader = dlpipe.load_dataset(bad).to_torch_dataloader(batch_size=8, num_workers=num_workers)
    try:
        list(loader)
    except FormatError as e:
        err = e
        # drop the frames (and so the DataLoader iterator) now: left to the cycle collector,
        # PyTorch's worker shutdown waits 5 s per worker
        err.__traceback__ = None
    else:
        pytest.fail("a corrupt record was not reported")
    assert err.path == str(bad / shard.path) and err.offset == offset
    assert f"{shard.path} at byte {offset}" in str(err)


def test_missing_torch_names_the_pip_command(root, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.split(".")[0] == "torch" else real(name, *a),
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'dlpipe\[torch\]'"):
        dlpipe.load_dataset(root).to_torch_dataloader(batch_size=4)
    monkeypatch.delitem(sys.modules, "dlpipe.loaders.torch_data")
    with pytest.raises(MissingDependencyError, match=r"pip install 'dlpipe\[torch\]'"):
        importlib.import_module("dlpipe.loaders.torch_data")


# ---------------------------------------------------------------------------------------------
# a real process group


def _ddp_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        loader = dlpipe.load_dataset(root).to_torch_dataloader(batch_size=8, shuffle=True, seed=4)
        batches = list(loader)
        np.save(os.path.join(out, f"rank{rank}.npy"), np.array(flat(batches)))
        np.save(os.path.join(out, f"batches{rank}.npy"), np.array([len(loader), len(batches)]))
    finally:
        dist.destroy_process_group()


def test_real_gloo_process_group(root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(2, port, root, str(tmp_path)), nprocs=2, join=True)
    parts = [np.load(tmp_path / f"rank{r}.npy").tolist() for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(N))
    counts = [np.load(tmp_path / f"batches{r}.npy").tolist() for r in range(2)]
    assert counts[0] == counts[1]
