"""``interleave_datasets``: HF's semantics (the same source draws as HF for a seed), proportions,
stopping strategies, exactly-once splits, both frameworks, and the errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from resume_helper import run_save_load_state

import dlpipe
from dlpipe.errors import ConfigError
from dlpipe.loaders.mixture import source_choices


def make_source(root, n, base, *, seed=0, shards=3, vocab=100, **kw):
    """``n`` records with a ``rid`` column = base + record number, resharded into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 20, n)
    ids = np.zeros((n, 24), np.int32)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(1, vocab, k)
    np.save(root / "input_ids.npy", ids)
    np.save(root / "rid.npy", (np.arange(n) + base).astype(np.int64))
    dlpipe.reshard([str(root / "input_ids.npy"), str(root / "rid.npy")], root / "out", pad_id=0, num_shards=shards,
                   workers=1, progress=False, sequence_columns=["input_ids"], **kw)
    return dlpipe.load_dataset(root / "out")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    # b's ids stay below 2**8 and its rids need 2 bytes: stored narrower than a's, as separately
    # resharded datasets usually are
    a = make_source(root / "a", 300, 0)
    b = make_source(root / "b", 100, 10_000, seed=1, vocab=50)
    return a, b


def rids(records):
    return [int(r["rid"]) for r in records]


def torch_rids(loader):
    return [int(x) for batch in loader for x in batch["rid"]]


# -- HF semantics ------------------------------------------------------------------------------


def hf_sources(lengths, probabilities, seed, stopping):
    datasets = pytest.importorskip("datasets")
    parts = [datasets.IterableDataset.from_generator(lambda i=i, n=n: ({"s": i} for _ in range(n)))
             for i, n in enumerate(lengths)]
    mixed = datasets.interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy=stopping)
    return np.array([r["s"] for r in mixed])


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), weighted=st.booleans(),
       seed=st.integers(0, 2**31 - 1), stopping=st.sampled_from(["first_exhausted", "all_exhausted"]),
       data=st.data())
def test_source_draws_are_hfs(lengths, weighted, seed, stopping, data):
    """The sequence of sources (length and order) is HF 5.x's for the same inputs and seed."""
    p = None
    if weighted:
        w = np.array(data.draw(st.lists(st.integers(1, 9), min_size=len(lengths), max_size=len(lengths))), float)
        p = (w / w.sum()).tolist()
    assert np.array_equal(source_choices(lengths, p, seed, stopping), hf_sources(lengths, p, seed, stopping))


@pytest.mark.parametrize("stopping", ["first_exhausted", "all_exhausted"])
def test_proportions_hold_within_sampling_error(stopping):
    p = np.array([0.6, 0.3, 0.1])
    choices = source_choices([200_000, 100_000, 40_000], p.tolist(), 7, stopping)
    n = len(choices)
    share = np.bincount(choices, minlength=3) / n
    assert np.all(np.abs(share - p) < 4 * np.sqrt(p * (1 - p) / n))


def test_round_robin_and_stopping_strategies(sources):
    a, b = sources
    first = rids(dlpipe.interleave_datasets([a, b]))
    assert first[:4] == [0, 10_000, 1, 10_001] and len(first) == 200  # b ends after its 100th record
    every = rids(dlpipe.interleave_datasets([a, b], stopping_strategy="all_exhausted"))
    assert len(every) == 599 and sorted(set(every)) == list(range(300)) + list(range(10_000, 10_100))
    assert collections.Counter(every)[10_000] == 3  # ends after a's last record; b started over twice


@pytest.mark.parametrize("stopping", ["first_exhausted", "all_exhausted"])
def test_each_draw_reads_the_next_record_of_its_source(sources, stopping):
    """Unshuffled, position p holds source choices[p]'s next record, in the source's order."""
    a, b = sources
    mix = dlpipe.interleave_datasets([a, b], probabilities=[0.7, 0.3], seed=4, stopping_strategy=stopping)
    got = rids(mix)
    choices = source_choices([300, 100], [0.7, 0.3], 4, stopping)
    want, seen = [], [0, 0]
    for c in choices.tolist():
        want.append((seen[c] % (300, 100)[c]) + (0, 10_000)[c])
        seen[c] += 1
    assert got == want


# -- in the loaders ----------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (2, 2)])
def test_torch_splits_a_shuffled_mixture_exactly_once(sources, workers, world):
    pytest.importorskip("torch")
    a, b = sources
    mix = dlpipe.interleave_datasets([a, b], probabilities=[0.5, 0.5], seed=1, stopping_strategy="all_exhausted")
    expected = collections.Counter(rids(mix.shuffle(seed=3)))  # the records oversampled depend on the shuffle
    got, counts = [], []
    for rank in range(world):
        loader = mix.to_torch_dataloader(batch_size=8, shuffle=True, seed=3, num_workers=workers, world_size=world,
                                         rank=rank, uneven="drop")
        mine = torch_rids(loader)
        got += mine
        counts.append(len(mine))
    assert len(set(counts)) == 1
    missing = expected - collections.Counter(got)
    assert sum(missing.values()) < world and not collections.Counter(got) - expected  # drop: < world left out
    assert got != rids(mix)


@pytest.mark.torch
def test_shuffle_changes_each_epoch_and_is_seeded(sources):
    pytest.importorskip("torch")
    a, b = sources
    mix = dlpipe.interleave_datasets([a, b], probabilities=[0.5, 0.5], seed=1).shuffle(seed=9)
    loader = mix.to_torch_dataloader(batch_size=10)
    e0 = torch_rids(loader)
    loader.set_epoch(1)
    e1 = torch_rids(loader)
    again = torch_rids(mix.to_torch_dataloader(batch_size=10))
    assert e0 == again and e0 != e1


@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.parametrize("shuffle", [True, False])
def test_tf_and_torch_read_the_same_batches(tmp_path, shuffle):
    """With one layout (``--int-encoding int64_list``) tf.data parses every source's records."""
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    a = make_source(tmp_path / "a", 120, 0, int_encoding="int64_list")
    b = make_source(tmp_path / "b", 80, 10_000, seed=1, vocab=50, int_encoding="int64_list")
    mix = dlpipe.interleave_datasets([a, b], probabilities=[0.4, 0.6], seed=2, stopping_strategy="all_exhausted")
    kw = {"batch_size": 8, "shuffle": shuffle, "seed": 5}
    tf_batches = [b["rid"].numpy().tolist() for b in mix.to_tf_dataset(**kw, columns=["input_ids", "rid"])]
    torch_batches = [b["rid"].tolist() for b in mix.to_torch_dataloader(**kw)]
    assert tf_batches == torch_batches
    assert sum(len(b) for b in tf_batches) == len(mix)


@pytest.mark.torch
def test_sources_stored_differently_decode_each_with_its_own_layout(sources):
    pytest.importorskip("torch")
    a, b = sources
    assert a.info.columns["rid"] != b.info.columns["rid"]  # the fixture's point
    mix = dlpipe.interleave_datasets([a, b])
    batches = list(mix.to_torch_dataloader(batch_size=16))
    ids = {int(r): batch["input_ids"][k] for batch in batches for k, r in enumerate(batch["rid"])}
    for ds in (a, b):
        for rec in list(ds)[:20]:
            row = ids[int(rec["rid"])]
            assert row[: len(rec["input_ids"])].tolist() == rec["input_ids"].tolist()
    assert sorted(ids) == sorted(rids(mix))


@pytest.mark.tf
def test_tf_refuses_sources_stored_differently(sources):
    pytest.importorskip("tensorflow")
    with pytest.raises(ConfigError, match="--int-encoding int64_list") as err:
        dlpipe.interleave_datasets(list(sources)).to_tf_dataset(batch_size=4)
    assert "\n" not in str(err.value)


@pytest.mark.torch
def test_packing_and_buckets_over_a_mixture(sources):
    pytest.importorskip("torch")
    a, b = sources
    mix = dlpipe.interleave_datasets([a, b], probabilities=[0.5, 0.5], seed=0, stopping_strategy="all_exhausted")
    want = sorted(rids(mix.shuffle(seed=1)))
    packed = mix.to_torch_dataloader(batch_size=4, packing=True, max_length=48, shuffle=True, seed=1)
    got = sorted(int(r) for batch in packed for r, m in zip(batch["rid"].flatten(), batch["segment_mask"].flatten())
                 if m)
    assert got == want
    bucketed = mix.to_torch_dataloader(batch_size=8, bucket_boundaries="auto", shuffle=True, seed=1)
    assert sorted(torch_rids(bucketed)) == want


# -- errors ------------------------------------------------------------------------------------


def test_columns_must_agree_or_be_selected(sources):
    a, b = sources
    with pytest.raises(ConfigError, match=r"select_columns\(\['input_ids'\]\)"):
        dlpipe.interleave_datasets([a, b.select_columns(["input_ids"])])
    mix = dlpipe.interleave_datasets([a.select_columns(["input_ids"]), b.select_columns(["input_ids"])])
    assert mix.column_names == ["input_ids"] and len(list(mix)) == 200


@pytest.mark.parametrize("kw,match", [
    ({"probabilities": [0.5, 0.6]}, "summing to 1"),
    ({"probabilities": [1.0]}, "one weight"),
    ({"stopping_strategy": "longest"}, "stopping_strategy"),
    ({"probabilities": [1.0, 0.0], "stopping_strategy": "all_exhausted"}, "never"),
])
def test_bad_options_get_one_line_errors(sources, kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        dlpipe.interleave_datasets(list(sources), **kw)
    assert "\n" not in str(err.value)


def test_compressed_sources_are_refused(tmp_path, sources):
    gz = make_source(tmp_path / "gz", 30, 50_000, compression="gzip")
    with pytest.raises(ConfigError, match="--compression none"):
        dlpipe.interleave_datasets([sources[0], gz])


@pytest.mark.torch
def test_unseeded_weights_are_refused_across_ranks(sources):
    pytest.importorskip("torch")
    mix = dlpipe.interleave_datasets(list(sources), probabilities=[0.5, 0.5])
    with pytest.raises(ConfigError, match="seed"):
        mix.to_torch_dataloader(batch_size=4, world_size=2, rank=0)


@pytest.mark.torch
@pytest.mark.parametrize("stateful", [False, True])
def test_a_mixture_resumes_exactly_in_both_loaders(sources, stateful):
    """``state_dict`` mid-epoch, dlpipe's loader and torchdata's StatefulDataLoader, 2 workers."""
    pytest.importorskip("torch")
    if stateful:
        pytest.importorskip("torchdata")
    mix = dlpipe.interleave_datasets(list(sources), probabilities=[0.6, 0.4], seed=5).shuffle(seed=2)

    def make():
        return mix.to_torch_dataloader(batch_size=8, num_workers=2, stateful=stateful)

    full = run_save_load_state(make, (0, 3, 11), key=lambda b: b["rid"].tolist())
    assert sorted(r for b in full for r in b) == sorted(rids(mix))
