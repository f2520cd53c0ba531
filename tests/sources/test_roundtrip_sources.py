"""Every source kind through the engine: what comes back equals the source without padding."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlpipe

_counter = itertools.count()
INT_DTYPES = ["uint8", "int8", "uint16", "int16", "int32", "int64"]


@st.composite
def corpora(draw):
    n = draw(st.integers(0, 25))
    width = draw(st.integers(1, 10))
    dtype = np.dtype(draw(st.sampled_from(INT_DTYPES)))
    lengths = np.array(draw(st.lists(st.integers(0, width), min_size=n, max_size=n)), dtype=np.int64)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    ids = np.array(draw(st.lists(st.integers(lo, hi).filter(lambda v: v != 0), min_size=n * width,
                                 max_size=n * width)), dtype=dtype).reshape(n, width)
    ids[np.arange(width)[None, :] >= lengths[:, None]] = 0
    labels = np.array(draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=2 * n, max_size=2 * n)),
                      dtype=np.float32).reshape(n, 2)
    return ids, lengths, labels


def write_source(kind: str, d: str, ids: np.ndarray, labels: np.ndarray) -> tuple[list[str], dict]:
    """The same records in one source format; returns (SOURCE args, extra reshard options)."""
    if kind == "npy":
        np.save(f"{d}/input_ids.npy", ids)
        np.save(f"{d}/labels.npy", labels)
        return [f"{d}/input_ids.npy", f"{d}/labels.npy"], {}
    if kind == "npz":
        np.savez_compressed(f"{d}/data.npz", input_ids=ids, labels=labels)
        return [f"{d}/data.npz"], {}
    if kind == "raw":
        rec = np.zeros(len(ids), dtype=[("input_ids", ids.dtype.newbyteorder("<"), ids.shape[1]),
                                        ("labels", "<f4", 2)])
        rec["input_ids"], rec["labels"] = ids, labels
        with open(f"{d}/data.bin", "wb") as f:
            f.write(b"HEADER16________")
            f.write(rec.tobytes())
        layout = f"input_ids:{ids.dtype.newbyteorder('<').str}[{ids.shape[1]}],labels:<f4[2]"
        return [f"{d}/data.bin"], {"layout": layout, "header_bytes": 16}
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        table = pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.from_numpy_dtype(ids.dtype))),
                          "labels": pa.array(list(labels), type=pa.list_(pa.float32()))})
        pq.write_table(table, f"{d}/data.parquet", row_group_size=7)
        return [f"{d}/data.parquet"], {}
    if kind == "hdf5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(f"{d}/data.h5", "w") as f:
            f["input_ids"], f["labels"] = ids, labels
        return [f"{d}/data.h5"], {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["npy", "npz", "raw", "parquet", "hdf5"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corpus=corpora(), fmt=st.sampled_from(["tfrecord", "webdataset"]), shuffle=st.booleans())
def test_round_trip(kind, corpus, fmt, shuffle):
    ids, lengths, labels = corpus
    if kind == "parquet" and len(ids) == 0:
        return  # an empty Parquet list column has no width to learn
    d = tempfile.mkdtemp()
    try:
        specs, opts = write_source(kind, d, ids, labels)
        out = f"{d}/out"
        dlpipe.reshard(specs, out, format=fmt, pad_id=0, num_shards=2, workers=1, shuffle=shuffle, seed=11,
                       sequence_columns=["input_ids"], **opts)
        order = np.random.default_rng(11).permutation(len(ids)) if shuffle else np.arange(len(ids))
        got = list(dlpipe.load_dataset(out))
        assert len(got) == len(ids)
        for g, i in zip(got, order):
            assert g["input_ids"].dtype == ids.dtype
            assert np.array_equal(g["input_ids"], ids[i, : lengths[i]])
            assert np.array_equal(g["labels"], labels[i])
        assert dlpipe.verify(out).ok
    finally:
        shutil.rmtree(d)


@pytest.mark.tf
@settings(max_examples=15, deadline=None)
@given(corpus=corpora())
def test_tfrecord_source_round_trip_through_tensorflow(corpus):
    tf = pytest.importorskip("tensorflow")
    ids, lengths, labels = corpus
    d = tempfile.mkdtemp()
    try:
        src = os.path.join(d, "padded.tfrecord")
        with tf.io.TFRecordWriter(src) as w:
            for row, lab in zip(ids, labels):
                feat = {"input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=row.astype(np.int64))),
                        "labels": tf.train.Feature(float_list=tf.train.FloatList(value=lab))}
                w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
        if len(ids) == 0:
            return  # an empty TFRecord file is refused as an input
        out = os.path.join(d, "out")
        dlpipe.reshard([src], out, pad_id=0, num_shards=2, workers=1, int_encoding="int64_list")
        files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tfrecord"))
        spec = {"input_ids": tf.io.VarLenFeature(tf.int64), "labels": tf.io.FixedLenFeature([2], tf.float32)}
        got = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files)]
        assert len(got) == len(ids)
        for g, i in zip(got, range(len(ids))):
            assert g["input_ids"].values.numpy().tolist() == ids[i, : lengths[i]].tolist()
            assert np.array_equal(g["labels"].numpy(), labels[i])
    finally:
        shutil.rmtree(d)
