"""Reshard to and from a real S3 server (moto, on 127.0.0.1): byte-identical to a local run,
the manifest as commit point, resume after the server dies mid-upload, no secrets in output."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from token_rows import padded_tokens

import dlpipe
from dlpipe.cli import main
from dlpipe.errors import FormatError, OutputError
from dlpipe.sources import open_source
from dlpipe.storage import Location

pytest.importorskip("s3fs")


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(7)
    ids, _ = padded_tokens(rng, 3000, 48, dtype=np.int32)
    labels = rng.normal(size=(3000, 2)).astype(np.float32)
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", labels)
    return src


def _sources(root: str) -> list[str]:
    return [f"input_ids={root}/input_ids.npy", f"labels={root}/labels.npy"]


OPTS = dict(pad_id=0, num_shards=6, shuffle=True, seed=3, splits="train=0.8,test=0.2", workers=2)


def _same_files(local_dir, remote: Location) -> list[str]:
    names = sorted(n for n in os.listdir(local_dir) if not n.startswith("."))
    assert sorted(remote.listdir()) == names
    for name in names:
        if name == "dataset_info.json":
            continue
        with open(os.path.join(local_dir, name), "rb") as f:
            assert remote.join(name).read_bytes() == f.read(), name
    return names


def _manifest_shards(loc: Location) -> list:
    return json.loads(loc.join("dataset_info.json").read_bytes())["dlpipe"]["shards"]


def _upload(local_dir, loc: Location) -> None:
    for name in os.listdir(local_dir):
        loc.join(name).fs.put_file(os.path.join(local_dir, name), loc.join(name).fs_path)


def test_local_to_s3_and_s3_to_s3_match_local_bytes(s3_server, corpus, tmp_path):
    so = s3_server.storage_options
    dlpipe.reshard(_sources(str(corpus)), tmp_path / "local", **OPTS)

    dlpipe.reshard(_sources(str(corpus)), "s3://dlpipe/from-local", storage_options=so, **OPTS)
    names = _same_files(tmp_path / "local", Location("s3://dlpipe/from-local", so))
    assert ".dlpipe" not in names  # the run's state is gone once the manifest is written

    _upload(corpus, Location("s3://dlpipe/src", so))
    summary = dlpipe.reshard(_sources("s3://dlpipe/src"), "s3://dlpipe/from-s3", storage_options=so, **OPTS)
    remote = Location("s3://dlpipe/from-s3", so)
    _same_files(tmp_path / "local", remote)
    # shuffled shards take rows from anywhere: each file was fetched once into the cache, not
    # re-read by range for every chunk
    cached = sorted(p.name for p in Path(os.environ["DLPIPE_CACHE_DIR"], "objects").glob("*/*.npy"))
    assert {"input_ids.npy", "labels.npy"} <= set(cached)
    assert summary.output == "s3://dlpipe/from-s3" and summary.output_bytes > 0
    with open(tmp_path / "local" / "dataset_info.json") as f:
        assert _manifest_shards(remote) == json.load(f)["dlpipe"]["shards"]
    source = json.loads(remote.join("dataset_info.json").read_bytes())["dlpipe"]["source"]
    assert source["paths"] == ["s3://dlpipe/src/input_ids.npy", "s3://dlpipe/src/labels.npy"]

    again = dlpipe.reshard(_sources("s3://dlpipe/src"), "s3://dlpipe/from-s3", storage_options=so, **OPTS)
    assert again.shards_written == 0 and again.shards_reused == summary.num_shards

    other = {**OPTS, "num_shards": 3}
    with pytest.raises(OutputError, match="already holds a dataset made from other inputs"):
        dlpipe.reshard(_sources("s3://dlpipe/src"), "s3://dlpipe/from-s3", storage_options=so, **other)
    replaced = dlpipe.reshard(_sources("s3://dlpipe/src"), "s3://dlpipe/from-s3", storage_options=so,
                              overwrite=True, **other)
    assert replaced.num_shards == 4  # 3 for train, 1 for test
    assert len([n for n in remote.listdir() if n.endswith(".tfrecord")]) == 4


def test_remote_staged_source_kind(s3_server, tmp_path, monkeypatch):
    """Kinds without fixed row offsets (here a padded TFRecord file) are fetched into the cache once."""
    monkeypatch.setenv("DLPIPE_CACHE_DIR", str(tmp_path / "cache"))
    so = s3_server.storage_options
    ids, _ = padded_tokens(np.random.default_rng(1), 500, 16)
    np.save(tmp_path / "ids.npy", ids)
    dlpipe.reshard([f"input_ids={tmp_path}/ids.npy"], tmp_path / "padded", pad_id=0, num_shards=1,
                   sequence_columns=[], int_encoding="int64_list")  # padded, as legacy pipelines wrote them
    legacy = next(p for p in os.listdir(tmp_path / "padded") if p.endswith(".tfrecord"))
    Location(f"s3://dlpipe/legacy/{legacy}", so).put_file(str(tmp_path / "padded" / legacy))
    a = dlpipe.reshard([f"s3://dlpipe/legacy/{legacy}"], tmp_path / "a", pad_id=0, num_shards=2, storage_options=so)
    assert a.num_records == 500
    b = dlpipe.reshard([f"s3://dlpipe/legacy/{legacy}"], "s3://dlpipe/b", pad_id=0, num_shards=2, storage_options=so)
    assert b.num_records == 500
    assert len(os.listdir(tmp_path / "cache" / "objects")) == 1  # fetched once, reused

    # a worker on another machine (no cache there) fetches its own copy when it unpickles the source
    source = open_source([f"s3://dlpipe/legacy/{legacy}"], storage_options=so)
    expected, fingerprint = source.read(0, 500), source.fingerprint()
    shutil.rmtree(tmp_path / "cache")
    clone = pickle.loads(pickle.dumps(source))
    for name, values in clone.read(0, 500).items():
        np.testing.assert_array_equal(values, expected[name])
    # and a copy fetched again is the same input: a rerun there resumes the same plan
    shutil.rmtree(tmp_path / "cache")
    assert open_source([f"s3://dlpipe/legacy/{legacy}"], storage_options=so).fingerprint() == fingerprint


def test_missing_remote_source_and_bad_output(s3_server, corpus):
    so = s3_server.storage_options
    with pytest.raises(FormatError, match="s3://dlpipe/nope.npy.*no such file"):
        dlpipe.reshard(["s3://dlpipe/nope.npy"], "s3://dlpipe/x", pad_id=0, storage_options=so)
    with pytest.raises(OutputError, match="s3://no-such-bucket/x"):
        dlpipe.reshard(_sources(str(corpus)), "s3://no-such-bucket/x", storage_options=so, **OPTS)


def test_cli_storage_options_and_no_secret_in_output(s3_server, corpus):
    so = s3_server.storage_options
    args = ["--storage-option", f"key={so['key']}", "--storage-option", f"secret={so['secret']}",
            "--storage-option", f"endpoint_url={so['endpoint_url']}",
            "--storage-option", "client_kwargs.region_name=us-east-1"]
    ok = CliRunner().invoke(main, ["reshard", *_sources(str(corpus)), "-o", "s3://dlpipe/cli", "--pad-id", "0",
                                   "--num-shards", "3", *args])
    assert ok.exit_code == 0, ok.output
    assert "3,000 records in 3 shards" in ok.output
    checked = CliRunner().invoke(main, ["verify", "s3://dlpipe/cli", *args])
    assert checked.exit_code == 0, checked.output
    assert "3,000 records" in checked.output or "3000 records" in checked.output, checked.output
    described = CliRunner().invoke(main, ["inspect", "s3://dlpipe/cli", *args])
    assert described.exit_code == 0 and "input_ids" in described.output, described.output
    bad = CliRunner().invoke(main, ["reshard", "s3://dlpipe/missing.npy", "-o", "s3://dlpipe/cli2",
                                    "--pad-id", "0", *args])
    assert bad.exit_code == 1
    assert bad.stderr.count("\n") == 1 and "s3://dlpipe/missing.npy" in bad.stderr
    for result in (ok, checked, described, bad):
        assert so["secret"] not in result.output and so["key"] not in result.output
    manifest = Location("s3://dlpipe/cli/dataset_info.json", so).read_bytes().decode()
    assert so["secret"] not in manifest and so["key"] not in manifest
    assert so["secret"] not in repr(Location("s3://dlpipe/cli", so))


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "dlpipe.cli", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_server_killed_mid_upload_then_rerun_completes(persistent_s3_server, tmp_path):
    """SIGKILL the S3 server while shards upload: the run fails in one line, no manifest and no
    partial object is visible, and a rerun after the restart reuses what finished and ends
    byte-identical to a local run. Credentials come from the environment (AWS_*)."""
    server = persistent_s3_server
    rng = np.random.default_rng(11)
    ids, _ = padded_tokens(rng, 40_000, 64, dtype=np.int32)
    np.save(tmp_path / "input_ids.npy", ids)
    args = [f"input_ids={tmp_path}/input_ids.npy", "--pad-id", "0", "--num-shards", "40", "--shuffle", "-j", "1",
            # fail fast once the server is gone instead of retrying for minutes
            "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2}']
    dlpipe.reshard([f"input_ids={tmp_path}/input_ids.npy"], tmp_path / "local", pad_id=0, num_shards=40,
                   shuffle=True, workers=1)
    out = Location("s3://dlpipe/killed", server.storage_options)
    proc = _cli(["reshard", *args, "-o", "s3://dlpipe/killed"], server.env)
    deadline = time.monotonic() + 60
    while True:
        names = [n for n in out.file_sizes() if n.endswith(".tfrecord")]
        if len(names) >= 3 or proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the reshard finished before the server could be killed"
    server.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dlpipe: error: ") and "Traceback" not in err, err
    assert "rerun" in lines[0]

    server.start()
    sizes = out.file_sizes()
    assert "dataset_info.json" not in sizes  # not committed
    for name, size in sizes.items():  # whatever is visible is whole
        assert size == os.path.getsize(tmp_path / "local" / name), name
    rerun = _cli(["reshard", *args, "-o", "s3://dlpipe/killed"], server.env)
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "reused from an earlier run" in stdout
    _same_files(tmp_path / "local", out)
