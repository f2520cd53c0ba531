"""The Ray engine on a local Ray instance (2 CPUs): byte-identical to the local engine, a worker
killed mid-shard is retried, dlpipe errors come back as themselves, the CLI stays one line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from token_rows import padded_tokens

import dlpipe
from dlpipe.errors import DlpipeError, PaddingError

ray = pytest.importorskip("ray")

KILLED_SHARD = "killme-00001-of-00004.tfrecord"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray shared by the module; yields the failpoint's marker file."""
    marker = tmp_path_factory.mktemp("failpoint") / "fired"
    # the workers of a local instance inherit the environment of the process that starts it
    os.environ["DLPIPE_FAILPOINTS"] = f"shard-partly-written={KILLED_SHARD}@{marker}"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop("DLPIPE_FAILPOINTS", None)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(5)
    ids, _ = padded_tokens(rng, 6000, 40, dtype=np.int32)
    ids[:3] = 0  # empty records
    ids[3:6] = rng.integers(1, 100, (3, 40))  # full ones
    np.save(root / "input_ids.npy", ids)
    np.save(root / "labels.npy", rng.normal(size=(6000, 2)).astype(np.float32))
    return [f"input_ids={root}/input_ids.npy", f"labels={root}/labels.npy"]


def assert_same_files(a, b) -> None:
    """Every file under a and b, the manifest included, byte for byte."""
    fa = {p.relative_to(a): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    fb = {p.relative_to(b): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}
    assert sorted(fa) == sorted(fb)
    assert [name for name in fa if fa[name] != fb[name]] == []


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_ray_output_is_byte_identical(ray_cluster, source, tmp_path, fmt):
    opts = dict(format=fmt, pad_id=0, num_shards=5, shuffle=True, seed=1, splits="train=0.9,validation=0.1")
    local = dlpipe.reshard(source, tmp_path / "local", workers=1, **opts)
    remote = dlpipe.reshard(source, tmp_path / "ray", engine="ray", **opts)
    assert (remote.num_records, remote.num_shards, remote.output_bytes) == \
        (local.num_records, local.num_shards, local.output_bytes)
    assert remote.shards_written == local.num_shards > 1
    assert_same_files(tmp_path / "local", tmp_path / "ray")
    assert ray.is_initialized()  # Ray the caller started is left running


def test_worker_killed_mid_shard_is_retried(ray_cluster, source, tmp_path):
    opts = dict(pad_id=0, num_shards=4, shuffle=True, splits="killme=1.0")
    assert not ray_cluster.exists()
    dlpipe.reshard(source, tmp_path / "ray", engine="ray", **opts)
    assert ray_cluster.exists(), "the failpoint did not fire: no worker was killed"
    dlpipe.reshard(source, tmp_path / "local", workers=1, **opts)
    assert_same_files(tmp_path / "local", tmp_path / "ray")


def test_padding_error_in_a_scan_task_comes_back_unwrapped(ray_cluster, tmp_path):
    lengths = np.full(3000, 4, dtype=np.int32)
    lengths[2500] = 41  # a corrupt record: longer than its padded width
    np.save(tmp_path / "ids.npy", np.ones((3000, 40), np.int32))
    np.save(tmp_path / "len.npy", lengths)
    specs = [f"input_ids={tmp_path}/ids.npy", f"length={tmp_path}/len.npy"]
    with pytest.raises(PaddingError, match=r"\(record 2500\): lengths column 'length' holds 41") as err:
        dlpipe.reshard(specs, tmp_path / "out", lengths_column="length", engine="ray")
    assert type(err.value) is PaddingError and err.value.record == 2500
    assert not (tmp_path / "out" / "dataset_info.json").exists()


def test_executor_order_and_exhausted_retries(ray_cluster):
    from dlpipe.reshard.executors import RayExecutor

    pool = RayExecutor(initializer=abs, initargs=(0,))
    assert list(pool.map(abs, [-3, 1, -2, 0])) == [3, 1, 2, 0]
    crashing = RayExecutor(initializer=abs, initargs=(0,), max_retries=0)
    with pytest.raises(DlpipeError, match=r"Ray task _exit failed after 0 retries .*rerun to resume"):
        list(crashing.map(os._exit, [3]))  # the worker process exits: a system failure
    crashing.shutdown(cancel_futures=True)
    assert ray.is_initialized()


def test_executor_runs_its_initializer_once_per_worker(ray_cluster, tmp_path):
    """``RayExecutor(initializer=, initargs=)`` as ``ProcessPoolExecutor``: each worker runs the
    initializer with the initargs once, before its first task."""
    from dlpipe.reshard.executors import RayExecutor

    log = tmp_path / "inits"

    def init(tag, path):  # local functions travel by value: the workers need not import this file
        os.environ["DLPIPE_TEST_JOB"] = tag
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    def task(x):
        return os.environ.get("DLPIPE_TEST_JOB"), 2 * x

    pool = RayExecutor(initializer=init, initargs=("job-1", str(log)))
    try:
        assert list(pool.map(task, range(8))) == [("job-1", 2 * i) for i in range(8)]
        assert list(pool.map(task, [5])) == [("job-1", 10)]
    finally:
        pool.shutdown()
    pids = log.read_text().split()
    assert 1 <= len(pids) == len(set(pids)) <= 2  # once per worker, 2 CPUs
    assert ray.is_initialized()  # the caller's Ray is left running


def test_cli_engine_ray_starts_its_own_instance(source, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DLPIPE_FAILPOINTS")}
    cmd = [sys.executable, "-m", "dlpipe", "reshard", *source, "--pad-id", "0", "--engine", "ray"]
    good = subprocess.run([*cmd, "-o", str(tmp_path / "cli"), "--num-shards", "3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "6,000 records in 3 shards" in good.stdout and good.stderr == ""
    bad = subprocess.run([*cmd, "-o", str(tmp_path / "x"), "--ray-address", "127.0.0.1:1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.startswith("dlpipe: error: --ray-address 127.0.0.1:1: cannot connect to Ray")
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
