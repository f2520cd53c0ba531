"""TF and PyTorch loaders agree: same samples per epoch, same padding rule, same bucket shapes."""

from __future__ import annotations

import numpy as np
import pytest

import dlpipe
from dlpipe.loaders.collate import default_boundaries, padded_length

pytestmark = [pytest.mark.tf, pytest.mark.torch]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from token_rows import padded_tokens

    d = tmp_path_factory.mktemp("parity")
    ids, _ = padded_tokens(np.random.default_rng(4), 3000, 48, max_len=48)
    np.save(d / "input_ids.npy", ids)
    np.save(d / "labels.npy", np.random.default_rng(5).normal(size=(3000, 2)).astype(np.float32))
    dlpipe.reshard([str(d / "input_ids.npy"), str(d / "labels.npy")], d / "out", pad_id=0, num_shards=6,
                   workers=1)
    return d / "out"


def tf_batches(ds, **kw):
    pytest.importorskip("tensorflow")
    out = ds.to_tf_dataset(batch_size=64, columns=["input_ids", "attention_mask"], label_cols=["labels"], **kw)
    return [({k: v.numpy() for k, v in f.items()}, y.numpy()) for f, y in out]


def torch_batches(ds, **kw):
    pytest.importorskip("torch")
    return [({k: v.numpy() for k, v in b.items() if k != "labels"}, b["labels"].numpy())
            for b in ds.to_torch_dataloader(batch_size=64, **kw)]


def records(batches) -> list[tuple]:
    rows = []
    for f, y in batches:
        for ids, mask, lab in zip(f["input_ids"], f["attention_mask"], y):
            rows.append((tuple(ids[mask == 1].tolist()), tuple(lab.tolist())))
    return sorted(rows)


@pytest.mark.parametrize("epoch", [0, 1])
def test_same_samples_per_epoch_with_the_same_seed(shards, epoch):
    ds = dlpipe.load_dataset(shards).shuffle(seed=7, buffer_size=500)
    ds.set_epoch(epoch)
    got_tf, got_torch = records(tf_batches(ds)), records(torch_batches(ds))
    assert len(got_tf) == len(got_torch) == 3000
    assert got_tf == got_torch


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_same_padding_rule(shards, pad_to_multiple_of):
    ds = dlpipe.load_dataset(shards).shuffle(seed=1)
    for batches in (tf_batches(ds, pad_to_multiple_of=pad_to_multiple_of),
                    torch_batches(ds, pad_to_multiple_of=pad_to_multiple_of)):
        for f, _ in batches:
            longest = int(f["attention_mask"].sum(axis=1).max())
            assert f["input_ids"].shape[1] == padded_length(longest, pad_to_multiple_of=pad_to_multiple_of)
            assert np.all(f["input_ids"][f["attention_mask"] == 0] == 0)


def test_same_bucket_shapes(shards):
    ds = dlpipe.load_dataset(shards).shuffle(seed=2)
    bounds = set(default_boundaries(ds.info, "input_ids"))
    tf_shapes = {f["input_ids"].shape[1] for f, _ in tf_batches(ds, bucket_boundaries="auto")}
    torch_shapes = {f["input_ids"].shape[1] for f, _ in torch_batches(ds, bucket_boundaries="auto")}
    assert tf_shapes <= bounds and torch_shapes <= bounds


# ---------------------------------------------------------------------------------------------
# one shuffle rule (loaders.options.resolve_shuffle) and one set of option checks


def label_order(batches) -> list[tuple]:
    """Records in yield order (each record's label pair is unique)."""
    return [tuple(lab.tolist()) for _, y in batches for lab in y]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (fa, ya), (fb, yb) in zip(a, b):
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("how", ["loader seed", "ds.shuffle(seed)", "epoch 1, left padding"])
def test_seeded_shuffle_gives_identical_batches_in_both_frameworks(shards, how):
    """Uncompressed shards: both front ends follow one epoch plan, so the same seed gives the
    same batches, record for record and pad for pad."""
    ds, kw = dlpipe.load_dataset(shards), {"shuffle": True, "seed": 9}
    if how == "ds.shuffle(seed)":
        ds, kw = ds.shuffle(seed=9, buffer_size=300), {}
    elif how == "epoch 1, left padding":
        ds.set_epoch(1)
        kw.update(padding_side="left", pad_to_multiple_of=8)
    got_tf, got_torch = tf_batches(ds, **kw), torch_batches(ds, **kw)
    assert_same_batches(got_tf, got_torch)
    assert label_order(got_tf) != label_order(tf_batches(dlpipe.load_dataset(shards)))  # shuffled


def test_unseeded_shuffle_differs_per_run_in_both_frameworks(shards):
    """No seed: a random one per run (as HF and PyTorch users expect), recorded so a checkpoint
    can replay it; a dataset shuffled without a seed keeps the seed it drew, in both."""
    ds = dlpipe.load_dataset(shards)
    everything = sorted(label_order(torch_batches(ds)))
    for batches in (tf_batches, torch_batches):
        a, b = (label_order(batches(ds, shuffle=True)) for _ in range(2))
        assert a != b and sorted(a) == sorted(b) == everything
    loader = ds.to_torch_dataloader(batch_size=64, shuffle=True)
    seed = loader.state_dict()["seed"]
    assert seed == loader.dataset.shuffle_config.seed
    assert_same_batches(torch_batches(ds, shuffle=True, seed=seed),
                        [({k: v.numpy() for k, v in b.items() if k != "labels"}, b["labels"].numpy())
                         for b in loader])
    drawn = ds.shuffle()  # the seed is drawn here, once: every loader of it agrees
    assert drawn.shuffle_config.seed is not None and not drawn.shuffle_config.seed_given
    assert_same_batches(tf_batches(drawn), torch_batches(drawn))
    assert label_order(torch_batches(ds.shuffle())) != label_order(torch_batches(drawn))


@pytest.mark.parametrize("kw", [
    {"padding_side": "middle"},
    {"pad_to_multiple_of": 0},
    {"bucket_boundaries": [8, 4]},
    {"bucket_boundaries": "quantiles"},
    {"uneven": "wrap"},
    {"world_size": 2},
    {"world_size": 2, "rank": 2},
    {"seed": -1},
    {"batch_size": 0},
    {"shuffle": True, "world_size": 2, "rank": 0},
])
def test_both_front_ends_refuse_bad_shared_options_with_one_message(shards, kw):
    """Shared options are checked once (LoaderOptions): the same message, naming the parameter
    and the value, from either front end."""
    from dlpipe.errors import ConfigError

    ds = dlpipe.load_dataset(shards)
    kw = {"batch_size": 8, **kw}
    messages = []
    for make in (ds.to_tf_dataset, ds.to_torch_dataloader):
        with pytest.raises(ConfigError) as err:
            make(**kw)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    name = next(k for k in kw if k != "batch_size") if len(kw) > 1 else "batch_size"
    assert name in messages[0]


@pytest.mark.parametrize("kw", [
    {"shuffle": True, "seed": 9},
    {"buffer_size": 300},
    {"shuffle": True, "seed": 9, "drop_remainder": True, "padding_side": "left"},
    {"shuffle": True, "seed": 9, "world_size": 2, "rank": 1},
    {"world_size": 2, "rank": 0},
    {"cycle_length": 1},
    {"cycle_length": 1, "drop_remainder": True},
])
def test_bucketed_batches_are_identical_in_both_frameworks(shards, kw):
    """Length buckets follow one rule (``common.window_batches``: a window of records sorted by
    bucket, full batches shuffled): where both read the same records in the same order (the
    epoch plan; unshuffled with ``cycle_length=1``, one shard file after the other) the batches
    are the same, record for record and pad for pad. (With several shard files interleaved,
    tf.data's unshuffled stream differs from PyTorch's shard-by-shard one, with or without
    buckets.)"""
    pytest.importorskip("tensorflow")
    pytest.importorskip("torch")
    ds = dlpipe.load_dataset(shards)
    kw = {"bucket_boundaries": [8, 16, 24, 32], **kw}
    if "buffer_size" in kw:  # ds.shuffle: windows of 64 batches (the least for buckets), 6 of them
        ds = ds.shuffle(seed=9, buffer_size=kw.pop("buffer_size"))
    cycle = {"cycle_length": kw.pop("cycle_length")} if "cycle_length" in kw else {}
    drop = kw.pop("drop_remainder", False)
    # batches of 8: windows of 125 batches (the default 1000-record buffer), 3 of them
    got_tf = [({k: v.numpy() for k, v in f.items()}, y.numpy())
              for f, y in ds.to_tf_dataset(batch_size=8, columns=["input_ids", "attention_mask"],
                                           label_cols="labels", drop_remainder=drop, **cycle, **kw)]
    got_torch = [({k: v.numpy() for k, v in b.items() if k != "labels"}, b["labels"].numpy())
                 for b in ds.to_torch_dataloader(batch_size=8, drop_last=drop, **kw)]
    assert_same_batches(got_tf, got_torch)
    widths = [f["input_ids"].shape[1] for f, _ in got_tf]
    assert all(w in (8, 16, 24, 32) or w > 32 for w in widths) and len(set(widths)) > 2
