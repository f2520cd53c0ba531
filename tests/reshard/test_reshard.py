"""``dlpipe.reshard`` end to end: round trips through TensorFlow's reader, determinism, resume."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest

import dlpipe
from dlpipe.errors import OutputError
from dlpipe.formats.compression import read_decompressed
from dlpipe.formats.tfrecord.example_decode import decode_examples
from dlpipe.formats.tfrecord.framing import payload_bounds, scan_frames
from dlpipe.manifest import load_manifest


def read_back(root: str, split: str = "train") -> dict[str, list[np.ndarray]]:
    """Records of a split, decoded by dlpipe's own reader, as lists of per-record arrays."""
    info = load_manifest(root)
    out: dict[str, list] = {name: [] for name in info.columns}
    out["__key__"] = []
    for shard in info.split_shards(split):
        buf = np.asarray(read_decompressed(os.path.join(root, shard.path), info.compression))
        offsets = scan_frames(buf)
        starts, ends = payload_bounds(offsets)
        feats = decode_examples(buf, starts, ends)
        for name, enc in info.columns.items():
            f = feats[name]
            for i in range(len(starts)):
                if f.kind == "bytes":
                    raw = f.values[f.value_splits[f.row_splits[i]] : f.value_splits[f.row_splits[i] + 1]]
                    vals = raw.view(np.dtype(enc.storage_dtype).newbyteorder("<"))
                else:
                    vals = f.values[f.row_splits[i] : f.row_splits[i + 1]]
                out[name].append(vals.astype(enc.dtype))
    return out


def tf_read_back(tf, root: str, split: str = "train") -> dict[str, list[np.ndarray]]:
    info = load_manifest(root)
    files = [os.path.join(root, s.path) for s in info.split_shards(split)]
    comp = {None: "", "gzip": "GZIP", "zlib": "ZLIB"}[info.compression]
    spec = {}
    for name, enc in info.columns.items():
        kind = {"raw": tf.string, "int64_list": tf.int64, "float_list": tf.float32}[enc.encoding]
        spec[name] = tf.io.VarLenFeature(kind)
    out: dict[str, list] = {name: [] for name in info.columns}
    for batch in tf.data.TFRecordDataset(files, compression_type=comp).batch(1000):
        parsed = tf.io.parse_example(batch, spec)
        for name, enc in info.columns.items():
            for row in tf.RaggedTensor.from_sparse(parsed[name]).to_list():
                if enc.encoding == "raw":
                    out[name].append(np.frombuffer(row[0], np.dtype(enc.storage_dtype).newbyteorder("<")))
                else:
                    out[name].append(np.array(row))
    return out


def test_round_trip_npy_to_tfrecord(npy_corpus, tmp_path):
    out = tmp_path / "out"
    summary = dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=3, workers=1)
    assert summary.num_records == 500 and summary.num_shards == 3
    got = read_back(str(out))
    ids, lengths, labels = npy_corpus["ids"], npy_corpus["lengths"], npy_corpus["labels"]
    assert len(got["input_ids"]) == 500
    for i in range(500):
        assert np.array_equal(got["input_ids"][i], ids[i, : lengths[i]])
        assert np.array_equal(got["labels"][i], labels[i])
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["splits"]["train"]["num_examples"] == 500
    assert info["features"]["input_ids"] == {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "List"}
    assert info["dlpipe"]["columns"]["input_ids"]["storage_dtype"] == "uint8"
    assert sorted(os.listdir(out)) == sorted(
        ["dataset_info.json"] + [f"train-0000{i}-of-00003.tfrecord{x}" for i in range(3) for x in ("", ".index")]
    )
    dlpipe_verify = __import__("dlpipe.verify", fromlist=["verify"]).verify
    assert dlpipe_verify(out).ok


@pytest.mark.tf
@pytest.mark.parametrize("compression,int_encoding", [(None, "raw"), ("gzip", "int64_list"), ("zlib", "raw")])
def test_tensorflow_reads_the_shards(tf, npy_corpus, tmp_path, compression, int_encoding):
    out = str(tmp_path / "out")
    dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=2, workers=1, compression=compression,
                   int_encoding=int_encoding)
    got = tf_read_back(tf, out)
    ids, lengths, labels = npy_corpus["ids"], npy_corpus["lengths"], npy_corpus["labels"]
    for i in range(500):
        assert np.array_equal(got["input_ids"][i], ids[i, : lengths[i]])
        assert np.allclose(got["labels"][i], labels[i])


def test_output_is_identical_for_any_worker_count(npy_corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    dlpipe.reshard(npy_corpus["specs"], a, pad_id=0, num_shards=4, workers=1, shuffle=True, seed=3)
    dlpipe.reshard(npy_corpus["specs"], b, pad_id=0, num_shards=4, workers=2, shuffle=True, seed=3)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("shuffle", [False, True])
def test_output_is_identical_for_any_scan_block_and_encode_batch(npy_corpus, tmp_path, monkeypatch, shuffle):
    """The scan reads a task's rows a block at a time and the writer encodes a chunk a batch of
    rows at a time; neither granularity shows in the output."""
    import importlib

    scan, write = importlib.import_module("dlpipe.reshard.scan"), importlib.import_module("dlpipe.reshard.write")
    a, b = tmp_path / "a", tmp_path / "b"
    dlpipe.reshard(npy_corpus["specs"], a, pad_id=0, num_shards=1, workers=1, shuffle=shuffle)
    monkeypatch.setattr(scan, "_BLOCK_BYTES", 1)  # a row per block
    monkeypatch.setattr(write, "ENCODE_BYTES", 1)  # the fewest rows per batch: 256 of the 500
    dlpipe.reshard(npy_corpus["specs"], b, pad_id=0, num_shards=1, workers=1, shuffle=shuffle)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_shuffle_and_splits_follow_the_documented_permutation(npy_corpus, tmp_path):
    out = tmp_path / "out"
    dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=2, workers=1, shuffle=True, seed=7,
                   splits="train=0.8,validation=0.2")
    order = np.random.default_rng(7).permutation(500)
    ids, lengths = npy_corpus["ids"], npy_corpus["lengths"]
    for split, rows in (("train", order[:400]), ("validation", order[400:])):
        got = read_back(str(out), split)["input_ids"]
        assert len(got) == len(rows)
        for g, r in zip(got, rows):
            assert np.array_equal(g, ids[r, : lengths[r]])


def test_rerun_is_a_no_op_and_other_options_are_refused(npy_corpus, tmp_path):
    out = tmp_path / "out"
    dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=2, workers=1)
    again = dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=2, workers=1)
    assert again.shards_written == 0 and again.shards_reused == 2
    with pytest.raises(OutputError, match="other inputs or options.*--overwrite"):
        dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=3, workers=1)
    dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=3, workers=1, overwrite=True)
    assert load_manifest(out).raw["dlpipe"]["plan"]["num_shards"] == 3
    assert not [f for f in os.listdir(out) if f.startswith("train-") and "of-00002" in f]


def test_mask_source_with_left_padding_and_fixed_columns(tmp_path):
    rng = np.random.default_rng(0)
    n, width = 200, 16
    lengths = rng.integers(0, width + 1, n)
    pos = np.arange(width)[None, :]
    mask = (pos >= width - lengths[:, None]).astype(np.int64)  # left padding
    ids = rng.integers(1, 30000, (n, width)) * mask + 50256 * (1 - mask)
    types = np.zeros((n, width), np.int64)
    score = rng.random(n).astype(np.float64)
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask, token_type_ids=types, score=score)
    out = tmp_path / "out"
    dlpipe.reshard([tmp_path / "tok.npz"], out, num_shards=1, workers=1)
    info = load_manifest(out)
    assert set(info.columns) == {"input_ids", "token_type_ids", "score"}
    assert info.columns["input_ids"].storage_dtype == "uint16"
    assert info.pad_values == {"input_ids": 50256, "token_type_ids": 0}
    got = read_back(str(out))
    for i in range(n):
        assert np.array_equal(got["input_ids"][i], ids[i][mask[i] == 1])
        assert got["score"][i][0] == score[i]


def _interrupted_run(npy_corpus, out, monkeypatch, fail_on: int):
    """Run a reshard in this process whose fail_on-th shard write dies like a crash."""
    from dlpipe.reshard import write

    calls = {"n": 0}
    real = write.to_batch

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise KeyboardInterrupt  # as close to kill -9 as an in-process test gets
        return real(*args, **kwargs)

    monkeypatch.setattr(write, "to_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=5, workers=1)
    monkeypatch.setattr(write, "to_batch", real)


def test_resume_after_interruption_is_byte_identical(npy_corpus, tmp_path, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    dlpipe.reshard(npy_corpus["specs"], ref, pad_id=0, num_shards=5, workers=1)
    _interrupted_run(npy_corpus, out, monkeypatch, fail_on=3)
    assert not (out / "dataset_info.json").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    summary = dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=5, workers=2)
    assert summary.shards_reused == 2 and summary.shards_written == 3
    assert sorted(os.listdir(ref)) == sorted(os.listdir(out))
    for name in os.listdir(ref):
        assert filecmp.cmp(ref / name, out / name, shallow=False), name


def test_disk_full_is_a_clear_error_and_leaves_no_partial_shard(npy_corpus, tmp_path, monkeypatch):
    import errno

    from dlpipe.formats import get_format

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(get_format("tfrecord")), "encode_batch", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left on device.*free some space"):
        dlpipe.reshard(npy_corpus["specs"], out, pad_id=0, num_shards=2, workers=1)
    assert not [f for f in os.listdir(out) if not f.startswith(".dlpipe")]


@pytest.mark.slow
def test_kill_minus_9_then_rerun_is_byte_identical(tmp_path):
    """A real crash: SIGKILL the CLI after a few shards are done, rerun, compare."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(5)
    ids = rng.integers(1, 250, (120_000, 64))
    ids[np.arange(64)[None, :] >= rng.integers(0, 65, 120_000)[:, None]] = 0
    np.save(tmp_path / "input_ids.npy", ids)
    args = ["reshard", str(tmp_path / "input_ids.npy"), "--pad-id", "0", "--num-shards", "60", "-j", "1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cli = [sys.executable, "-m", "dlpipe"]
    subprocess.run([*cli, *args, "-o", str(ref)], check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen([*cli, *args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = out / ".dlpipe" / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(os.listdir(done_dir)) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert not (out / "dataset_info.json").exists()
    rerun = subprocess.run([*cli, *args, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "reused from an earlier run" in rerun.stdout
    assert sorted(os.listdir(ref)) == sorted(os.listdir(out))
    for name in os.listdir(ref):
        assert filecmp.cmp(ref / name, out / name, shallow=False), name


@pytest.mark.parametrize("compression", ["auto", "none"])
def test_webdataset_shards_read_by_webdataset_and_hf(npy_corpus, tmp_path, compression):
    wds = pytest.importorskip("webdataset")
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    dlpipe.reshard(npy_corpus["specs"], out, format="webdataset", compression=compression, pad_id=0,
                   num_shards=2, workers=2)
    info = load_manifest(out)
    suffix = ".tar.gz" if compression == "auto" else ".tar"
    assert all(s.path.endswith(suffix) for s in info.shards)
    files = [str(out / s.path) for s in info.shards]
    ids, lengths, labels = npy_corpus["ids"], npy_corpus["lengths"], npy_corpus["labels"]

    samples = list(wds.WebDataset(files, shardshuffle=False, empty_check=False).decode())
    assert [int(s["__key__"]) for s in samples] == list(range(500))
    for i, s in enumerate(samples):
        assert np.array_equal(s["input_ids.npy"], ids[i, : lengths[i]])
        assert np.array_equal(s["labels.npy"], labels[i])

    hf = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(hf) == 500
    for i in (0, 1, 250, 499):
        assert np.array_equal(np.asarray(hf[i]["input_ids.npy"]), ids[i, : lengths[i]])
        assert np.allclose(np.asarray(hf[i]["labels.npy"]), labels[i])

    got = list(dlpipe.load_dataset(out))
    assert all(np.array_equal(g["input_ids"], ids[i, : lengths[i]]) for i, g in enumerate(got))
    assert dlpipe.verify(out).ok
