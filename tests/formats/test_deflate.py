"""Fast deflate (ISA-L) for gzip/zlib shards: standard streams that every reader decodes,
deterministic bytes for any worker count, and the plain-zlib fallback without the library."""

from __future__ import annotations

import filecmp
import gzip
import io
import os
import sys
import tarfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlpipe
from dlpipe.errors import ConfigError, FormatError, OutputError
from dlpipe.formats import deflate
from dlpipe.formats.compression import decompress, read_decompressed
from dlpipe.formats.deflate import DeflateWriter
from dlpipe.formats.tfrecord import framing
from dlpipe.manifest import load_manifest

N = 3000  # ~2 KiB of tar per sample: shards of ~3 MiB, several compressor blocks each

needs_isal = pytest.mark.skipif(deflate._isal() is None, reason="isal is not installed")


@pytest.fixture
def corpus(tmp_path):
    """input_ids int64 (N, 48) padded with 0 (code points up to 40,000: stored as uint16), labels
    float32 (N, 2)."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 49, N)
    ids = rng.integers(1, 40_000, (N, 48))
    ids[np.arange(48)[None, :] >= lengths[:, None]] = 0
    labels = rng.normal(size=(N, 2)).astype(np.float32)
    np.save(tmp_path / "input_ids.npy", ids)
    np.save(tmp_path / "labels.npy", labels)
    return {"ids": ids, "lengths": lengths, "labels": labels,
            "specs": [str(tmp_path / "input_ids.npy"), str(tmp_path / "labels.npy")]}


def reshard(corpus, out, **options):
    options = {"pad_id": 0, "num_shards": 2, "workers": 1, **options}
    dlpipe.reshard(corpus["specs"], out, progress=False, **options)
    return [out / s.path for s in load_manifest(out).shards]


@pytest.fixture
def no_isal(monkeypatch):
    """Python as if isal were not installed (children forked by the reshard pool inherit it)."""
    for name in ("isal", "isal.isal_zlib", "isal.igzip"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv(deflate.ENV, raising=False)
    assert deflate.codec().name == "zlib"


def check_samples(corpus, keys, ids, labels):
    assert keys == list(range(N))
    for i in range(N):
        want = corpus["ids"][i, : corpus["lengths"][i]]
        assert ids[i].dtype == np.uint16 and np.array_equal(ids[i], want)
        assert labels[i].dtype == np.float32 and np.array_equal(labels[i], corpus["labels"][i])


# --- the codec -----------------------------------------------------------------------------


@needs_isal
def test_isal_is_chosen_when_installed(monkeypatch):
    monkeypatch.delenv(deflate.ENV, raising=False)
    c = deflate.codec()
    assert (c.name, c.level) == ("isal", 2)
    assert c.identity()["implementation"] == "isal" and "ISA-L" in c.identity()["version"]
    monkeypatch.setenv(deflate.ENV, "zlib")
    assert deflate.codec().name == "zlib"


def test_unknown_or_missing_codec_is_a_config_error(monkeypatch, no_isal):
    with pytest.raises(ConfigError, match="not one of isal, zlib"):
        deflate.codec("lz4")
    monkeypatch.setenv(deflate.ENV, "isal")
    with pytest.raises(ConfigError, match="'isal' is not installed"):
        deflate.codec()


# --- readers of the shards -------------------------------------------------------------------


@needs_isal
def test_webdataset_gzip_is_read_by_every_reader(corpus, tmp_path):
    """tarfile + gzip, webdataset, HF datasets and dlpipe read the same samples."""
    out = tmp_path / "wds"
    files = reshard(corpus, out, format="webdataset", compression="gzip")
    assert load_manifest(out).compression == "gzip"
    raw = [gzip.decompress(f.read_bytes()) for f in files]
    assert all(len(r) > 2 * deflate.BLOCK for r in raw)  # several compressor blocks per shard

    keys, ids, labels = [], [], []
    for f in files:
        with gzip.open(f) as g, tarfile.open(fileobj=g, mode="r|") as tar:
            for m in tar:
                arr = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
                key, col = m.name.split(".")[:2]
                if col == "input_ids":
                    keys.append(int(key))
                    ids.append(arr)
                else:
                    labels.append(arr)
    check_samples(corpus, keys, ids, labels)

    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset([str(f) for f in files], shardshuffle=False, empty_check=False).decode())
    check_samples(corpus, [int(s["__key__"]) for s in samples], [s["input_ids.npy"] for s in samples],
                  [s["labels.npy"] for s in samples])

    got = list(dlpipe.load_dataset(out))
    for i, g in enumerate(got):
        assert np.array_equal(g["input_ids"], corpus["ids"][i, : corpus["lengths"][i]])
        assert np.array_equal(g["labels"], corpus["labels"][i])
    assert len(got) == N
    assert dlpipe.verify(out).ok

    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    hf = datasets.load_dataset("webdataset", data_files={"train": [str(f) for f in files]}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert hf["__key__"] == [f"{i:010d}" for i in range(N)]
    for i in (0, 1, 1500, N - 1):
        assert np.array_equal(np.asarray(hf[i]["input_ids.npy"]), got[i]["input_ids"])
        assert np.array_equal(np.asarray(hf[i]["labels.npy"], np.float32), got[i]["labels"])


@needs_isal
@pytest.mark.parametrize("compression", ["gzip", "zlib"])
def test_tfrecord_gzip_and_zlib_are_read_by_tensorflow(tf, corpus, tmp_path, compression):
    out = tmp_path / compression
    files = reshard(corpus, out, format="tfrecord", compression=compression)
    records = []
    for f in files:
        plain = gzip.decompress(f.read_bytes()) if compression == "gzip" else zlib.decompress(f.read_bytes())
        buf = read_decompressed(f, compression)
        assert bytes(buf) == plain  # the standard library and dlpipe's reader agree
        starts, ends = framing.payload_bounds(framing.scan_frames(buf, path=f))
        records += [bytes(buf[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
    got = tf.data.TFRecordDataset([str(f) for f in files], compression_type=compression.upper())
    assert [bytes(r) for r in got.as_numpy_iterator()] == records
    assert len(records) == N


# --- deterministic bytes ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt,compression", [("webdataset", "gzip"), ("tfrecord", "zlib")])
def test_output_is_identical_for_any_worker_count(corpus, tmp_path, fmt, compression):
    a, b = tmp_path / "w1", tmp_path / "w2"
    reshard(corpus, a, format=fmt, compression=compression, workers=1)
    reshard(corpus, b, format=fmt, compression=compression, workers=2)
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        if os.path.isfile(a / name):
            assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_fallback_without_isal_writes_what_gzip_writes(corpus, tmp_path, no_isal):
    """Without isal, shards are zlib level 6: the bytes ``gzip.GzipFile(mtime=0)`` writes."""
    out = tmp_path / "out"
    files = reshard(corpus, out, format="webdataset", compression="gzip", workers=2)
    for f in files:
        data = f.read_bytes()
        plain = gzip.decompress(data)
        want = io.BytesIO()
        with gzip.GzipFile(fileobj=want, mode="wb", mtime=0, filename="", compresslevel=6) as g:
            g.write(plain)
        assert data == want.getvalue()
        with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
            assert len(tar.getmembers()) == 2 * load_manifest(out).shards[files.index(f)].num_records
    got = list(dlpipe.load_dataset(out))
    assert len(got) == N and np.array_equal(got[5]["labels"], corpus["labels"][5])
    assert dlpipe.verify(out).ok


@needs_isal
def test_the_two_codecs_write_different_bytes_of_the_same_stream(monkeypatch, corpus, tmp_path):
    monkeypatch.setenv(deflate.ENV, "isal")
    fast = reshard(corpus, tmp_path / "isal", format="webdataset", compression="gzip")
    monkeypatch.setenv(deflate.ENV, "zlib")
    slow = reshard(corpus, tmp_path / "zlib", format="webdataset", compression="gzip")
    for a, b in zip(fast, slow):
        assert a.read_bytes() != b.read_bytes()
        assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes())
        assert a.read_bytes()[:10] == b.read_bytes()[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@needs_isal
def test_the_codec_is_part_of_the_plan(monkeypatch, corpus, tmp_path):
    """A rerun with another deflate install never mixes its shards with the first run's."""
    monkeypatch.setenv(deflate.ENV, "isal")
    reshard(corpus, tmp_path / "out", format="webdataset", compression="gzip")
    plan = load_manifest(tmp_path / "out").raw["dlpipe"]["plan"]
    assert plan["deflate"] == deflate.codec("isal").identity()
    monkeypatch.setenv(deflate.ENV, "zlib")
    with pytest.raises(OutputError, match="--overwrite"):
        reshard(corpus, tmp_path / "out", format="webdataset", compression="gzip")
    reshard(corpus, tmp_path / "none", format="tfrecord", compression="none")
    assert "deflate" not in load_manifest(tmp_path / "none").raw["dlpipe"]["plan"]  # no codec, no change


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["default", "no isal"])
def test_decompress_reads_any_gzip_and_reports_damage(request, reader):
    if reader == "no isal":
        request.getfixturevalue("no_isal")
    data = os.urandom(5000) + bytes(300_000) + b"tfrecord" * 9000
    one = gzip.compress(data, mtime=0)
    assert bytes(decompress(one, "gzip", "x")) == data
    assert bytes(decompress(one + gzip.compress(b"more"), "gzip", "x")) == data + b"more"
    assert bytes(decompress(one + bytes(16), "gzip", "x")) == data  # zero padding after it
    assert bytes(decompress(zlib.compress(data), "zlib", "x")) == data
    with pytest.raises(FormatError, match="decompress gzip"):
        decompress(one[:-20], "gzip", "x")
    bad = bytearray(one)
    bad[-7] ^= 1  # the CRC
    with pytest.raises(FormatError, match="decompress gzip"):
        decompress(bytes(bad), "gzip", "x")
    with pytest.raises(FormatError, match="decompress zlib"):
        decompress(zlib.compress(data)[:-3], "zlib", "x")
    with pytest.raises(FormatError, match="decompress gzip"):
        decompress(b"not gzip at all", "gzip", "x")


# --- the writer, property-based ----------------------------------------------------------------

chunk = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda b, k: b * k, st.binary(min_size=1, max_size=40), st.integers(0, 300)),
)


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(chunk, max_size=12),
    container=st.sampled_from(["gzip", "zlib"]),
    name=st.sampled_from(deflate.CODECS if deflate._isal() is not None else ("zlib",)),
    block=st.sampled_from([1, 7, 4096, deflate.BLOCK]),
)
def test_writer_roundtrip_and_split_invariance(chunks, container, name, block):
    codec = deflate.codec(name)

    def write(pieces):
        out = io.BytesIO()
        w = DeflateWriter(out, container, codec, block=block)
        for p in pieces:
            assert w.write(memoryview(p)) == len(p)
        w.close()
        w.close()  # a second close writes nothing
        return out.getvalue()

    data = b"".join(chunks)
    got = write(chunks)
    assert (gzip.decompress(got) if container == "gzip" else zlib.decompress(got)) == data
    assert write([data]) == got  # the bytes do not depend on how they were written
    assert bytes(deflate.decompress(got, container)) == data
    if name == "zlib" and container == "zlib":
        z = zlib.compressobj(6)
        assert got == z.compress(data) + z.flush()  # byte-identical to dlpipe before isal
