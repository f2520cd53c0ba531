import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.errors import ConfigError
from dlpipe.reshard.plan import balance, parse_splits, plan_shards, split_bounds


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1000), max_size=300), st.integers(1, 17))
def test_balance_covers_every_record_once_and_evenly(costs, k):
    costs = np.array(costs, dtype=np.float64)
    cuts = balance(costs, k)
    assert np.array_equal(cuts, balance(costs, k, block=7))  # blocked sums cut in the same places
    assert np.array_equal(cuts, balance(costs.astype(np.uint16), k, block=5))  # integer lengths: exact sums
    assert cuts[0] == 0 and cuts[-1] == len(costs) and np.all(np.diff(cuts) >= 0) and len(cuts) == k + 1
    if len(costs) >= k:
        assert np.all(np.diff(cuts) >= 1)  # no empty shard while another holds several
        cum = np.concatenate([[0], np.cumsum(costs)])
        sums = cum[cuts[1:]] - cum[cuts[:-1]]
        # each shard is within about one record's cost of the ideal share
        assert np.all(np.abs(sums - costs.sum() / k) <= 2 * costs.max() + 1e-9)


def test_multiple_of_and_names():
    tasks = plan_shards(np.ones(100), split_bounds(100, {"train": 0.8, "validation": 0.2}), suffix=".tfrecord",
                        num_shards=5, shard_size=None, multiple_of=4)
    train = [t for t in tasks if t.split == "train"]
    assert len(train) == 8 and train[0].filename == "train-00000-of-00008.tfrecord"
    assert sum(t.num_records for t in tasks) == 100
    assert all(len([t for t in tasks if t.split == s]) % 4 == 0 for s in ("train", "validation"))


def test_split_parsing():
    assert parse_splits("train=0.9,validation=0.1") == {"train": 0.9, "validation": 0.1}
    for bad in ("train=0.5", "train", "train=x", "a b=1"):
        with pytest.raises(ConfigError):
            parse_splits(bad)
