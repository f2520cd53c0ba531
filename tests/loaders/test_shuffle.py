"""A shuffle that mixes the whole split (issue 16): blocks of records permuted across every
shard, the same plan in the framework-free iterator, the PyTorch loader and tf.data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlpipe
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import epoch_pieces, epoch_windows, shuffle_block_records

N = 20_000


def rank_correlation(order: np.ndarray) -> float:
    """Spearman's r between yield position and source position (a permutation of 0..n-1)."""
    return float(np.corrcoef(np.arange(len(order)), order)[0, 1])


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """N short records in one shard (the default plan of a small corpus); labels = record id."""
    tmp = tmp_path_factory.mktemp("one-shard")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, N)
    ids = rng.integers(1, 50, (N, 8))
    ids[np.arange(8)[None, :] >= lengths[:, None]] = 0
    np.save(tmp / "input_ids.npy", ids)
    np.save(tmp / "labels.npy", np.arange(N, dtype=np.float32)[:, None])
    dlpipe.reshard([str(tmp / "input_ids.npy"), str(tmp / "labels.npy")], tmp / "out", pad_id=0,
                   workers=1, progress=False)
    return tmp / "out"


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), block=st.integers(1, 9),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_blocks_cover_every_record_once(sizes, block, seed, epoch):
    shards, starts, stops = epoch_pieces(sizes, shuffle=True, seed=seed, epoch=epoch, block_records=block)
    assert (stops - starts <= block).all() and (stops > starts).all()
    seen = sorted((int(s), r) for s, a, b in zip(shards, starts, stops) for r in range(a, b))
    assert seen == [(s, r) for s, n in enumerate(sizes) for r in range(n)]
    again = epoch_pieces(sizes, shuffle=True, seed=seed, epoch=epoch, block_records=block)
    assert all((x == y).all() for x, y in zip(again, (shards, starts, stops)))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=5), block=st.integers(1, 7),
       batch=st.integers(1, 9), world=st.integers(1, 3))
def test_block_windows_split_exactly_once_across_ranks(sizes, block, batch, world):
    total = sum(sizes)
    got = []
    for rank in range(world):
        for w in epoch_windows(sizes, batch_size=batch, world_size=world, rank=rank, shuffle=True,
                               seed=1, epoch=0, window_batches=2, uneven="drop", block_records=block):
            assert w.num_records == sum(b - a for _, a, b in w.ranges)
            assert list(w.ranges) == sorted(w.ranges)  # read in file order, one call per shard
            got += [(s, r) for s, a, b in w.ranges for r in range(a, b)]
    assert len(got) == len(set(got)) == total // world * world
    padded = [(s, r) for rank in range(world)
              for w in epoch_windows(sizes, batch_size=batch, world_size=world, rank=rank, shuffle=True, seed=1,
                                     window_batches=2, uneven="pad", block_records=block)
              for s, a, b in w.ranges for r in range(a, b)]
    assert set(padded) == {(s, r) for s, n in enumerate(sizes) for r in range(n)}  # wraps to fill
    assert len(padded) == -(-total // world) * world


def test_block_size_aims_at_thousands_of_blocks():
    assert shuffle_block_records(144_563) == 36
    assert shuffle_block_records(1_000) == 1
    assert shuffle_block_records(10**9) == 256
    # over object storage a block is a request: at least min_bytes
    assert shuffle_block_records(144_563, min_bytes=1 << 20, bytes_per_record=86) == 12_193


def _ids(rows) -> np.ndarray:
    return np.concatenate([np.asarray(r["labels"]).reshape(-1) for r in rows]).astype(np.int64)


def test_iterator_mixes_one_shard(one_shard):
    ds = dlpipe.load_dataset(one_shard).shuffle(seed=0)
    assert ds.num_shards == 1 and ds.block_records == 5
    order = _ids(list(ds))
    assert sorted(order.tolist()) == list(range(N))
    assert abs(rank_correlation(order)) <= 0.05
    assert np.abs(order - np.arange(N)).mean() / N > 0.25  # a uniform shuffle moves ~1/3


def test_torch_loader_mixes_one_shard_and_matches_tf(one_shard):
    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(one_shard).shuffle(seed=4, buffer_size=500)
    torch_batches = [_ids([b]) for b in ds.to_torch_dataloader(batch_size=64)]
    order = np.concatenate(torch_batches)
    assert sorted(order.tolist()) == list(range(N))
    assert abs(rank_correlation(order)) <= 0.05
    again = [_ids([b]) for b in ds.to_torch_dataloader(batch_size=64, num_workers=2)]
    assert sorted(np.concatenate(again).tolist()) == list(range(N))
    pytest.importorskip("tensorflow")
    tf_batches = [_ids([b]) for b in ds.to_tf_dataset(batch_size=64)]
    assert [b.tolist() for b in tf_batches] == [b.tolist() for b in torch_batches]  # same plan


def test_compressed_shards_are_permuted_whole(tmp_path):
    ids = np.ones((50, 4), np.int64)
    np.save(tmp_path / "input_ids.npy", ids)
    dlpipe.reshard([str(tmp_path / "input_ids.npy")], tmp_path / "out", pad_id=0, compression="gzip",
                   num_shards=5, workers=1, progress=False)
    ds = dlpipe.load_dataset(tmp_path / "out")
    assert ds.shuffle(seed=0).block_records is None
    with pytest.raises(ConfigError, match="block_records"):
        ds.shuffle(seed=0, block_records=4)


def test_plan_order_is_what_the_loaders_yield(one_shard):
    from dlpipe.loaders.shuffle_quality import order_quality, plan_order

    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(one_shard).shuffle(seed=3, buffer_size=700)
    order = plan_order(ds, 128)
    assert order.tolist() == _ids(list(ds.to_torch_dataloader(batch_size=128))).tolist()
    q = order_quality(order, N)
    assert q["exactly_once"] and abs(q["rank_correlation"]) <= 0.05 and q["mean_displacement"] > 0.25
    assert order_quality(np.arange(N), N)["rank_correlation"] == pytest.approx(1.0)
    assert not order_quality(np.zeros(N, np.int64), N)["exactly_once"]


def test_dlpipe_bench_reports_the_shuffle_it_trains_on(one_shard):
    from dlpipe.benchmark.report import render_report
    from dlpipe.benchmark.results import make_results
    from dlpipe.benchmark.runner import _shuffle_quality

    q = _shuffle_quality(str(one_shard), 256)
    assert q["exactly_once"] and abs(q["rank_correlation"]) <= 0.05 and q["block_records"] == 5
    results = make_results(machine={}, ceilings={}, config={}, runs=[], shuffle=q)
    text = render_report(results)
    assert "## Shuffle quality" in text and f"{q['rank_correlation']:+.3f}" in text


@pytest.mark.parametrize("shuffle", [False, True])
def test_tf_ranks_split_one_shard_by_records_as_torch_does(one_shard, shuffle):
    """Fewer shards than ranks: record ranges per rank (issue 11), the same batches in both."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(one_shard)
    kw = dict(batch_size=300, shuffle=shuffle, seed=2 if shuffle else None, world_size=3)
    seen = []
    for rank in range(3):
        tf_batches = [_ids([b]).tolist() for b in ds.to_tf_dataset(rank=rank, **kw)]
        torch_batches = [_ids([b]).tolist() for b in ds.to_torch_dataloader(rank=rank, **kw)]
        assert tf_batches == torch_batches
        seen += [i for b in tf_batches for i in b]
    assert set(seen) == set(range(N)) and len(seen) == -(-N // 3) * 3  # "pad" repeats a few
    with pytest.raises(ConfigError, match="same seed"):
        ds.to_tf_dataset(batch_size=8, shuffle=True, world_size=2, rank=0)
