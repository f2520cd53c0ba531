"""Locations and storage options: local fast paths, URLs through fsspec, secrets kept out of sight."""

from __future__ import annotations

import contextlib
import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from token_rows import padded_tokens

import dlpipe
from dlpipe.errors import ConfigError, MissingDependencyError
from dlpipe.storage import Location, is_remote, parse_storage_options


@pytest.mark.parametrize(("path", "remote"), [
    ("s3://bucket/key", True), ("gs://b/k", True), ("memory://x", True), ("file:///tmp/x", False),
    ("/tmp/x", False), ("relative/dir", False), ("input_ids=/tmp/x.npy", False), ("C:/data", False),
])
def test_is_remote(path, remote):
    assert is_remote(path) is remote


keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
values = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.text("abc:/.-_ ", min_size=1, max_size=12))


@given(st.dictionaries(keys, values, max_size=5))
def test_storage_options_round_trip(options):
    pairs = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items()]
    parsed = parse_storage_options(pairs)
    for k, v in options.items():
        expected = v
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                expected = json.loads(v)
        assert parsed[k] == expected


def test_storage_options_nest_and_reject():
    assert parse_storage_options(["client_kwargs.region_name=eu-west-1", "anon=true", "n=3"]) == {
        "client_kwargs": {"region_name": "eu-west-1"}, "anon": True, "n": 3}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_storage_options(["endpoint_url"])
    with pytest.raises(ConfigError, match="both as a value and as a group"):
        parse_storage_options(["a=1", "a.b=2"])


def test_location_never_shows_options_and_pickles_without_a_filesystem():
    loc = Location("memory://bucket/data", {"secret": "hunter2"})
    assert "hunter2" not in repr(loc) and "hunter2" not in str(loc) and "hunter2" not in repr(loc.join("x"))
    loc.join("a.bin").write_bytes(b"0123456789")
    assert not loc.isfile() and loc._fs is not None
    clone = pickle.loads(pickle.dumps(loc))
    assert clone._fs is None and clone.join("a.bin").read_bytes(2, 5) == b"234"
    assert loc.listdir() == ["a.bin"] and loc.file_sizes() == {"a.bin": 10}


def test_missing_backend_names_the_extra(monkeypatch):
    import fsspec

    def missing(*a, **k):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "filesystem", missing)
    with pytest.raises(MissingDependencyError, match=r"pip install 'dlpipe\[gcs\]'"):
        Location("gs://bucket/x").exists()


def test_file_urls_and_memory_urls_reshard_like_paths(tmp_path):
    ids, _ = padded_tokens(np.random.default_rng(0), 400, 24)
    np.save(tmp_path / "ids.npy", ids)
    a = dlpipe.reshard([f"input_ids={tmp_path}/ids.npy"], tmp_path / "a", pad_id=0, num_shards=2, workers=1)
    b = dlpipe.reshard([f"input_ids=file://{tmp_path}/ids.npy"], f"file://{tmp_path}/b", pad_id=0, num_shards=2,
                       workers=1)
    c = dlpipe.reshard([f"input_ids={tmp_path}/ids.npy"], "memory://out/c", pad_id=0, num_shards=2, workers=1)
    assert a.num_records == b.num_records == c.num_records == 400
    mem = Location("memory://out/c")
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        if name != "dataset_info.json":
            assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
            assert mem.join(name).read_bytes() == (tmp_path / "a" / name).read_bytes()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="DataLoader workers are forked where os.fork exists")
def test_a_forked_worker_makes_its_own_s3_filesystem_from_the_parsed_service_data(s3_server):
    """A forked process (a DataLoader worker) gets a filesystem of its own, whose botocore session
    reuses the service descriptions its parent parsed instead of parsing them again."""
    loc = Location("s3://dlpipe/fork/a.bin", s3_server.storage_options)
    loc.write_bytes(b"0123456789")
    parent_fs = loc.fs
    parent_loader = parent_fs.session.get_component("data_loader")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports on the pipe and leaves without running pytest's teardown
        try:
            data = loc.read_bytes(2, 5).decode()
            shared = loc.fs.session.get_component("data_loader") is parent_loader
            msg = f"{loc.fs is not parent_fs} {shared} {data}"
        except BaseException as e:  # noqa: BLE001 (shown by the assert below)
            msg = repr(e)
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        assert f.read().decode() == "True True 234"
