"""Reading datasets in object storage (a real moto S3 server on 127.0.0.1): the same rows and
batches as from local disk, range requests with bounded read-ahead, the verified cache,
``verify`` over S3, one-line errors naming the URL, and no secret in any message."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from token_rows import padded_tokens

import dlpipe
from dlpipe.errors import FormatError, VerifyError
from dlpipe.inspect import inspect as describe
from dlpipe.loaders.common import epoch_windows
from dlpipe.loaders.shard_reader import ShardReader
from dlpipe.loaders.windows import read_windows
from dlpipe.manifest import load_manifest
from dlpipe.storage import Location

pytest.importorskip("s3fs")

N = 600
KINDS = {"tfrecord": ("tfrecord", None), "tfrecord-gzip": ("tfrecord", "gzip"), "wds": ("webdataset", "auto")}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """kind -> a local dataset directory (4 shards of N padded records, lengths 0..24)."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(11)
    ids, _ = padded_tokens(rng, N, 24)
    ids[0] = 0  # an empty record
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", rng.normal(size=(N, 2)).astype(np.float32))
    out = {}
    for kind, (fmt, compression) in KINDS.items():
        root = tmp_path_factory.mktemp(kind)
        dlpipe.reshard([str(src / "input_ids.npy"), str(src / "labels.npy")], root, pad_id=0, num_shards=4,
                       workers=1, format=fmt, compression=compression, overwrite=True, progress=False)
        out[kind] = str(root)
    return out


def upload(server, local_dir: str, prefix: str, *, skip: tuple[str, ...] = ()) -> str:
    return server.upload(local_dir, f"s3://dlpipe/{prefix}", skip=skip)


@pytest.fixture
def requests(monkeypatch):
    """Every ``Location.read_bytes`` call of this process (read-ahead threads included):
    (url, start, end, bytes returned)."""
    log: list[tuple[str, int | None, int | None, int]] = []
    lock = threading.Lock()
    real = Location.read_bytes

    def logged(self, start=None, end=None):
        data = real(self, start, end)
        with lock:
            log.append((self.url, start, end, len(data)))
        return data

    monkeypatch.setattr(Location, "read_bytes", logged)
    return log


def shard_reads(log, info) -> list[tuple[str, int | None, int | None, int]]:
    urls = {info.shard_location(s).url for s in info.shards}
    return [r for r in log if r[0] in urls]


def same_rows(a, b) -> int:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
    return len(a)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_match_local(s3_server, local, kind):
    so = s3_server.storage_options
    url = upload(s3_server, local[kind], kind)
    for shuffled in (False, True):
        a, b = dlpipe.load_dataset(local[kind]), dlpipe.load_dataset(url, storage_options=so)
        if shuffled:
            # blocks over object storage default to >= 1 MiB (a request each): set them alike
            a, b = (d.shuffle(seed=5, buffer_size=64, block_records=a.block_records) for d in (a, b))
        assert same_rows(a, b) == N
    assert b.info.root == url and b.info.remote
    assert dlpipe.verify(url, storage_options=so).ok
    assert describe(url, storage_options=so).startswith(f"dlpipe dataset {url} (")


def test_file_url_reads_like_a_path(local):
    path = local["tfrecord"]
    ds = dlpipe.load_dataset("file://" + path)
    assert ds.info.root == path and not ds.info.remote
    assert same_rows(dlpipe.load_dataset(path), ds) == N
    assert dlpipe.verify("file://" + path).ok


@pytest.mark.torch
@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_batches_match_local(s3_server, local, num_workers, tmp_path):
    pytest.importorskip("torch")
    so = s3_server.storage_options
    url = upload(s3_server, local["tfrecord"], "torch")
    kw = dict(batch_size=32, shuffle=True, seed=3, num_workers=num_workers, bucket_boundaries="auto")
    want = list(dlpipe.load_dataset(local["tfrecord"]).to_torch_dataloader(**kw))
    assert len(want) >= 19
    for ds in (dlpipe.load_dataset(url, storage_options=so),
               dlpipe.load_dataset(url, storage_options=so, cache_dir=tmp_path),
               dlpipe.load_dataset("file://" + local["tfrecord"])):
        assert same_rows(want, ds.to_torch_dataloader(**kw)) == len(want)
    assert len(os.listdir(tmp_path / "shards")) == 8  # shards and their indexes


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["tfrecord", "tfrecord-gzip"])
def test_tf_batches_match_local(s3_server, local, kind, tmp_path):
    pytest.importorskip("tensorflow")
    so = s3_server.storage_options
    url = upload(s3_server, local[kind], kind)
    kw = dict(batch_size=32, shuffle=True, seed=3)
    want = list(dlpipe.load_dataset(local[kind]).to_tf_dataset(**kw))
    # small chunks: several range requests per shard, each a multiple of 64 records
    remote = dlpipe.load_dataset(url, storage_options=so, request_bytes=3000)
    assert same_rows(want, remote.to_tf_dataset(**kw)) == len(want) == 19
    cached = dlpipe.load_dataset(url, storage_options=so, cache_dir=tmp_path)
    assert same_rows(want, cached.to_tf_dataset(**kw)) == len(want)
    # compressed shards go through TFRecordDataset, which needs no index; uncompressed shuffled
    # ones through the epoch plan, which reads records by their index
    assert len(os.listdir(tmp_path / "shards")) == (4 if kind == "tfrecord-gzip" else 8)


@pytest.mark.tf
def test_tf_over_s3_logs_nothing(s3_server, local):
    """TensorFlow logs an error line for every tensor sliced twice (a block cut from a chunk, then
    from a batch); conftest silences TF's C++ logging, so this runs in a fresh interpreter."""
    pytest.importorskip("tensorflow")
    url = upload(s3_server, local["tfrecord"], "quiet")
    code = ("import json, sys, dlpipe; ds = dlpipe.load_dataset(sys.argv[1], storage_options=json.loads(sys.argv[2]));"
            "print(sum(int(b['input_ids'].shape[0]) for b in ds.to_tf_dataset(batch_size=256)))")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    done = subprocess.run([sys.executable, "-c", code, url, json.dumps(s3_server.storage_options)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(N)]
    errors = [line for line in done.stderr.splitlines() if line.startswith("E0000") or "RefCount" in line]
    assert errors == []


def test_range_requests_read_only_what_is_read(s3_server, local, requests):
    so = s3_server.storage_options
    url = upload(s3_server, local["tfrecord"], "ranges")
    ds = dlpipe.load_dataset(url, storage_options=so, request_bytes=0, prefetch_bytes=4000)
    ds.buffer_size = 40  # windows of 40 records (~3 KB)
    it = iter(ds)
    rows = [next(it) for _ in range(50)]
    it.close()
    assert len(rows) == 50
    reads = shard_reads(requests, ds.info)
    first = ds.info.shards[0]
    assert reads and all(r[0] == ds.info.shard_location(first).url for r in reads)
    assert all(r[1] is not None and r[3] == r[2] - r[1] <= 4000 for r in reads)  # ranges, not the file
    index = ds.reader().index(first)
    needed = int(index[79, 0] + index[79, 1])  # the two windows the 50 rows come from
    assert needed <= sum(r[3] for r in reads) <= needed + 4000 < first.num_bytes  # + what fits ahead
    assert reads[0][1:3] == (0, int(index[39, 0] + index[39, 1]))  # the first window's frames exactly

    # a whole epoch with the default request size: every byte fetched once, in few requests
    requests.clear()
    ds = dlpipe.load_dataset(url, storage_options=so)
    assert sum(1 for _ in ds) == N
    reads = shard_reads(requests, ds.info)
    assert sum(r[3] for r in reads) == sum(s.num_bytes for s in ds.info.shards)
    assert len(reads) == len(ds.info.shards)


def test_compressed_shards_are_fetched_whole_once(s3_server, local, requests):
    url = upload(s3_server, local["tfrecord-gzip"], "gz")
    ds = dlpipe.load_dataset(url, storage_options=s3_server.storage_options)
    ds.buffer_size = 30
    assert sum(1 for _ in ds) == N
    reads = shard_reads(requests, ds.info)
    assert sorted(r[0] for r in reads) == sorted(ds.info.shard_location(s).url for s in ds.info.shards)
    assert all(r[1] is None and r[2] is None for r in reads)


def test_read_ahead_stays_within_its_byte_budget(s3_server, local):
    so = s3_server.storage_options
    url = upload(s3_server, local["tfrecord"], "budget")
    info = load_manifest(url, so)
    windows = epoch_windows([s.num_records for s in info.shards], batch_size=10, window_batches=3)
    bound = 6000  # about four 30-record windows
    reader = ShardReader(info, prefetch_bytes=bound, request_bytes=0)
    spans = [_window_bytes(reader, info, w) for w in windows]
    assert len(spans) >= 10 and max(spans) * 2 < bound

    # watched from outside: bytes fetched, less those of windows the consumer is done with
    held, peak, lock = [0], [0], threading.Lock()
    fetch = reader.fetch

    def watched(unit):
        data = fetch(unit)
        with lock:
            held[0] += len(data)
            peak[0] = max(peak[0], held[0])
        return data

    reader.fetch = watched
    seen = 0
    for w, cols in zip(windows, read_windows(reader, info.shards, windows)):
        seen += len(cols["input_ids"][1]) - 1
        time.sleep(0.02)  # a slow consumer: unbounded read-ahead would fetch everything meanwhile
        with lock:
            held[0] -= _window_bytes(reader, info, w)
    assert seen == N
    stats = reader.stats
    assert peak[0] <= stats["peak_buffered_bytes"] <= bound
    assert peak[0] >= 2 * min(spans)  # it did read ahead
    assert stats["requests"] == sum(len(w.ranges) for w in windows)
    assert stats["bytes_fetched"] == sum(s.num_bytes for s in info.shards)


def _window_bytes(reader, info, window) -> int:
    total = 0
    for s, a, b in window.ranges:
        idx = reader.index(info.shards[s])
        total += int(idx[b - 1, 0] + idx[b - 1, 1] - idx[a, 0])
    return total


def test_cache_fills_once_and_is_reused(s3_server, local, requests, tmp_path):
    so = s3_server.storage_options
    url = upload(s3_server, local["tfrecord"], "cache")
    ds = dlpipe.load_dataset(url, storage_options=so, cache_dir=tmp_path)
    assert same_rows(dlpipe.load_dataset(local["tfrecord"]), ds) == N
    info = ds.info
    files = sorted(os.listdir(tmp_path / "shards"))
    assert len(files) == 8 and not any(f.startswith(".") or f.endswith(".lock") for f in files)
    for s in info.shards:
        (name,) = [f for f in files if f.endswith(os.path.basename(s.path))]
        assert name + ".index" in files
        with open(tmp_path / "shards" / name, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == s.sha256
    assert len(shard_reads(requests, info)) == 4

    requests.clear()
    again = dlpipe.load_dataset(url, storage_options=so, cache_dir=tmp_path).shuffle(seed=2)
    again.set_epoch(1)
    assert sum(1 for _ in again) == N
    # later epochs and processes read the cache: only the manifest is fetched again
    assert {r[0] for r in requests if r[0].startswith("s3://")} == {f"{url}/dataset_info.json"}

    # a corrupt object is never cached
    bad = _corrupt_copy(s3_server, local["tfrecord"], "cache-bad")
    empty = tmp_path / "other"
    with pytest.raises(FormatError) as e:
        list(dlpipe.load_dataset(bad, storage_options=so, cache_dir=empty))
    assert f"{bad}/train-00001-of-00004.tfrecord" in str(e.value) and "SHA-256" in str(e.value)
    assert "\n" not in str(e.value)
    # (downloads of other shards may still be finishing in the background)
    assert not [f for f in os.listdir(empty / "shards") if f.endswith("train-00001-of-00004.tfrecord")]


def _corrupt_copy(server, local_dir: str, prefix: str, *, shard: int = 1, record: int = 70) -> str:
    """The dataset uploaded with one payload byte of ``record`` of shard ``shard`` flipped."""
    url = upload(server, local_dir, prefix)
    info = load_manifest(local_dir)
    s = info.shards[shard]
    with open(os.path.join(local_dir, s.path), "rb") as f:
        data = bytearray(f.read())
    index = np.loadtxt(os.path.join(local_dir, s.index), dtype=np.int64, ndmin=2)
    data[int(index[record, 0]) + 13] ^= 0xFF
    Location(url, server.storage_options).join(s.path).write_bytes(bytes(data))
    return url


def test_corrupt_shard_errors_name_url_and_offset(s3_server, local):
    so = s3_server.storage_options
    bad = _corrupt_copy(s3_server, local["tfrecord"], "bad")
    shard = load_manifest(local["tfrecord"]).shards[1]
    offset = int(np.loadtxt(os.path.join(local["tfrecord"], shard.index), dtype=np.int64)[70, 0])
    where = f"{bad}/{shard.path}"

    report = dlpipe.verify(bad, storage_options=so, raise_on_error=False)
    assert len(report.problems) == 1 and report.problems[0].startswith(where + ": SHA-256 differs")
    with pytest.raises(VerifyError) as e:
        dlpipe.verify(bad, storage_options=so)
    assert "\n" not in str(e.value) and where in str(e.value)
    assert dlpipe.verify(upload(s3_server, local["tfrecord"], "good"), storage_options=so).ok

    # one request per window (record 70's starts mid-shard), or one for the whole shard, whose
    # SHA-256 then stands in for the CRCs until it differs
    for request_bytes in (0, 1 << 20):
        ds = dlpipe.load_dataset(bad, storage_options=so, request_bytes=request_bytes)
        ds.buffer_size = 32
        with pytest.raises(FormatError) as e:
            list(ds)
        assert str(e.value).startswith(f"{where} at byte {offset} (record 70): record data CRC mismatch")
        assert "\n" not in str(e.value)


def test_missing_manifest_is_not_a_dataset(s3_server, local, tmp_path):
    so = s3_server.storage_options
    url = upload(s3_server, local["tfrecord"], "uncommitted", skip=("dataset_info.json",))
    with pytest.raises(FormatError) as remote:
        dlpipe.load_dataset(url, storage_options=so)
    with pytest.raises(FormatError) as here:
        dlpipe.load_dataset(tmp_path)
    assert str(remote.value).replace(url, "X") == str(here.value).replace(str(tmp_path), "X")
    assert str(remote.value).startswith(f"{url}: no dataset_info.json here") and "\n" not in str(remote.value)
    with pytest.raises(FormatError, match="no dataset_info.json"):
        dlpipe.verify("s3://dlpipe/nothing-at-all", storage_options=so)


def test_secrets_never_shown(s3_server, local):
    so = s3_server.storage_options
    url = upload(s3_server, local["tfrecord"], "secret")
    ds = dlpipe.load_dataset(url, storage_options=so)
    shown = [repr(ds), str(ds.info), repr(ds.info), repr(ds.reader().info.location), json.dumps(ds.reader().stats)]
    bad = _corrupt_copy(s3_server, local["tfrecord"], "secret-bad")
    Location(url, so).join(ds.info.shards[2].path).remove()
    calls = [lambda: dlpipe.load_dataset("s3://dlpipe/none", storage_options=so),
             lambda: dlpipe.verify(bad, storage_options=so),
             lambda: list(dlpipe.load_dataset(url, storage_options=so))]
    for call in calls:
        with pytest.raises((FormatError, VerifyError)) as e:
            call()
        shown.append(str(e.value))
    assert "missing" in shown[-1]
    for text in shown:
        assert so["secret"] not in text and so["key"] not in text
