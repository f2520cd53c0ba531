"""``ShardDataset.map`` / ``filter`` (HF ``IterableDataset`` semantics) in the framework-free
iterator, ``collate_records`` after transforms, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlpipe
from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.loaders.transforms import apply_transforms, collate_records, make_transform

N = 50


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 10, N)
    ids = np.where(np.arange(10)[None, :] < lengths[:, None], rng.integers(1, 90, (N, 10)), 0)
    np.save(src / "input_ids.npy", ids.astype(np.int32))
    np.save(src / "rid.npy", np.arange(N, dtype=np.int64))
    out = tmp_path_factory.mktemp("shards")
    dlpipe.reshard([str(src / "input_ids.npy"), str(src / "rid.npy")], out, pad_id=0, num_shards=3,
                   workers=1, overwrite=True, progress=False)
    return {"path": str(out), "ids": ids, "lengths": lengths}


def test_map_adds_and_replaces_columns(data):
    ds = dlpipe.load_dataset(data["path"]).map(lambda r: {"n": len(r["input_ids"]), "rid": r["rid"] * 2})
    rows = list(ds)
    assert [r["rid"] for r in rows] == [2 * i for i in range(N)]
    assert [r["n"] for r in rows] == data["lengths"].tolist()


def test_filter_keeps_what_the_function_says(data):
    ds = dlpipe.load_dataset(data["path"]).filter(lambda r: r["rid"] % 3 == 0)
    assert [int(r["rid"]) for r in ds] == list(range(0, N, 3))


def test_batched_map_may_change_the_count_once_inputs_are_removed(data):
    def split_in_two(batch):
        return {"half": [x[: len(x) // 2] for x in batch["input_ids"]] + [x[len(x) // 2:] for x in batch["input_ids"]]}

    ds = dlpipe.load_dataset(data["path"]).map(split_in_two, batched=True, batch_size=8,
                                               remove_columns=["input_ids", "rid"])
    halves = [r["half"] for r in ds]
    assert len(halves) == 2 * N and sum(len(h) for h in halves) == int(data["lengths"].sum())
    bad = dlpipe.load_dataset(data["path"]).map(split_in_two, batched=True, batch_size=8)
    with pytest.raises(ConfigError, match=r"returned 16 records for 8; pass remove_columns=\['input_ids', 'rid'\]"):
        list(bad)


def test_transforms_chain_in_order(data):
    ds = (dlpipe.load_dataset(data["path"]).filter(lambda r: r["rid"] < 10)
          .map(lambda b: {"rid": [x + 100 for x in b["rid"]]}, batched=True, batch_size=3)
          .filter(lambda b: [x % 2 == 0 for x in b["rid"]], batched=True))
    assert [int(r["rid"]) for r in ds] == [100, 102, 104, 106, 108]


def test_tf_refuses_python_transforms_with_the_native_way(data):
    ds = dlpipe.load_dataset(data["path"]).map(lambda r: r)
    with pytest.raises(ConfigError, match=r"Python transforms \(map\).*tf_ds.map"):
        ds.to_tf_dataset(batch_size=4)


def test_bad_arguments(data):
    ds = dlpipe.load_dataset(data["path"])
    with pytest.raises(ConfigError, match="filter\\(function=3\\)"):
        ds.filter(3)
    with pytest.raises(ConfigError, match="batch_size=0"):
        ds.map(lambda r: r, batched=True, batch_size=0)
    with pytest.raises(ConfigError, match="returned int"):
        list(ds.map(lambda r: 1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.sampled_from(["right", "left"]))
def test_collate_records_pads_like_the_loader(lengths, side):
    """Records padded by ``collate_records`` equal the loader's own padding (``collate``) of the
    same ragged column, manifest pad value and mask included."""
    from dlpipe.loaders.collate import collate

    rng = np.random.default_rng(len(lengths))
    recs = [{"input_ids": rng.integers(1, 50, n).astype(np.int32), "y": np.float32(i)} for i, n in enumerate(lengths)]
    enc = {"input_ids": ColumnEncoding("input_ids", "int32", (None,), "int32"),
           "y": ColumnEncoding("y", "float32", (), "float32")}
    got = collate_records(recs, enc, {"input_ids": 7}, padding_side=side)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([r["input_ids"] for r in recs])
    want = collate({"input_ids": (values, splits), "y": (np.arange(len(lengths), dtype=np.float32),
                                                         np.arange(len(lengths) + 1, dtype=np.int64))},
                   enc, {"input_ids": 7}, padding_side=side)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_collate_records_infers_new_columns():
    recs = [{"a": np.arange(n, dtype=np.int64), "b": np.ones(3)} for n in (1, 4, 2)]
    out = collate_records(recs, {}, {})
    assert out["a"].shape == (3, 4) and out["b"].shape == (3, 3)
    np.testing.assert_array_equal(out["attention_mask"], [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ConfigError, match="column 'c' has records of shapes"):
        collate_records([{"c": np.zeros((2, 3))}, {"c": np.zeros((2, 4))}], {}, {})


def test_apply_transforms_unbatched_filter_then_map():
    f = make_transform(lambda r: r["x"] > 1, keep=True, batched=False, batch_size=None, remove_columns=None,
                       fn_kwargs=None)
    m = make_transform(lambda r, k: {"x": r["x"] * k}, keep=False, batched=False, batch_size=None,
                       remove_columns=None, fn_kwargs={"k": 10})
    assert apply_transforms([{"x": i} for i in range(4)], [f, m]) == [{"x": 20}, {"x": 30}]


# -- in the PyTorch loader ----------------------------------------------------------------------


def _torch_loader(data, ds, **kw):
    pytest.importorskip("torch")
    kw.setdefault("shuffle", True)
    return ds.to_torch_dataloader(batch_size=8, seed=4, **kw)


@pytest.mark.torch
@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_map_runs_in_the_workers_and_pads_the_result(data, num_workers):
    import os

    ds = dlpipe.load_dataset(data["path"]).map(lambda r: {"input_ids": r["input_ids"][::-1].copy(),
                                                          "pid": os.getpid()})
    batches = list(_torch_loader(data, ds, num_workers=num_workers))
    rids = sorted(int(x) for b in batches for x in b["rid"])
    assert rids == list(range(N))
    pids = {int(p) for b in batches for p in b["pid"]}
    assert (os.getpid() in pids) == (num_workers == 0)
    for b in batches:
        for row, mask, rid in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), b["rid"].tolist()):
            n = int(data["lengths"][rid])
            assert row[:n] == data["ids"][rid][:n][::-1].tolist() and sum(mask) == n
            assert all(x == 0 for x in row[n:])  # the manifest's pad value, as without map


@pytest.mark.torch
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
def test_torch_filter_resumes_exactly(data, num_workers, shuffle):
    """Unshuffled, the first two batches (records 0-15) lose every record: they are counted, not
    handed out, and resume still lands on the right batch."""
    from resume_helper import run_save_load_state

    ds = dlpipe.load_dataset(data["path"]).filter(lambda r: r["rid"] % 5 != 0 and r["rid"] > 15)
    full = run_save_load_state(lambda: _torch_loader(data, ds, num_workers=num_workers, shuffle=shuffle),
                               stops=[0, 1, 3], key=lambda b: b["rid"].tolist())
    assert sorted(sum(full, [])) == [i for i in range(N) if i % 5 and i > 15]
    assert all(full)


@pytest.mark.torch
def test_torch_refuses_packing_with_transforms(data):
    ds = dlpipe.load_dataset(data["path"]).map(lambda r: r)
    with pytest.raises(ConfigError, match="packing with ds.map/ds.filter"):
        _torch_loader(data, ds, packing=True, max_length=16)
