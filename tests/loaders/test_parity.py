"""TF and PyTorch loaders agree: same samples per epoch, same padding rule, same bucket shapes."""

from __future__ import annotations

import numpy as np
import pytest

import dlpipe
from dlpipe.loaders.common import default_boundaries, padded_length

pytestmark = [pytest.mark.tf, pytest.mark.torch]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import padded_tokens

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
