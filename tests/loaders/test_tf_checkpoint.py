"""``tf.train.Checkpoint(iterator=...)`` of ``to_tf_dataset``'s planned pipelines
(``loaders.tf_plan``: the global shuffle, a split over ranks, buckets, unbatched, compressed,
remote, mixtures, packing): saved at the first batch, inside a window, at a window's and an
element's edge, before the epoch's last batch and in the second epoch of the same dataset, and
restored into a fresh iterator of a dataset built again, the batches go on as in an
uninterrupted run (tests/resume_helper.py). The front-to-back pipelines' checkpoints are in
test_tf_loader.py and test_tf_buckets.py."""

from __future__ import annotations

import numpy as np
import pytest
from resume_helper import plain, run_save_load_state, tf_checkpoint
from token_rows import padded_tokens

import dlpipe

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")

from dlpipe.loaders import tf_data, tf_plan  # noqa: E402

N = 300  # records; labels[:, 0] is the record number


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """N records of lengths 0..24 in 3 shards, plain and gzip-compressed."""
    d = tmp_path_factory.mktemp("planned")
    ids, _ = padded_tokens(np.random.default_rng(7), N, 24)
    np.save(d / "input_ids.npy", ids)
    np.save(d / "labels.npy", np.arange(N, dtype=np.float32)[:, None] + np.zeros((1, 2), np.float32))
    out = {}
    for compression in (None, "gzip"):
        root = d / f"out-{compression}"
        dlpipe.reshard([str(d / "input_ids.npy"), str(d / "labels.npy")], root, pad_id=0, num_shards=3,
                       workers=1, progress=False, compression=compression)
        out[compression] = str(root)
    return out


@pytest.fixture(autouse=True)
def small_elements(monkeypatch):
    """Elements of at least 100 records (several windows of 40 each; several elements an epoch),
    unbatched chunks of 16 records (windows of 48)."""
    monkeypatch.setattr(tf_plan, "_CHUNK_RECORDS", 100)
    monkeypatch.setattr(tf_data, "_CHUNK", 16)


SHUFFLED = {"seed": 3, "buffer_size": 40}  # windows of 40 records: 5 batches of 8
# name: (compression, ds.shuffle arguments or None, loader arguments, items an epoch, stops)
CASES = {
    # elements: windows [0, 3) (15 batches), [3, 6), [6, 8) (7 full batches), the last batch (4)
    "shuffled": (None, SHUFFLED, {"batch_size": 8}, 38, (1, 7, 10, 15, 37, 38)),
    "shuffled by the loader": (None, None, {"batch_size": 8, "shuffle": True, "seed": 5}, 38, (1, 20, 37)),
    "drop_remainder": (None, SHUFFLED, {"batch_size": 8, "drop_remainder": True}, 37, (1, 15, 36)),
    # 150 records of rank 1: windows of 40, 40, 40, 30; the last batch (6 records) on its own
    "world_size 2, rank 1": (None, SHUFFLED, {"batch_size": 8, "world_size": 2, "rank": 1}, 19, (1, 5, 15, 18)),
    "unshuffled ranks": (None, None, {"batch_size": 8, "world_size": 2, "rank": 1}, 19, (1, 9, 18)),
    # windows of 64 batches of 2 (128, 128, 44 records), an element each
    "buckets": (None, SHUFFLED, {"batch_size": 2, "bucket_boundaries": [8, 16, 24]}, 150, (1, 30, 64, 128, 149)),
    "buckets, ranks, drop": (None, SHUFFLED, {"batch_size": 2, "bucket_boundaries": "auto", "world_size": 2,
                                              "rank": 1, "drop_remainder": True}, 75, (1, 64, 74)),
    # records: chunks of 16, windows of 48; elements of windows [0, 3) and [3, 6), then 12 records
    "unbatched": (None, SHUFFLED, {}, N, (1, 20, 48, 144, 299)),
    # compressed: read as one stream; a restored iterator starts one at its element
    "gzip, ranks": ("gzip", SHUFFLED, {"batch_size": 8, "world_size": 2, "rank": 0}, 19, (1, 7, 15, 18)),
}


def build(root: str, shuffled: dict | None, kw: dict):
    ds = dlpipe.load_dataset(root)
    if shuffled is not None:
        ds = ds.shuffle(**shuffled)
    return ds.to_tf_dataset(**kw)


@pytest.mark.parametrize("case", list(CASES))
def test_planned_iterator_resumes_exactly(corpora, tmp_path, case):
    compression, shuffled, kw, items, stops = CASES[case]
    how = tf_checkpoint(str(tmp_path / "ckpt"))
    full = run_save_load_state(lambda: build(corpora[compression], shuffled, kw), stops, how=how)
    assert len(full) == items


PACKED = {  # pack windows of 60 records: 5 an epoch (3 a rank), 2 to 5 batches of 4 rows each
    "rows, shuffled": {"shuffle": True, "seed": 2},
    "rows, world_size 2, rank 1": {"shuffle": True, "seed": 2, "world_size": 2, "rank": 1},
    "rows, ranks, drop": {"world_size": 2, "rank": 0, "uneven": "drop"},
    "flat, shuffled": {"shuffle": True, "seed": 2, "packing": "flat"},
}


@pytest.mark.parametrize("case", list(PACKED))
def test_packed_iterator_resumes_exactly(corpora, tmp_path, case):
    """Packed batches (``loaders.tf_packed``): an element per pack window, by number."""
    kw = {"packing": True, "max_length": 48, "max_segments": 8, "batch_size": 4, "pack_window": 60, **PACKED[case]}
    make = lambda: dlpipe.load_dataset(corpora[None]).to_tf_dataset(**kw)  # noqa: E731
    items = len(list(make()))
    assert items >= 10
    how = tf_checkpoint(str(tmp_path / "ckpt"))
    run_save_load_state(make, sorted({*range(1, items, 3), items - 1}), how=how)


@pytest.mark.parametrize("shuffle", [False, True])
def test_mixture_iterator_resumes_exactly(tmp_path, shuffle):
    """``interleave_datasets``: the mixture's windows (``plan_windows``) through the same path."""
    sources = []
    for k, n in enumerate((120, 80)):
        root = tmp_path / f"source-{k}"
        root.mkdir()
        ids, _ = padded_tokens(np.random.default_rng(k), n, 16)
        np.save(root / "input_ids.npy", ids)
        np.save(root / "rid.npy", np.arange(n, dtype=np.int64) + 1000 * k)
        dlpipe.reshard([str(root / "input_ids.npy"), str(root / "rid.npy")], root / "out", pad_id=0, num_shards=2,
                       workers=1, progress=False, int_encoding="int64_list")
        sources.append(str(root / "out"))

    def make():
        mix = dlpipe.interleave_datasets([dlpipe.load_dataset(r) for r in sources], probabilities=[0.4, 0.6],
                                         seed=2, stopping_strategy="all_exhausted")
        if shuffle:
            mix = mix.shuffle(seed=5, buffer_size=40)
        return mix.to_tf_dataset(batch_size=8, columns=["input_ids", "rid"])

    how = tf_checkpoint(str(tmp_path / "ckpt"))
    full = run_save_load_state(make, (1, 5, 12), how=how)
    assert len(full) > 13


def record_ids(batches: list) -> list[int]:
    return [int(v) for b in batches for v in np.reshape(b["labels"], (-1, 2))[:, 0]]


def test_planned_pipelines_are_shuffled_with_python_only_in_the_reads(corpora):
    """The cases above are what they say: shuffled, each record once, elements made in Python
    (numpy_function), no from_generator."""
    full = [plain(b) for b in build(corpora[None], SHUFFLED, {"batch_size": 8})]
    ids = record_ids(full)
    assert sorted(ids) == list(range(N)) and ids != list(range(N))
    graph = tf.compat.v1.GraphDef.FromString(build(corpora[None], SHUFFLED, {"batch_size": 8})
                                             ._as_serialized_graph().numpy())
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert {"PyFunc", "FlatMapDataset", "RangeDataset"} <= ops and "GeneratorDataset" not in ops, ops


@pytest.mark.parametrize("case", ["shuffled", "buckets", "gzip, ranks"])
def test_checkpoint_in_the_second_epoch_of_a_dataset(corpora, tmp_path, case):
    """A dataset's second iterator plays the next epoch; its checkpoint holds that epoch, so an
    iterator of a dataset built again (its first) goes on in it, and that dataset's next iterator
    plays the epoch after it, as the uninterrupted dataset's third does."""
    compression, shuffled, kw, items, _ = CASES[case]
    make = lambda: build(corpora[compression], shuffled, kw)  # noqa: E731
    tfds = make()
    epochs = [[plain(b) for b in tfds] for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and len(epochs[1]) == items

    def played_once():
        data = make()
        for _ in data:
            pass
        return data

    how = tf_checkpoint(str(tmp_path / "ckpt"))
    assert run_save_load_state(played_once, (1, items // 2), how=how, restore_into=make) == epochs[1]
    for k in (1, items - 1, items):  # the last batch, and after it (the iterator not yet run out)
        it = iter(played_once())
        for _ in range(k):
            next(it)
        path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / f"second-{k}"))
        restored = make()
        it = iter(restored)
        tf.train.Checkpoint(iterator=it).read(path).assert_consumed()
        assert [plain(b) for b in it] == epochs[1][k:]
        assert [plain(b) for b in restored] == epochs[2], k


PACKED_ROWS = {"batch_size": 4, "packing": True, "max_length": 24, "pack_window": 100}
OTHER_PLANS = {  # saved with (shuffle, loader arguments), restored into a dataset built with others
    "seed": ((SHUFFLED, {"batch_size": 8}), ({**SHUFFLED, "seed": 4}, {"batch_size": 8})),
    "buffer_size": ((SHUFFLED, {"batch_size": 8}), ({**SHUFFLED, "buffer_size": 48}, {"batch_size": 8})),
    "batch_size": ((SHUFFLED, {"batch_size": 8}), (SHUFFLED, {"batch_size": 12})),
    "rank": ((SHUFFLED, {"batch_size": 8, "world_size": 2, "rank": 0}),
             (SHUFFLED, {"batch_size": 8, "world_size": 2, "rank": 1})),
    "packing seed": ((SHUFFLED, PACKED_ROWS), ({**SHUFFLED, "seed": 4}, PACKED_ROWS)),
}


@pytest.fixture(scope="module")
def longer(tmp_path_factory):
    """3,000 records in 3 shards: epochs of ~30 elements, more than tf.data buffers ahead."""
    d = tmp_path_factory.mktemp("longer")
    ids, _ = padded_tokens(np.random.default_rng(8), 3000, 24)
    np.save(d / "input_ids.npy", ids)
    dlpipe.reshard([str(d / "input_ids.npy")], d / "out", pad_id=0, num_shards=3, workers=1, progress=False)
    return str(d / "out")


@pytest.mark.parametrize("case", list(OTHER_PLANS))
def test_checkpoint_restored_into_another_plan_is_refused(longer, tmp_path, case):
    """A checkpoint restored into a dataset built with other arguments (the same pipeline
    graph, another epoch plan) fails with dlpipe's message at once, instead of playing the
    other plan from the saved position (records skipped or repeated unseen); the same
    arguments still resume. (Arguments that leave the plan's record order as it was, such as a
    batch size that divides the same windows, resume it.)"""
    (saved_shuffle, saved_kw), (other_shuffle, other_kw) = OTHER_PLANS[case]
    it = iter(build(longer, saved_shuffle, saved_kw))
    for _ in range(3):
        next(it)
    path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "ckpt"))
    rest = [plain(b) for b in it]
    restored = iter(build(longer, other_shuffle, other_kw))
    with pytest.raises(tf.errors.OpError, match="restored from a checkpoint of a dataset built with other"):
        tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
        next(restored)
    again = iter(build(longer, saved_shuffle, saved_kw))
    tf.train.Checkpoint(iterator=again).read(path).assert_consumed()
    assert [plain(b) for b in again] == rest


def test_checkpoint_inside_repeat(corpora, tmp_path):
    """``repeat()``: each pass plays the next epoch; a checkpoint in the second pass resumes there."""
    _, shuffled, kw, items, _ = CASES["shuffled"]
    how = tf_checkpoint(str(tmp_path / "ckpt"))
    full = run_save_load_state(lambda: build(corpora[None], shuffled, kw).repeat(2), (items, items + 9), how=how)
    assert len(full) == 2 * items and full[:items] != full[items:]


def test_static_batch_size_with_drop_remainder(corpora):
    spec = build(corpora[None], SHUFFLED, {"batch_size": 8, "drop_remainder": True}).element_spec
    assert spec["input_ids"].shape.as_list() == [8, None]


@pytest.mark.parametrize("kind", ["range reads", "cached"])
def test_remote_planned_iterator_resumes_exactly(s3_server, corpora, tmp_path, kind):
    """Over object storage the windows are read ahead as one stream (``read_windows``); a
    restored iterator starts a stream at its element, and the batches are the local ones."""
    url = s3_server.upload(corpora[None], "s3://dlpipe/planned")
    cache = {"cache_dir": str(tmp_path / "cache")} if kind == "cached" else {}
    shuffled = {**SHUFFLED, "block_records": 16}  # blocks over object storage default to >= 1 MiB
    kw = {"batch_size": 8}

    def make():
        ds = dlpipe.load_dataset(url, storage_options=s3_server.storage_options, request_bytes=3000, **cache)
        return ds.shuffle(**shuffled).to_tf_dataset(**kw)

    how = tf_checkpoint(str(tmp_path / "ckpt"))
    full = run_save_load_state(make, (1, 10, 37), how=how)
    assert full == [plain(b) for b in build(corpora[None], shuffled, kw)]
