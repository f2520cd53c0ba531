"""Transient storage faults (issue 12, item 4): through a fault-injecting proxy in front of a
real moto S3 server on 127.0.0.1 (tests/fault_proxy.py), reads and writes are retried with
bounded backoff; an epoch through the PyTorch and tf.data loaders yields exactly the local
batches (nothing lost, nothing repeated), a reshard to S3 is byte-identical to a local one,
the last failure is one line naming the object, and 403/404 are never retried."""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import random
import ssl
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from token_rows import numbered_shards, padded_tokens

import dlpipe
from dlpipe.errors import ConfigError, DlpipeError, FormatError, OutputError
from dlpipe.manifest import load_manifest
from dlpipe.retry import is_transient
from dlpipe.storage import Location, RetryPolicy, StorageError

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

N = 600
FAST = {"attempts": 8, "base_delay": 0.002, "max_delay": 0.02, "timeout": 0.5}  # tests must not wait
# every kind of fault, about 17% of requests in all (the stalls cost a timeout each: few)
MIXED = {"slowdown": 0.05, "internal": 0.02, "throttle": 0.01, "reset": 0.04, "drop": 0.02, "short": 0.02,
         "stall": 0.01}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from s3_server import running

    with running(tmp_path_factory.mktemp("s3")) as srv:
        yield srv


@pytest.fixture
def proxy(server):
    from fault_proxy import FaultProxy

    p = FaultProxy(server.port, stall_seconds=1.0)
    yield p
    p.stop()


def through(proxy, server, **retry) -> dict:
    """Storage options that reach the server through ``proxy``, with fast retries."""
    return {**server.storage_options, "endpoint_url": proxy.endpoint, "dlpipe_retry": {**FAST, **retry}}


@pytest.fixture(scope="module")
def dataset(server, tmp_path_factory):
    """(local dir, s3 URL): 4 uncompressed TFRecord shards of N records, uploaded directly; each
    record's own number is its label."""
    local = numbered_shards(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("local"), N, "labels")
    return local, server.upload(local, "s3://dlpipe/retries")


def same_batches(want: list, got: list) -> int:
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    return len(want)


def labels_of(batches: list) -> list[int]:
    return [int(x) for b in batches for x in np.asarray(b["labels"]).reshape(-1)]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- the policy -------------------------------------------------------------------------------

_values = st.fixed_dictionaries({}, optional={
    "attempts": st.integers(1, 1000),
    "base_delay": st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    "max_delay": st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    "timeout": st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False),
})


@given(_values, st.sampled_from([", ", ",", " "]))
def test_policy_text_round_trips(values, sep):
    text = sep.join(f"{k}={v!r}" for k, v in values.items())
    policy = RetryPolicy.resolve(text, environ={})
    assert policy == RetryPolicy(**values)
    assert RetryPolicy.resolve(values, environ={}) == policy  # the dict form (CLI: dlpipe_retry.attempts=3)


@given(_values, _values)
def test_option_beats_environment_beats_defaults(env_values, option):
    env = {f"DLPIPE_RETRY_{k.upper()}": repr(v) for k, v in env_values.items()}
    assert RetryPolicy.resolve(option, environ=env) == RetryPolicy(**{**env_values, **option})


@given(st.text(max_size=40))
def test_any_text_is_a_policy_or_a_config_error(text):
    try:
        policy = RetryPolicy.resolve(text, environ={})
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert 1 <= policy.attempts <= 1000 and policy.timeout > 0


@pytest.mark.parametrize("bad", ["attempts=0", "attempts=2.5", "attempts=x", "timeout=0", "base_delay=-1",
                                 "max_delay=inf", "tries=3", "attempts", {"attempts": True}, 3])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError) as e:
        RetryPolicy.resolve(bad, environ={})
    one_line(e.value)


def test_bad_environment_names_the_variable():
    with pytest.raises(ConfigError, match="DLPIPE_RETRY_ATTEMPTS='many'"):
        RetryPolicy.resolve(None, environ={"DLPIPE_RETRY_ATTEMPTS": "many"})


@settings(max_examples=200)
@given(st.builds(RetryPolicy, attempts=st.integers(1, 40), base_delay=st.floats(0, 10), max_delay=st.floats(0, 60)),
       st.integers(0, 2**32))
def test_backoff_is_bounded_and_jittered(policy, seed):
    rng = random.Random(seed)
    waits = [policy.delay(n, rng) for n in range(1, policy.attempts)]
    for n, w in enumerate(waits, 1):
        assert 0 <= w <= min(policy.max_delay, policy.base_delay * 2 ** (n - 1)) + 1e-9
    assert sum(waits) <= policy.max_total_delay + 1e-6
    assert policy.max_total_delay <= (policy.attempts - 1) * policy.max_delay + 1e-6


def test_defaults():
    p = RetryPolicy()
    assert (p.attempts, p.base_delay, p.max_delay, p.timeout) == (8, 0.05, 5.0, 15.0)
    assert p.max_total_delay == pytest.approx(6.35)


def test_classification():
    class ClientError(Exception):  # botocore's shape, without importing it
        def __init__(self, status, code):
            super().__init__(code)
            self.response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}

    def translated(status, code):  # what s3fs raises: an OSError caused by the ClientError
        try:
            raise ClientError(status, code)
        except ClientError as e:
            err = OSError(errno.EBUSY if status in (409, 503) else errno.EIO, "m")
            err.__cause__ = e
            return err

    for status, code in [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests"), (503, "503"),
                         (400, "RequestTimeout"), (504, "GatewayTimeout")]:
        assert is_transient(translated(status, code)), (status, code)
    for status, code in [(403, "AccessDenied"), (404, "NoSuchKey"), (403, "InvalidAccessKeyId"), (400, "BadDigest"),
                         (416, "InvalidRange"), (409, "BucketNotEmpty")]:
        assert not is_transient(translated(status, code)), (status, code)
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(BrokenPipeError())
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    assert not is_transient(ssl.SSLCertVerificationError("certificate verify failed"))
    assert not is_transient(ValueError("bad")) and not is_transient(ConfigError("x"))
    e = StorageError("s3://b/k", "s3://b/k: read failed after 3 attempts; last error: x", 3)
    assert isinstance(e, OSError) and isinstance(e, DlpipeError) and not is_transient(e)
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), str(back), back.url, back.attempts) == (StorageError, str(e), "s3://b/k", 3)


# -- single calls -----------------------------------------------------------------------------


def test_each_fault_is_retried(server, proxy):
    data = bytes(range(256)) * 64
    Location("s3://dlpipe/one", server.storage_options).write_bytes(data)
    loc = Location("s3://dlpipe/one", through(proxy, server))
    for fault in ("slowdown", "internal", "throttle", "drop", "reset", "short", "stall"):
        proxy.log.clear()
        proxy.rates, proxy.eligible = {fault: 1.0}, _first_of_each()  # the first request of each kind fails
        assert loc.read_bytes(100, 9000) == data[100:9000], fault
        assert loc.read_bytes() == data, fault
        assert loc.size() == len(data) and loc.isfile(), fault
        loc.write_bytes(data[::-1])
        loc.write_bytes(data)
        assert fault in proxy.faults(), (fault, proxy.log)
    assert Location("s3://dlpipe/one", server.storage_options).read_bytes() == data


def _first_of_each():
    seen: set = set()

    def eligible(method, path):
        key = (method, path.split("?")[0])
        if key in seen:
            return False
        seen.add(key)
        return True

    return eligible


def test_a_short_range_is_read_again_and_the_real_end_is_not_a_fault(server, proxy):
    data = os.urandom(20_000)
    Location("s3://dlpipe/short", server.storage_options).write_bytes(data)
    loc = Location("s3://dlpipe/short", through(proxy, server, attempts=3))
    # every ranged GET comes back with a consistent, halved body: only the length check sees it
    proxy.rates, proxy.eligible = {"short": 1.0}, lambda method, path: method == "GET"
    with pytest.raises(StorageError) as e:
        loc.read_bytes(1000, 11_000)
    assert "got 5000 of 10000 bytes" in one_line(e.value) and "after 3 attempts" in str(e.value)
    assert len([r for r in proxy.log if r[0] == "GET"]) == 3
    proxy.rates, proxy.eligible = {"short": 0.5}, lambda method, path: method == "GET"
    for start in range(0, 20_000, 2500):
        assert loc.read_bytes(start, start + 2500) == data[start:start + 2500]
    proxy.rates = {}
    assert loc.read_bytes(19_990, 20_100) == data[19_990:]  # past the end: what there is, once


# -- (a), (b): exactly once through the loaders ------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_epoch_exactly_once_under_faults(dataset, server, proxy, num_workers):
    pytest.importorskip("torch")
    local, url = dataset
    proxy.rates = MIXED
    # windows of 32 records, one range request each: many requests, each a chance to fail
    # (the same blocks for both: over object storage they default to >= 1 MiB)
    remote = dlpipe.load_dataset(url, storage_options=through(proxy, server), request_bytes=0)
    want, got = (list(ds.shuffle(seed=3, buffer_size=32, block_records=16)
                      .to_torch_dataloader(batch_size=16, num_workers=num_workers))
                 for ds in (dlpipe.load_dataset(local), remote))
    assert same_batches(want, got) == len(want)
    assert sorted(labels_of(got)) == list(range(N))  # nothing lost, nothing repeated
    assert sum(proxy.faults().values()) >= 3, proxy.faults()
    assert len(proxy.log) >= 40


@pytest.mark.tf
def test_tf_epoch_exactly_once_under_faults(dataset, server, proxy):
    pytest.importorskip("tensorflow")
    local, url = dataset
    proxy.rates = MIXED
    remote = dlpipe.load_dataset(url, storage_options=through(proxy, server), request_bytes=1500)
    # shuffled: blocks of 16 records, a range request each; in order: chunks of ~1500 bytes
    for prepare in (lambda ds: ds.shuffle(seed=3, buffer_size=32, block_records=16), lambda ds: ds):
        want, got = (list(prepare(ds).to_tf_dataset(batch_size=16)) for ds in (dlpipe.load_dataset(local), remote))
        assert same_batches(want, got) == len(want)
        assert sorted(labels_of(got)) == list(range(N))  # nothing lost, nothing repeated
    assert sum(proxy.faults().values()) >= 3, proxy.faults()
    assert len(proxy.log) >= 60


def test_cache_fill_under_faults_is_verified_and_complete(dataset, server, proxy, tmp_path):
    local, url = dataset
    proxy.rates = MIXED
    ds = dlpipe.load_dataset(url, storage_options=through(proxy, server), cache_dir=tmp_path)
    assert [int(r["labels"]) for r in ds] == [int(r["labels"]) for r in dlpipe.load_dataset(local)]
    for shard in load_manifest(local).shards:  # whole, verified copies
        cached = [p for p in os.listdir(tmp_path / "shards") if p.endswith(shard.path)]
        with open(tmp_path / "shards" / cached[0], "rb") as f, open(os.path.join(local, shard.path), "rb") as g:
            assert f.read() == g.read()


# -- (c): a reshard to S3 through the faults ---------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(7)
    ids, _ = padded_tokens(rng, 2000, 32, dtype=np.int32)
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", rng.normal(size=(2000, 2)).astype(np.float32))
    return src


OPTS = dict(pad_id=0, num_shards=6, shuffle=True, seed=3, splits="train=0.8,test=0.2", workers=2, progress=False)


def _files(local_dir) -> list[str]:
    return sorted(n for n in os.listdir(local_dir) if not n.startswith(".") and n != "dataset_info.json")


def test_reshard_to_s3_through_faults_is_byte_identical(corpus, server, proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("DLPIPE_CACHE_DIR", str(tmp_path / "cache"))  # the sources are fetched through faults too
    so = server.storage_options
    sources = [f"input_ids={corpus}/input_ids.npy", f"labels={corpus}/labels.npy"]
    dlpipe.reshard(sources, tmp_path / "local", **OPTS)
    for name in ("input_ids.npy", "labels.npy"):
        target = Location(f"s3://dlpipe/faulty-src/{name}", so)
        target.fs.put_file(str(corpus / name), target.fs_path)
    proxy.rates = {**MIXED, "stall": 0.0}  # stalls would only slow the test: they are covered above
    remote_sources = ["input_ids=s3://dlpipe/faulty-src/input_ids.npy", "labels=s3://dlpipe/faulty-src/labels.npy"]
    for sources_used, out in ((sources, "s3://dlpipe/faulty-out-a"), (remote_sources, "s3://dlpipe/faulty-out-b")):
        summary = dlpipe.reshard(sources_used, out, storage_options=through(proxy, server), **OPTS)
        assert summary.num_records == 2000
        clean = Location(out, so)
        names = _files(tmp_path / "local")
        assert sorted(n for n in clean.listdir() if n != "dataset_info.json") == names
        for name in names:
            with open(tmp_path / "local" / name, "rb") as f:
                assert clean.join(name).read_bytes() == f.read(), name
        with open(tmp_path / "local" / "dataset_info.json") as f:
            want = json.load(f)["dlpipe"]["shards"]
        assert json.loads(clean.join("dataset_info.json").read_bytes())["dlpipe"]["shards"] == want
    assert sum(1 for r in proxy.log if r[2]) >= 5, proxy.faults()
    assert any(r[0] == "PUT" and r[2] for r in proxy.log), "no upload met a fault"


# -- (d): after the last attempt, one line naming the object ------------------------------------


def test_loader_gives_up_with_one_line_naming_the_shard(dataset, server, proxy):
    local, url = dataset
    shard = load_manifest(local).shards[1].path
    proxy.always = {f"/retries/{shard}$": "slowdown"}  # the data, not its index
    so = through(proxy, server, attempts=3)
    ds = dlpipe.load_dataset(url, storage_options=so)
    with pytest.raises(StorageError) as e:
        list(ds)
    text = one_line(e.value)
    assert text.startswith(f"{url}/{shard}: read of bytes 0-") and "failed after 3 attempts" in text
    assert "HTTP 503 SlowDown (Please reduce your request rate.)" in text
    assert so["secret"] not in text and so["key"] not in text
    # exactly the attempts: no layer below retried
    assert len([r for r in proxy.log if r[1] == f"/dlpipe/retries/{shard}"]) == 3


@pytest.mark.torch
def test_torch_worker_gives_up_with_the_same_error(dataset, server, proxy):
    pytest.importorskip("torch")
    _, url = dataset
    proxy.always = {r"/retries/train-00002-of-00004\.tfrecord$": "internal"}
    ds = dlpipe.load_dataset(url, storage_options=through(proxy, server, attempts=2))
    with pytest.raises(StorageError) as e:
        list(ds.to_torch_dataloader(batch_size=16, num_workers=2))
    assert "failed after 2 attempts; last error: HTTP 500 InternalError" in one_line(e.value)
    assert "s3://dlpipe/retries/train-00002" in str(e.value)
    del e  # its traceback holds the loader's iterator: shut the workers down here, not in a later test
    gc.collect()


def test_timeouts_give_up_within_the_bound(server, proxy):
    Location("s3://dlpipe/slow", server.storage_options).write_bytes(b"x" * 1000)
    loc = Location("s3://dlpipe/slow", through(proxy, server, attempts=2, timeout=0.3))
    assert loc.isfile()  # the client is set up before the clock starts (botocore's models load slowly)
    proxy.always = {"/dlpipe/slow": "stall"}
    proxy.log.clear()
    t = time.monotonic()
    with pytest.raises(StorageError) as e:
        loc.read_bytes(0, 10)
    took = time.monotonic() - t
    assert "read of bytes 0-10 failed after 2 attempts; last error: ReadTimeoutError" in one_line(e.value)
    assert took < 2 * 0.3 + FAST["max_delay"] + 1.5  # 2 timeouts, one backoff, s3fs's 0.1 s pauses
    assert len(proxy.requests_for("/dlpipe/slow")) == 2


def test_reshard_gives_up_with_one_line_naming_the_object(corpus, server, proxy):
    sources = [f"input_ids={corpus}/input_ids.npy", f"labels={corpus}/labels.npy"]
    proxy.always = {"/dlpipe/gives-up/train-00001": "slowdown"}
    so = through(proxy, server, attempts=3)
    with pytest.raises(OutputError) as e:
        dlpipe.reshard(sources, "s3://dlpipe/gives-up", storage_options=so, **{**OPTS, "workers": 1})
    text = one_line(e.value)
    assert "s3://dlpipe/gives-up/train-00001-of-" in text and "upload failed after 3 attempts" in text
    assert "SlowDown" in text and "rerun" in text
    assert so["secret"] not in text and so["key"] not in text
    assert all(n <= 3 for n in _per_key(proxy.requests_for("/dlpipe/gives-up/train-00001")).values())


def test_cli_takes_the_policy_as_a_storage_option(corpus, server, proxy):
    from click.testing import CliRunner

    from dlpipe.cli import main

    so = {**server.storage_options, "endpoint_url": proxy.endpoint}
    args = ["reshard", f"input_ids={corpus}/input_ids.npy", "-o", "s3://dlpipe/cli-retry", "--pad-id", "0",
            "--num-shards", "2", "--storage-option", f"key={so['key']}", "--storage-option", f"secret={so['secret']}",
            "--storage-option", f"endpoint_url={so['endpoint_url']}",
            "--storage-option", "client_kwargs.region_name=us-east-1"]
    proxy.always = {"/dlpipe/cli-retry": "slowdown"}
    bad = CliRunner().invoke(main, [*args, "--storage-option", "dlpipe_retry.attempts=2",
                                    "--storage-option", "dlpipe_retry.base_delay=0.001"])
    assert bad.exit_code == 1
    assert bad.stderr.count("\n") == 1 and "s3://dlpipe/cli-retry" in bad.stderr, bad.stderr
    assert "after 2 attempts; last error: HTTP 503" in bad.stderr, bad.stderr
    assert so["secret"] not in bad.output and so["key"] not in bad.output
    assert max(_per_key(proxy.log).values()) == 2
    wrong = CliRunner().invoke(main, [*args, "--storage-option", "dlpipe_retry.attempts=0"])
    assert wrong.exit_code == 1 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "retry attempts=0: expected an integer from 1 to 1000" in wrong.stderr


def _per_key(log) -> dict:
    out: dict = {}
    for method, path, _ in log:
        key = (method, path.split("?")[0])
        out[key] = out.get(key, 0) + 1
    return out


def test_environment_sets_the_attempts(server, proxy, monkeypatch):
    Location("s3://dlpipe/env", server.storage_options).write_bytes(b"x" * 100)
    monkeypatch.setenv("DLPIPE_RETRY_ATTEMPTS", "4")
    monkeypatch.setenv("DLPIPE_RETRY_BASE_DELAY", "0.001")
    proxy.always = {"/dlpipe/env": "slowdown"}
    loc = Location("s3://dlpipe/env", {**server.storage_options, "endpoint_url": proxy.endpoint})
    assert loc.retry_policy == RetryPolicy(attempts=4, base_delay=0.001)
    with pytest.raises(StorageError, match="after 4 attempts"):
        loc.read_bytes(0, 10)
    assert len(proxy.log) == 4


# -- (e): what is not transient is not retried -------------------------------------------------


def test_missing_and_forbidden_objects_are_not_retried(dataset, server, proxy):
    _, url = dataset
    so = through(proxy, server)
    with pytest.raises(FileNotFoundError):
        Location("s3://dlpipe/no-such-key", so).read_bytes(0, 10)
    assert len(proxy.requests_for("/no-such-key")) == 1
    with pytest.raises(FormatError, match="no dataset_info.json"):
        dlpipe.load_dataset("s3://dlpipe/no-dataset-here", storage_options=so)
    assert all(n == 1 for n in _per_key(proxy.requests_for("/no-dataset-here")).values())

    Location("s3://dlpipe/secret-object", server.storage_options).write_bytes(b"x" * 100)
    proxy.always = {"/secret-object": "forbidden"}
    for call in (lambda loc: loc.read_bytes(0, 10), lambda loc: loc.read_bytes(), lambda loc: loc.write_bytes(b"y")):
        proxy.log.clear()
        with pytest.raises(PermissionError):
            call(Location("s3://dlpipe/secret-object", so))
        assert len(proxy.log) == 1, proxy.log

    shard = load_manifest(dataset[0]).shards[0].path
    proxy.always = {f"/retries/{shard}$": "forbidden"}
    proxy.log.clear()
    ds = dlpipe.load_dataset(url, storage_options=so)
    with pytest.raises(FormatError) as e:
        list(ds)
    assert f"{url}/{shard}" in one_line(e.value)
    assert len([r for r in proxy.log if r[1] == f"/dlpipe/retries/{shard}"]) == 1


def test_bad_credentials_are_not_retried(server, proxy):
    """moto checks no signatures, so the proxy answers as S3 does for an unknown key id."""
    proxy.errors["bad-key"] = (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist.")
    proxy.always = {"/dlpipe/": "bad-key"}
    with pytest.raises(PermissionError):
        Location("s3://dlpipe/anything", through(proxy, server)).write_bytes(b"x")
    assert len(proxy.log) == 1


def test_inner_layers_try_once(server):
    """dlpipe's policy is the one that counts: s3fs's loop and botocore's retries are off,
    unless the caller set botocore's in config_kwargs; the timeout reaches botocore."""
    loc = Location("s3://dlpipe/x", {**server.storage_options, "dlpipe_retry": "timeout=7"})
    fs = loc.fs
    assert fs.retries == 1
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1}
    assert fs.config_kwargs["read_timeout"] == fs.config_kwargs["connect_timeout"] == 7
    assert "dlpipe_retry" not in fs.storage_options
    mine = Location("s3://dlpipe/x", {**server.storage_options, "config_kwargs": {"retries": {"max_attempts": 2}}})
    assert mine.fs.config_kwargs["retries"] == {"max_attempts": 2}


def test_local_paths_are_not_retried(monkeypatch):
    calls = []
    real = open

    def failing_open(*args, **kwargs):
        calls.append(args[0])
        raise ConnectionResetError("local")

    loc = Location(os.path.join(tempfile.gettempdir(), "dlpipe-no-such-file"))
    monkeypatch.setattr("builtins.open", failing_open)
    try:
        with pytest.raises(ConnectionResetError):
            loc.read_bytes()
    finally:
        monkeypatch.setattr("builtins.open", real)
    assert len(calls) == 1
