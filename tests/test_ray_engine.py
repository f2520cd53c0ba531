"""The Ray engine on a local Ray instance (2 CPUs): byte-identical to the local engine, a worker
killed mid-shard is retried, dlpipe errors come back as themselves."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import padded_tokens

import dlpipe
from dlpipe.errors import FormatError

ray = pytest.importorskip("ray")

KILLED_SHARD = "killme-00001-of-00004.tfrecord"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    marker = tmp_path_factory.mktemp("failpoint") / "fired"
    # workers inherit the environment of the process that starts Ray
    os.environ["DLPIPE_FAILPOINTS"] = f"shard-partly-written={KILLED_SHARD}@{marker}"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop("DLPIPE_FAILPOINTS", None)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(5)
    ids, _ = padded_tokens(rng, 6000, 40, dtype=np.int32)
    np.save(root / "input_ids.npy", ids)
    np.save(root / "labels.npy", rng.normal(size=(6000, 2)).astype(np.float32))
    return [f"input_ids={root}/input_ids.npy", f"labels={root}/labels.npy"]


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _same_output(a, b) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name != "dataset_info.json":
            assert fa[name] == fb[name], name


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_ray_output_is_byte_identical(ray_cluster, source, tmp_path, fmt):
    opts = dict(format=fmt, pad_id=0, num_shards=5, shuffle=True, seed=1, splits="train=0.9,validation=0.1")
    local = dlpipe.reshard(source, tmp_path / "local", workers=2, **opts)
    remote = dlpipe.reshard(source, tmp_path / "ray", engine="ray", **opts)
    assert (remote.num_records, remote.num_shards, remote.output_bytes) == \
        (local.num_records, local.num_shards, local.output_bytes)
    _same_output(tmp_path / "local", tmp_path / "ray")
    assert ray.is_initialized()  # a cluster the caller started is left running


def test_worker_killed_mid_shard_is_retried(ray_cluster, source, tmp_path):
    opts = dict(pad_id=0, num_shards=4, shuffle=True, splits="killme=1.0")
    assert not ray_cluster.exists()
    dlpipe.reshard(source, tmp_path / "ray", engine="ray", **opts)
    assert ray_cluster.exists(), "the failpoint did not fire: no worker was killed"
    dlpipe.reshard(source, tmp_path / "local", workers=1, **opts)
    _same_output(tmp_path / "local", tmp_path / "ray")
    assert not [p for p in os.listdir(tmp_path / "ray") if p.endswith(".tmp")]


def test_dlpipe_errors_in_tasks_are_not_wrapped(ray_cluster, tmp_path):
    # a raw source whose records are cut short is refused by the scan tasks' reader
    (tmp_path / "a.bin").write_bytes(np.arange(64, dtype=np.int32).tobytes())
    with pytest.raises(FormatError, match="trailing bytes"):
        dlpipe.reshard([tmp_path / "a.bin"], tmp_path / "out", layout="x:int32[5]", engine="ray")


def test_cli_engine_ray_starts_and_stops_its_own_instance(source, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DLPIPE_FAILPOINTS")}
    out = subprocess.run([sys.executable, "-m", "dlpipe.cli", "reshard", *source, "-o", str(tmp_path / "cli"),
                          "--pad-id", "0", "--num-shards", "3", "--engine", "ray"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "6,000 records in 3 shards" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dlpipe.cli", "reshard", *source, "-o", str(tmp_path / "x"),
                          "--pad-id", "0", "--engine", "ray", "--ray-address", "127.0.0.1:1"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "Traceback" not in bad.stderr, bad.stderr
