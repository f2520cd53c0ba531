"""``to_tf_dataset``: round trips, the shared padding rule, HF structure, shuffling, buckets,
MirroredStrategy, corrupt shards. CPU only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections import Counter

import numpy as np
import pytest
from resume_helper import run_save_load_state, tf_checkpoint
from token_rows import padded_tokens

import dlpipe
from dlpipe.errors import ConfigError
from dlpipe.loaders.collate import collate, default_boundaries, padded_length

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")


def make_corpus(root, *, n=300, width=24, pad_id=0, vocab=120, seed=0, extra=False, **reshard_kw):
    """Padded .npy columns resharded into ``root/out``; returns the source arrays and the dataset."""
    rng = np.random.default_rng(seed)
    ids, lengths = padded_tokens(rng, n, width, pad_id=pad_id, vocab=vocab)
    cols = {
        "input_ids": ids,
        "labels": np.arange(n, dtype=np.float32)[:, None] + np.zeros((1, 2), np.float32),
    }
    seq = ["input_ids"]
    if extra:  # a float and a (None, 3) sequence column padded at the same positions
        real = np.arange(width)[None, :] < lengths[:, None]
        cols["weights"] = np.where(real, rng.normal(size=(n, width)), 0).astype(np.float32)
        cols["xyz"] = np.where(real[..., None], rng.normal(size=(n, width, 3)), 0).astype(
            np.float32
        )
        seq += ["weights", "xyz"]
    for name, arr in cols.items():
        np.save(root / f"{name}.npy", arr)
    dlpipe.reshard(
        [str(root / f"{n}.npy") for n in cols],
        root / "out",
        pad_id=pad_id,
        num_shards=3,
        workers=1,
        progress=False,
        sequence_columns=seq,
        **reshard_kw,
    )
    return cols, lengths, dlpipe.load_dataset(root / "out")


def batches(tfds) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in b.items()} for b in tfds]


def record_ids(tfds) -> list[int]:
    """Record numbers (labels[:, 0]) in yield order."""
    return [int(v) for b in tfds for v in b["labels"][:, 0].numpy()]


def ragged(arr: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    inner = arr.shape[2:]
    values = np.concatenate([arr[i, :n] for i, n in enumerate(lengths)]).reshape(-1, *inner)
    return values.reshape(-1), splits * int(np.prod(inner, dtype=np.int64))


def expected_batch(ds, cols, lengths, rows, **rule) -> dict[str, np.ndarray]:
    """What ``collate.collate`` (the PyTorch/numpy side) makes of these source rows."""
    data = {}
    for name, enc in ds.info.columns.items():
        arr = cols[name][rows].astype(enc.dtype)
        fixed = (arr.reshape(-1), np.arange(len(rows) + 1) * enc.inner)
        data[name] = ragged(arr, lengths[rows]) if enc.variable else fixed
    return collate(data, ds.info.columns, ds.info.pad_values, **rule)


@pytest.mark.parametrize(
    "reshard_kw, rule",
    [
        ({"int_encoding": "raw"}, {}),
        ({"int_encoding": "int64_list"}, {"pad_to_multiple_of": 8}),
        ({"compression": "gzip", "int_encoding": "raw"}, {"padding_side": "left"}),
        (
            {"compression": "zlib", "int_encoding": "raw"},
            {"padding_side": "left", "pad_to_multiple_of": 5},
        ),
    ],
)
def test_batches_equal_common_collate(tmp_path, reshard_kw, rule):
    # pad id 7 (not 0) and ids past 65535 (uint32 storage) exercise pad fill-in and bitcasts
    cols, lengths, ds = make_corpus(tmp_path, pad_id=7, vocab=100_000, extra=True, **reshard_kw)
    if reshard_kw.get("int_encoding") == "int64_list":
        assert ds.info.columns["input_ids"].encoding == "int64_list"
    else:
        assert ds.info.columns["input_ids"].storage_dtype == "uint32"
    got = batches(ds.to_tf_dataset(batch_size=32, cycle_length=1, **rule))
    assert len(got) == -(-300 // 32)
    for i, batch in enumerate(got):
        want = expected_batch(ds, cols, lengths, np.arange(i * 32, min(300, i * 32 + 32)), **rule)
        assert batch.keys() == want.keys()
        for name in want:
            assert batch[name].dtype == want[name].dtype, name
            np.testing.assert_array_equal(batch[name], want[name], err_msg=name)


def test_unbatched_records_round_trip(tmp_path):
    cols, lengths, ds = make_corpus(tmp_path)
    rows = list(ds.to_tf_dataset(cycle_length=1))
    assert len(rows) == 300
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row["input_ids"].numpy(), cols["input_ids"][i, : lengths[i]])
        np.testing.assert_array_equal(row["attention_mask"].numpy(), np.ones(lengths[i], np.int64))
        np.testing.assert_array_equal(row["labels"].numpy(), cols["labels"][i])


def test_empty_records_and_batch_of_one(tmp_path):
    cols, lengths, ds = make_corpus(tmp_path, n=60, width=4)
    assert (lengths == 0).any()
    got = batches(ds.to_tf_dataset(batch_size=1, cycle_length=1))
    for i, b in enumerate(got):
        assert b["input_ids"].shape == (1, lengths[i])


def test_every_record_once_per_epoch_and_drop_remainder(tmp_path):
    _, _, ds = make_corpus(tmp_path)
    tfds = ds.to_tf_dataset(batch_size=32, shuffle=True, seed=3)
    for _ in range(2):
        assert sorted(record_ids(tfds)) == list(range(300))
    got = batches(ds.to_tf_dataset(batch_size=32, shuffle=True, seed=3, drop_remainder=True))
    assert [len(b["labels"]) for b in got] == [32] * (300 // 32)


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    _, _, ds = make_corpus(tmp_path)
    a = ds.to_tf_dataset(batch_size=16, shuffle=True, seed=1)
    first, second = record_ids(a), record_ids(a)
    assert first != list(range(300)) and first != second  # each iteration (Keras epoch) reshuffles
    b = ds.to_tf_dataset(batch_size=16, shuffle=True, seed=1)
    assert record_ids(b) == first and record_ids(b) == second
    assert record_ids(ds.to_tf_dataset(batch_size=16, shuffle=True, seed=2)) != first
    hf_style = ds.shuffle(seed=1, buffer_size=1000)  # ds.shuffle(seed) turns shuffling on, as in HF
    assert record_ids(hf_style.to_tf_dataset(batch_size=16)) == first
    hf_style.set_epoch(1)  # the epoch the second iteration of a dataset plays
    assert record_ids(hf_style.to_tf_dataset(batch_size=16)) == second


def test_buckets_use_boundary_shapes_and_pad_efficiently(tmp_path):
    # short strings: lengths 5..60 of 128
    rng = np.random.default_rng(0)
    n = 4000
    lengths = rng.integers(5, 61, n)
    ids = rng.integers(1, 100, (n, 128))
    ids[np.arange(128)[None, :] >= lengths[:, None]] = 0
    np.save(tmp_path / "input_ids.npy", ids)
    np.save(tmp_path / "labels.npy", np.arange(n, dtype=np.float32)[:, None])
    dlpipe.reshard(
        [str(tmp_path / "input_ids.npy"), str(tmp_path / "labels.npy")],
        tmp_path / "out",
        pad_id=0,
        num_shards=4,
        workers=1,
        progress=False,
    )
    ds = dlpipe.load_dataset(tmp_path / "out")
    bounds = default_boundaries(ds.info, "input_ids")
    tfds = ds.to_tf_dataset(batch_size=64, shuffle=True, seed=0, bucket_boundaries="auto")
    got = batches(tfds)
    assert sorted(int(v) for b in got for v in b["labels"][:, 0]) == list(range(n))
    assert {b["input_ids"].shape[1] for b in got} <= set(bounds)
    for b in got:  # each batch padded to the smallest boundary that fits its longest record
        longest = int(b["attention_mask"].sum(1).max())
        assert b["input_ids"].shape[1] == padded_length(longest, boundaries=bounds)
    real = sum(int(b["attention_mask"].sum()) for b in got)
    padded = sum(b["input_ids"].size for b in got)
    assert real / padded >= 0.9, (real / padded, bounds)
    plain = batches(ds.to_tf_dataset(batch_size=64, shuffle=True, seed=0))
    assert real / sum(b["input_ids"].size for b in plain) < real / padded


def test_explicit_boundaries_longer_records_pad_to_longest(tmp_path):
    _, _, ds = make_corpus(tmp_path)
    got = batches(ds.to_tf_dataset(batch_size=16, bucket_boundaries=[4, 8], pad_to_multiple_of=4))
    for b in got:
        longest = int(b["attention_mask"].sum(1).max())
        assert b["input_ids"].shape[1] == padded_length(
            longest, pad_to_multiple_of=4, boundaries=[4, 8]
        )


HF_CASES = [
    (None, None),
    ("input_ids", None),
    (["input_ids"], None),
    (["input_ids", "attention_mask"], None),
    ("input_ids", "labels"),
    (["input_ids", "attention_mask"], ["labels"]),
    (["input_ids", "attention_mask", "labels"], "labels"),
]


@pytest.mark.parametrize("columns, label_cols", HF_CASES)
def test_structure_matches_hf(tmp_path, columns, label_cols):
    datasets = pytest.importorskip("datasets")
    cols, lengths, ds = make_corpus(tmp_path, n=40, width=8)
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
    hf = datasets.Dataset.from_dict(
        {
            "input_ids": cols["input_ids"].tolist(),
            "labels": cols["labels"].tolist(),
            "attention_mask": mask.tolist(),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # HF warns about one-element lists
        want = hf.to_tf_dataset(batch_size=8, columns=columns, label_cols=label_cols).element_spec
    got = ds.to_tf_dataset(batch_size=8, columns=columns, label_cols=label_cols).element_spec
    tf.nest.assert_same_structure(got, want)
    flat_got, flat_want = tf.nest.flatten(got), tf.nest.flatten(want)
    assert [s.shape.rank for s in flat_got] == [s.shape.rank for s in flat_want]


def test_collate_fn_runs_in_graph_and_may_add_columns(tmp_path):
    _, _, ds = make_corpus(tmp_path, n=40)

    def add_lengths(batch, scale):
        return {**batch, "length": tf.reduce_sum(batch["attention_mask"], 1) * scale}

    tfds = ds.to_tf_dataset(
        batch_size=8,
        columns=["input_ids", "length"],
        label_cols="labels",
        collate_fn=add_lengths,
        collate_fn_args={"scale": 2},
        cycle_length=1,
    )
    x, y = next(iter(tfds))
    np.testing.assert_array_equal(x["length"].numpy(), 2 * (x["input_ids"].numpy() != 0).sum(1))
    assert y.shape == (8, 2)


def _graph_ops(tfds) -> set[str]:
    graph = tf.compat.v1.GraphDef.FromString(tfds._as_serialized_graph().numpy())
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


def test_graph_is_native(tmp_path):
    """Records are read, parsed and padded by graph ops; the only Python is the per-file
    SHA-256 check inside the function that opens a shard file."""
    _, _, ds = make_corpus(tmp_path, n=40)
    for kw in ({}, {"bucket_boundaries": "auto"}):
        tfds = ds.to_tf_dataset(batch_size=8, **kw)
        ops = _graph_ops(tfds)
        assert "GeneratorDataset" not in ops and {"ParseExampleV2", "ParallelInterleaveDatasetV4"} <= ops, ops
        graph = tf.compat.v1.GraphDef.FromString(tfds._as_serialized_graph().numpy())
        assert not {n.op for n in graph.node} & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
        with_python = [{n.op for n in f.node_def} for f in graph.library.function
                       if {n.op for n in f.node_def} & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}]
        assert len(with_python) == 1 and "BatchDatasetV2" in with_python[0]  # open_file, per shard file


def test_shuffled_graph_reads_in_python_once_per_chunk_and_parses_natively(tmp_path):
    """A global shuffle reads records out of order: dlpipe's reader does that (a Python call per
    numbered element of batches, see loaders.tf_plan; no from_generator, so it can be
    checkpointed); parsing and padding stay graph ops."""
    _, _, ds = make_corpus(tmp_path, n=40)
    for kw in ({}, {"bucket_boundaries": "auto"}):
        ops = _graph_ops(ds.to_tf_dataset(batch_size=8, shuffle=True, seed=0, **kw))
        assert {"ParseExampleV2", "PyFunc", "FlatMapDataset", "RangeDataset"} <= ops, ops
        assert "GeneratorDataset" not in ops, ops
        assert "ParallelInterleaveDatasetV4" not in ops, ops  # files are not read front to back


def test_options_shard_by_file_and_prefetch(tmp_path, monkeypatch):
    _, _, ds = make_corpus(tmp_path, n=40)
    policy = tf.data.experimental.AutoShardPolicy
    assert (
        ds.to_tf_dataset(batch_size=8).options().experimental_distribute.auto_shard_policy
        == policy.FILE
    )
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"worker": ["a:1", "b:1", "c:1", "d:1"]},
                "task": {"type": "worker", "index": 0},
            }
        ),
    )
    assert (
        ds.to_tf_dataset(batch_size=8).options().experimental_distribute.auto_shard_policy
        == policy.DATA
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"padding_side": "middle"}, "padding_side='middle'"),
        ({"label_cols": "labels"}, r"label_cols=\['labels'\] needs columns"),
        ({"columns": ["input_ids", "input_ids"]}, "duplicates"),
        ({"columns": ["nope"]}, "'nope'"),
        ({"bucket_boundaries": "auto"}, "needs a batch_size"),
        ({"batch_size": 4, "bucket_boundaries": [8, 4]}, "strictly increasing"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 4, "uneven": "wrap"}, "uneven='wrap'"),
        ({"world_size": 2}, "pass both world_size and rank"),
        ({"seed": -1}, "seed=-1"),
        ({"cycle_length": 0}, "cycle_length=0"),
        (
            {"columns": ["input_ids", "attention_mask"], "return_attention_mask": False},
            "not produced",
        ),
        (
            {"columns": ["x"], "collate_fn": lambda b: {"y": b["labels"]}},
            r"\['x'\] are not produced",
        ),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, kwargs, words):
    _, _, ds = make_corpus(tmp_path, n=20)
    with pytest.raises(ConfigError, match=words):
        ds.to_tf_dataset(**kwargs)


CHECKPOINTABLE = {
    "plain": ({}, {"batch_size": 16}),
    "unbatched": ({}, {}),
    "buckets": ({}, {"batch_size": 16, "bucket_boundaries": [8, 16, 24]}),
    "gzip shuffled": ({"compression": "gzip"}, {"batch_size": 16, "shuffle": True, "seed": 3}),
    "gzip shuffled buckets": (
        {"compression": "gzip"},
        {"batch_size": 16, "shuffle": True, "seed": 3, "bucket_boundaries": "auto", "columns": "input_ids"},
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINTABLE))
def test_checkpointed_iterator_resumes_exactly(tmp_path, case):
    """``tf.train.Checkpoint(iterator=...)`` through tests/resume_helper.py, for the pipelines
    that read files front to back (unshuffled shards, or compressed ones shuffled). The epoch
    plan's (global shuffle, ranks) are in the next test and test_tf_checkpoint.py; remote shards
    read front to back without ``cache_dir`` are built on ``from_generator``, which TensorFlow
    cannot checkpoint."""
    reshard_kw, kw = CHECKPOINTABLE[case]
    _, _, ds = make_corpus(tmp_path, n=200, **reshard_kw)
    how = tf_checkpoint(str(tmp_path / "ckpt"))
    full = run_save_load_state(lambda: ds.to_tf_dataset(**kw), (0, 1, 6), how=how)
    assert len(full) == 200 if kw.get("batch_size") is None else len(full) >= 13  # buckets: more


@pytest.mark.parametrize("kw", [{"shuffle": True, "seed": 3}, {"world_size": 2, "rank": 1}])
def test_planned_pipelines_are_checkpointed(tmp_path, monkeypatch, kw):
    """The epoch plan's pipelines (loaders.tf_plan) are numbered elements, not a generator:
    TensorFlow saves them mid-epoch, and a dataset built again resumes with the next batch."""
    from dlpipe.loaders import tf_plan

    monkeypatch.setattr(tf_plan, "_CHUNK_RECORDS", 8)  # an element per batch: most not yet read
    _, _, ds = make_corpus(tmp_path, n=300)
    how = tf_checkpoint(str(tmp_path / "ckpt"))
    full = run_save_load_state(lambda: ds.to_tf_dataset(batch_size=8, prefetch=False, **kw), (1, 9), how=how)
    assert len(full) == (38 if "seed" in kw else 19)


def test_webdataset_shards_are_refused(tmp_path):
    _, _, ds = make_corpus(tmp_path, n=20, format="webdataset")
    with pytest.raises(ConfigError, match="--format tfrecord"):
        ds.to_tf_dataset(batch_size=4)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_corrupt_shard_byte_names_the_shard(tmp_path, compression, shuffle):
    # TF's own message ("corrupted record at <offset>", "inflate() failed") names no file: the
    # per-file SHA-256 check (or dlpipe's reader, shuffled) fails first, naming shard and offset
    _, _, ds = make_corpus(tmp_path, compression=compression)
    path = tmp_path / "out" / ds.shards[1].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    where = f"{path}{' at byte' if compression is None else ''}"
    with pytest.raises((tf.errors.OpError, dlpipe.errors.FormatError), match=re.escape(where)):
        batches(ds.to_tf_dataset(batch_size=16, shuffle=shuffle, seed=0))
    with pytest.raises(dlpipe.errors.VerifyError, match=ds.shards[1].path):
        dlpipe.verify(tmp_path / "out")


def test_partial_raw_value_raises(tmp_path):
    _, _, ds = make_corpus(tmp_path, n=40)
    manifest = tmp_path / "out" / "dataset_info.json"
    raw = json.loads(manifest.read_text())
    raw["dlpipe"]["columns"]["input_ids"]["storage_dtype"] = (
        "uint16"  # records hold odd byte counts
    )
    manifest.write_text(json.dumps(raw))
    with pytest.raises(tf.errors.InvalidArgumentError, match="partial value"):
        batches(dlpipe.load_dataset(tmp_path / "out").to_tf_dataset(batch_size=40))


MIRRORED = """
import sys, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import dlpipe, keras
ds = dlpipe.load_dataset(sys.argv[1])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
tfds = ds.to_tf_dataset(batch_size=16, columns="input_ids", label_cols="labels", shuffle=True, seed=0,
                        drop_remainder=True, bucket_boundaries="auto")
dist = strategy.experimental_distribute_dataset(tfds)
x, y = next(iter(dist))
print("replica rows", [int(t.shape[0]) for t in strategy.experimental_local_results(x)])
with strategy.scope():
    model = keras.Sequential([keras.Input((None,), dtype="int64"), keras.layers.Embedding(200, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    model.compile("adam", "mse")
history = model.fit(tfds, epochs=2, steps_per_epoch=4, verbose=0)
print("loss", history.history["loss"])
"""


@pytest.mark.slow
def test_mirrored_strategy_two_cpus_fits(tmp_path):
    _, _, ds = make_corpus(tmp_path)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED), ds.info.root],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replica rows [8, 8]" in out.stdout
    losses = json.loads(out.stdout.split("loss", 1)[1].strip())
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_column_order_and_counts(tmp_path):
    _, _, ds = make_corpus(tmp_path, n=50)
    got = batches(ds.to_tf_dataset(batch_size=7, columns=["labels", "input_ids"]))
    assert sum(len(b["labels"]) for b in got) == 50
    assert Counter(len(b["labels"]) for b in got) == Counter({7: 7, 1: 1})
