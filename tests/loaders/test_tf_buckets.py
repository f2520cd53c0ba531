"""Length buckets in ``to_tf_dataset`` (``loaders.tf_buckets``): a window of records grouped at a
time by the PyTorch loader's rule; every record once, each batch at its bucket's boundary,
checkpoints of the file-order pipeline. TF/PyTorch equality of bucketed batches is in
test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
from resume_helper import run_save_load_state, tf_checkpoint
from token_rows import padded_tokens

import dlpipe
from dlpipe.loaders.collate import bucket_ids, collate, padded_length
from dlpipe.loaders.common import (
    BUCKET_WINDOW_BATCHES,
    Window,
    bucket_window_draws,
    buffer_batches,
    window_batches,
)

BOUNDS = [4, 8, 16, 24]


def window_batch_count(buffer_size: int, batch_size: int) -> int:
    """Batches per bucketed window, in both loaders (the shuffle buffer, at least 64 batches)."""
    return max(buffer_batches(buffer_size, batch_size), BUCKET_WINDOW_BATCHES)


@pytest.mark.parametrize("n", [0, 5, 16, 37, 128])
@pytest.mark.parametrize("shuffle", [False, True])
def test_window_draws_give_window_batches(n, shuffle):
    """``bucket_window_draws`` (no lengths) plus a stable sort and a reordering of full batches,
    what the graph does, equals ``window_batches`` with the lengths."""
    lengths = np.random.default_rng(n).integers(0, 30, n)
    window = Window(3, ((0, 0, n),), n, -(-n // 8))
    kw = {"batch_size": 8, "shuffle": shuffle, "seed": 5, "epoch": 2, "rank": 1}
    rows, order = bucket_window_draws(window, **kw)
    rows = rows[np.argsort(bucket_ids(lengths[rows], BOUNDS), kind="stable")]
    full = [rows[i : i + 8] for i in range(0, n // 8 * 8, 8)]
    got = [full[i] for i in order] + ([rows[n // 8 * 8 :]] if n % 8 else [])
    want = window_batches(window, lengths, boundaries=BOUNDS, **kw)
    assert [b.tolist() for b in got] == [b.tolist() for b in want]


tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """700 records of lengths 0..30 in 3 shards, plain and gzip; labels[:, 0] = record number."""
    d = tmp_path_factory.mktemp("buckets")
    ids, _ = padded_tokens(np.random.default_rng(2), 700, 30)
    np.save(d / "input_ids.npy", ids)
    np.save(d / "labels.npy", np.arange(700, dtype=np.float32)[:, None] + np.zeros((1, 2), np.float32))
    out = {}
    for compression in (None, "gzip"):
        root = d / f"out-{compression}"
        dlpipe.reshard([str(d / "input_ids.npy"), str(d / "labels.npy")], root, pad_id=0, num_shards=3,
                       workers=1, progress=False, compression=compression)
        out[compression] = dlpipe.load_dataset(root)
    return out


PIPELINES = {  # (compression, loader arguments): each of the bucketed pipelines
    "file order": (None, {}),
    "file order, one file at a time": (None, {"cycle_length": 1}),
    "compressed, shuffled": ("gzip", {"shuffle": True, "seed": 4}),
    "planned, shuffled": (None, {"shuffle": True, "seed": 4}),
}


def batches(tfds) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in b.items()} for b in tfds]


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("case", list(PIPELINES))
def test_every_record_once_each_batch_at_its_boundary(corpora, case, drop):
    compression, kw = PIPELINES[case]
    ds = corpora[compression]
    got = batches(ds.to_tf_dataset(batch_size=8, bucket_boundaries=BOUNDS, drop_remainder=drop, **kw))
    ids = [int(v) for b in got for v in b["labels"][:, 0]]
    assert len(ids) == len(set(ids)) == (696 if drop else 700)
    assert drop or sorted(ids) == list(range(700))
    sizes = [len(b["labels"]) for b in got]
    assert sizes == [8] * (700 // 8) + ([] if drop else [700 % 8])  # one partial batch, the last
    straddling = 0
    for b in got:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == padded_length(int(lengths.max()), boundaries=BOUNDS)
        straddling += len(set(bucket_ids(lengths, BOUNDS).tolist())) > 1
    # sorted windows: a batch spans two buckets only where one bucket's records run out
    windows = -(-700 // (window_batch_count(ds.shuffle_config.buffer_size, 8) * 8))
    assert straddling <= windows * len(BOUNDS)


def test_ranks_split_the_bucketed_epoch(corpora):
    ds = corpora[None]
    ids = []
    for rank in range(3):
        got = batches(ds.to_tf_dataset(batch_size=8, bucket_boundaries=BOUNDS, shuffle=True, seed=1,
                                       world_size=3, rank=rank, uneven="drop"))
        ids += [int(v) for b in got for v in b["labels"][:, 0]]
    assert len(ids) == len(set(ids)) == 699


def test_shuffled_batches_mix_buckets_and_change_per_epoch(corpora):
    ds = corpora["gzip"]
    tfds = ds.to_tf_dataset(batch_size=8, bucket_boundaries=BOUNDS, shuffle=True, seed=4)
    first, second = (batches(tfds) for _ in range(2))
    widths = [b["input_ids"].shape[1] for b in first]
    assert widths != sorted(widths)  # batch order shuffled, not short to long
    assert [b["labels"][:, 0].tolist() for b in first] != [b["labels"][:, 0].tolist() for b in second]
    plain = batches(ds.to_tf_dataset(batch_size=8, bucket_boundaries=BOUNDS))
    widths = [b["input_ids"].shape[1] for b in plain]
    assert widths[: 700 // 8] != sorted(widths)  # windows, one after the other, not one big sort


def test_drop_remainder_batches_have_a_static_size(corpora):
    for kw in ({}, {"shuffle": True, "seed": 0}):
        spec = corpora[None].to_tf_dataset(batch_size=8, bucket_boundaries=BOUNDS, drop_remainder=True,
                                           **kw).element_spec
        assert spec["input_ids"].shape.as_list() == [8, None]


@pytest.mark.parametrize("compression, kw", [
    (None, {}),
    ("gzip", {"drop_remainder": True}),
])
def test_checkpoint_resumes_across_windows(corpora, tmp_path, compression, kw):
    """``tf.train.Checkpoint(iterator=...)`` of the file-order pipeline; shuffled with a
    100-record buffer, windows are 64 batches of 2 records: a checkpoint inside the first, at
    its edge and in the next resumes exactly."""
    ds = corpora[compression]
    if compression:
        ds = ds.shuffle(seed=3, buffer_size=100)
        assert window_batch_count(100, 2) == 64
    how = tf_checkpoint(str(tmp_path / "ckpt"))
    make = lambda: ds.to_tf_dataset(batch_size=2, bucket_boundaries=BOUNDS, **kw)  # noqa: E731
    full = run_save_load_state(make, (1, 64, 100), how=how)
    assert len(full) == 350


@pytest.mark.parametrize("reshard_kw, rule", [
    ({"int_encoding": "raw"}, {"padding_side": "left"}),
    ({"int_encoding": "int64_list"}, {"pad_to_multiple_of": 4}),
    ({"int_encoding": "raw", "compression": "zlib"}, {"padding_side": "left", "pad_to_multiple_of": 4}),
])
def test_bucketed_batches_equal_common_collate(tmp_path, reshard_kw, rule):
    """Windows are parsed once and their columns regrouped (loaders.tf_buckets): every encoding,
    pad values other than 0, (None, 3) sequences, left padding and pad_to_multiple_of past the
    last boundary come out as ``collate.collate`` makes the PyTorch loader's bucketed batches."""
    rng = np.random.default_rng(3)
    n, width = 1300, 30
    ids, lengths = padded_tokens(rng, n, width, pad_id=7, vocab=100_000)  # uint32 when raw
    real = np.arange(width)[None, :] < lengths[:, None]
    cols = {
        "input_ids": ids,
        "weights": np.where(real, rng.normal(size=(n, width)), 0).astype(np.float32),
        "xyz": np.where(real[..., None], rng.normal(size=(n, width, 3)), 0).astype(np.float32),
        "labels": np.arange(n, dtype=np.float32)[:, None],
    }
    for name, arr in cols.items():
        np.save(tmp_path / f"{name}.npy", arr)
    dlpipe.reshard([str(tmp_path / f"{name}.npy") for name in cols], tmp_path / "out", pad_id=7, num_shards=3,
                   workers=1, progress=False, sequence_columns=["input_ids", "weights", "xyz"], **reshard_kw)
    ds = dlpipe.load_dataset(tmp_path / "out")
    got = batches(ds.to_tf_dataset(batch_size=4, cycle_length=1, bucket_boundaries=BOUNDS, **rule))
    size = window_batch_count(ds.shuffle_config.buffer_size, 4) * 4  # 1000 records: 2 windows
    data = {}  # the whole split as ragged columns, for collate(rows=...)
    for name, enc in ds.info.columns.items():
        arr = cols[name].astype(enc.dtype)
        if enc.variable:
            values = np.concatenate([arr[i, : lengths[i]] for i in range(n)]).reshape(-1)
            data[name] = (values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64) * enc.inner)
        else:
            data[name] = (arr.reshape(-1), np.arange(n + 1, dtype=np.int64) * enc.inner)
    want = []
    for index, start in enumerate(range(0, n, size)):  # the unshuffled windows, in shard order
        window_rows = np.arange(start, min(n, start + size))
        window = Window(index, ((0, start, start + len(window_rows)),), len(window_rows), 0)
        for rows in window_batches(window, lengths[window_rows], batch_size=4, shuffle=False, seed=0,
                                   epoch=0, rank=0, boundaries=BOUNDS):
            want.append(collate(data, ds.info.columns, ds.info.pad_values, rows=window_rows[rows],
                                boundaries=BOUNDS, **rule))
    assert len(got) == len(want) == -(-n // 4)
    for batch, expected in zip(got, want):
        assert batch.keys() == expected.keys()
        for name in expected:
            assert batch[name].dtype == expected[name].dtype, name
            np.testing.assert_array_equal(batch[name], expected[name], err_msg=name)
