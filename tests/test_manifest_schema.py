"""A manifest is checked before anything in it is used (issue 12): paths stay inside the dataset,
every field has its type and range, counts add up; a bad one is a DlpipeError naming the field,
never another exception and never a wrong read."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlpipe
from dlpipe.errors import DlpipeError, FormatError
from dlpipe.manifest import MANIFEST


def _make(root, fmt="tfrecord", compression="auto"):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 7, 40)
    ids = rng.integers(1, 30, (40, 6)).astype(np.int32)
    ids[np.arange(6)[None, :] >= lengths[:, None]] = 0
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "input_ids.npy", ids)
    np.save(root / "labels.npy", rng.normal(size=(40, 2)).astype(np.float32))
    dlpipe.reshard([str(root / "input_ids.npy"), str(root / "labels.npy")], root / "out", pad_id=0,
                   num_shards=3, splits="train=0.75,validation=0.25", format=fmt, compression=compression,
                   workers=1, progress=False)
    return root / "out"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("schema"))


def _rows(path, split="train"):
    return [{k: np.asarray(v).tolist() for k, v in r.items()} for r in dlpipe.load_dataset(path, split)]


def _edit(src, dst, change):
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST).read_text())
    change(raw)
    (dst / MANIFEST).write_text(json.dumps(raw))
    return dst


def test_writers_write_only_plain_relative_paths(dataset):
    raw = json.loads((dataset / MANIFEST).read_text())
    for s in raw["dlpipe"]["shards"]:
        for key in ("path", "index"):
            assert "/" not in s[key] and not s[key].startswith(".") and os.path.isfile(dataset / s[key])


@pytest.mark.parametrize("path", ["../outside.tfrecord", "/etc/passwd", "file:///etc/passwd",
                                  "s3://other-bucket/x.tfrecord", "a/../../x", "./x", "a//b", "", "C:\\x"])
@pytest.mark.parametrize("key", ["path", "index"])
def test_paths_outside_the_dataset_are_refused(dataset, tmp_path, path, key):
    (tmp_path / "outside.tfrecord").write_bytes(b"not yours")

    def change(raw):
        raw["dlpipe"]["shards"][1][key] = path

    bad = _edit(dataset, tmp_path / "ds", change)
    for read in (lambda: dlpipe.load_dataset(bad), lambda: dlpipe.verify(bad)):
        with pytest.raises(FormatError, match=r"dlpipe\.shards\[1\]\." + key) as e:
            read()
        assert str(bad / MANIFEST) in str(e.value)


def test_a_symlink_out_of_the_dataset_is_refused(dataset, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    bad = _edit(dataset, tmp_path / "ds", lambda raw: None)
    first = json.loads((bad / MANIFEST).read_text())["dlpipe"]["shards"][0]["path"]
    shutil.move(bad / first, tmp_path / "elsewhere" / first)
    os.symlink(tmp_path / "elsewhere" / first, bad / first)
    with pytest.raises(FormatError, match="symlink"):
        dlpipe.load_dataset(bad)


def test_a_wrong_type_names_the_field(dataset, tmp_path):
    bad = _edit(dataset, tmp_path / "ds", lambda raw: raw["dlpipe"]["columns"]["input_ids"].update(dtype=-1))
    with pytest.raises(FormatError, match=r"dlpipe\.columns\.input_ids\.dtype"):
        dlpipe.load_dataset(bad)


def test_counts_must_add_up(dataset, tmp_path):
    bad = _edit(dataset, tmp_path / "ds", lambda raw: raw["splits"]["train"].update(num_examples=1))
    with pytest.raises(FormatError, match=r"splits\.train\.num_examples"):
        dlpipe.load_dataset(bad)


def test_a_newer_schema_asks_for_an_upgrade(dataset, tmp_path):
    bad = _edit(dataset, tmp_path / "ds", lambda raw: raw["dlpipe"].update(schema_version=99))
    with pytest.raises(FormatError, match="upgrade dlpipe"):
        dlpipe.load_dataset(bad)


def test_record_counts_are_checked_against_the_index(dataset, tmp_path):
    def change(raw):  # both counts agree with each other, not with the shard
        raw["dlpipe"]["shards"][0]["num_records"] -= 1
        raw["splits"]["train"]["num_examples"] -= 1
        raw["splits"]["train"]["shard_lengths"][0] -= 1

    bad = _edit(dataset, tmp_path / "ds", change)
    with pytest.raises(FormatError, match="index lists"):
        list(dlpipe.load_dataset(bad))


def _leaves(value, path=()):
    """Every (path, value) of a JSON tree, inner nodes included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.sampled_from(["", "x", "..", "../x", "/abs", "s3://b/k", "int64", "float32", "uint8", "gzip", "raw",
                     "webdataset", "tfrecord", "a" * 64, "0" * 64]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.sampled_from(["min", "max", "x"]),
                                                              st.integers(-2, 50), max_size=2),
)


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_mangled_manifests_fail_clearly_or_read_correctly(tmp_path_factory, fmt):
    src = _make(tmp_path_factory.mktemp(f"mangle-{fmt}"), fmt=fmt, compression="none")
    good = json.loads((src / MANIFEST).read_text())
    want = {s: _rows(src, s) for s in ("train", "validation")}
    fields = [p for p, _ in _leaves(good) if p]
    work = tmp_path_factory.mktemp("mangled")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(fields), junk=JUNK)
    def check(field, junk):
        raw = copy.deepcopy(good)
        node = raw
        for k in field[:-1]:
            node = node[k]
        node[field[-1]] = junk
        (work / MANIFEST).write_text(json.dumps(raw))
        for f in os.listdir(src):
            if f != MANIFEST and not (work / f).exists():
                os.link(src / f, work / f)
        try:
            got = {s: _rows(work, s) for s in ("train", "validation")}
        except DlpipeError:
            return
        assert got == want, field  # a change the reader may ignore, never a different read

    check()
