"""The converters/ recipes run end to end on small data (as scripts, the way users run them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlpipe

ROOT = Path(__file__).resolve().parent.parent


def test_hf_max_length_recipe(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    texts, ids, masks = [], [], []
    for _ in range(60):
        n = int(rng.integers(1, 16))
        word = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n))
        texts.append(word)
        ids.append([ord(c) for c in word] + [0] * (16 - n))  # a char "tokenizer", max_length padding
        masks.append([1] * n + [0] * (16 - n))
    ds = datasets.Dataset.from_dict({"text": texts, "input_ids": ids, "attention_mask": masks,
                                     "label": rng.integers(0, 2, 60).tolist()})
    datasets.DatasetDict({"train": ds.select(range(50)), "test": ds.select(range(50, 60))}).save_to_disk(
        tmp_path / "tok")
    done = subprocess.run([sys.executable, ROOT / "converters" / "hf_max_length.py", tmp_path / "tok",
                           tmp_path / "out", "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = list(dlpipe.load_dataset(tmp_path / "out" / "train"))
    assert [bytes(r["input_ids"].astype(np.uint8)).decode() for r in got] == texts[:50]
    assert set(got[0]) == {"input_ids", "label"}
    assert len(list(dlpipe.load_dataset(tmp_path / "out" / "test"))) == 10


@pytest.mark.tf
def test_deepcal_recipe(tmp_path, tf):
    legacy = tmp_path / "legacy.tfrecord"
    ids = np.zeros((40, 128), np.int64)
    with tf.io.TFRecordWriter(str(legacy)) as w:
        for i in range(40):
            ids[i, : i % 30 + 1] = np.arange(65, 65 + i % 30 + 1)
            feat = {"address": tf.train.Feature(int64_list=tf.train.Int64List(value=ids[i])),
                    "coords": tf.train.Feature(float_list=tf.train.FloatList(value=[i, -i]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
    done = subprocess.run([sys.executable, ROOT / "converters" / "deepcal_tfrecord.py", legacy, tmp_path / "out",
                           "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = list(dlpipe.load_dataset(tmp_path / "out", "train")) + list(dlpipe.load_dataset(tmp_path / "out",
                                                                                            "validation"))
    assert len(rows) == 40
    got = sorted((int(r["coords"][0]), r["address"].tolist()) for r in rows)
    assert got == [(i, ids[i, : i % 30 + 1].tolist()) for i in range(40)]
