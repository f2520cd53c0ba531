"""``LoaderOptions`` (checked once, one set of messages) and ``resolve_shuffle`` (one rule), with
no framework imported."""

from __future__ import annotations

import numpy as np
import pytest

import dlpipe
from dlpipe.errors import ConfigError
from dlpipe.loaders.options import LoaderOptions, ShuffleConfig, resolve_shuffle


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from token_rows import padded_tokens

    d = tmp_path_factory.mktemp("options")
    ids, _ = padded_tokens(np.random.default_rng(0), 200, 16)
    np.save(d / "input_ids.npy", ids)
    np.save(d / "labels.npy", np.arange(200, dtype=np.float32)[:, None])
    dlpipe.reshard([str(d / "input_ids.npy"), str(d / "labels.npy")], d / "out", pad_id=0, num_shards=2,
                   workers=1, progress=False)
    return d / "out"


@pytest.mark.parametrize("kw, words", [
    ({"batch_size": 0}, "batch_size=0; use an int >= 1"),
    ({"batch_size": 2.5}, "batch_size=2.5"),
    ({"pad_to_multiple_of": -8}, "pad_to_multiple_of=-8; use None or an int >= 1"),
    ({"padding_side": "middle"}, "padding_side='middle'; use 'right' or 'left'"),
    ({"batch_size": 4, "bucket_boundaries": "quantiles"}, "bucket_boundaries='quantiles'; use 'auto' or"),
    ({"batch_size": 4, "bucket_boundaries": [8, 8]}, "strictly increasing list of lengths >= 1"),
    ({"batch_size": 4, "bucket_boundaries": []}, r"bucket_boundaries=\[\]"),
    ({"bucket_boundaries": "auto"}, "needs a batch_size"),
    ({"seed": -1}, "seed=-1"),
    ({"world_size": 2}, "pass both world_size and rank, or neither"),
    ({"world_size": 2, "rank": 2}, "rank=2, world_size=2"),
    ({"uneven": "wrap"}, "uneven='wrap'; use 'pad' or 'drop'"),
    ({"columns": ["a", "a"]}, "duplicates"),
    ({"label_cols": "labels"}, "needs columns too"),
])
def test_every_message_names_parameter_value_and_what_is_valid(kw, words):
    with pytest.raises(ConfigError, match=words):
        LoaderOptions(**kw)


def test_values_are_normalized_and_frozen():
    opts = LoaderOptions(batch_size=np.int64(8), bucket_boundaries=[np.int64(4), 8], columns="input_ids",
                         label_cols=["labels"], seed=np.int32(3))
    assert opts.batch_size == 8 and type(opts.batch_size) is int
    assert opts.bucket_boundaries == (4, 8) and opts.columns == ("input_ids",) and opts.label_cols == ("labels",)
    assert type(opts.seed) is int
    with pytest.raises(AttributeError):
        opts.batch_size = 4  # type: ignore[misc]
    assert opts.with_world(4, 3).rank == 3
    with pytest.raises(ConfigError, match="rank=4"):
        opts.with_world(4, 4)


def test_boundaries_and_columns_against_a_dataset(root):
    ds = dlpipe.load_dataset(root)
    enc = ds.info.columns
    auto = LoaderOptions(batch_size=4, bucket_boundaries="auto", pad_to_multiple_of=4)
    assert auto.boundaries(ds.info, enc) and all(b % 4 == 0 or b == 16 for b in auto.boundaries(ds.info, enc))
    with pytest.raises(ConfigError, match="needs a variable-length column"):
        auto.boundaries(ds.info, {"labels": enc["labels"]})
    assert LoaderOptions(batch_size=4).boundaries(ds.info, enc) is None
    with pytest.raises(ConfigError, match=r"columns \['nope'\] are not in"):
        LoaderOptions(columns=["nope", "attention_mask"]).check_columns(ds.info, ds.columns)


def test_resolve_shuffle_rule(root):
    ds = dlpipe.load_dataset(root)
    assert ds.shuffle_config == ShuffleConfig(shuffled=False, seed=None, seed_given=False, buffer_size=1000,
                                              block_records=None, epoch=0)
    same, cfg = resolve_shuffle(ds, LoaderOptions())
    assert same is ds and not cfg.shuffled and cfg.plan_seed == 0
    # unseeded: a random seed per call, recorded
    seeds = {resolve_shuffle(ds, LoaderOptions(shuffle=True))[1].seed for _ in range(4)}
    assert len(seeds) > 1 and None not in seeds
    # a loader seed shuffles, or reseeds a shuffled dataset, keeping its buffer and blocks
    shuffled = ds.shuffle(seed=1, buffer_size=50, block_records=3)
    _, cfg = resolve_shuffle(shuffled, LoaderOptions(seed=7))
    assert (cfg.shuffled, cfg.seed, cfg.seed_given, cfg.buffer_size, cfg.block_records) == (True, 7, True, 50, 3)
    # a shuffled dataset is shuffled either way, with its own seed unless one is given
    kept, cfg = resolve_shuffle(shuffled, LoaderOptions(shuffle=False))
    assert kept is shuffled and cfg.seed == 1
    drawn = ds.shuffle()
    assert resolve_shuffle(drawn, LoaderOptions(shuffle=True))[1].seed == drawn.shuffle_config.seed
    drawn.set_epoch(3)
    assert drawn.shuffle_config.epoch == 3
    # several ranks must agree: a seed given somewhere
    with pytest.raises(ConfigError, match="same seed"):
        resolve_shuffle(ds, LoaderOptions(shuffle=True, world_size=2, rank=0))
    with pytest.raises(ConfigError, match="same seed"):
        resolve_shuffle(drawn, LoaderOptions(world_size=2, rank=1))
    assert resolve_shuffle(ds, LoaderOptions(shuffle=True, seed=0, world_size=2, rank=1))[1].seed == 0


def test_no_framework_is_imported():
    import subprocess
    import sys

    code = ("import sys, dlpipe.loaders.options, dlpipe.loaders.dataset; "
            "print([m for m in ('tensorflow', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
