"""DALI's ``fn.readers.tfrecord`` on dlpipe shards (``dlpipe.integrations.dali``).

The feature spec made from the manifest is checked against the manifest without DALI. Where
DALI is installed (``pip install 'dlpipe[dali]'``: a ~420 MB wheel, not in the default test
environment) a CPU-only pipeline (``device_id=None``) reads every record of each encoding and
must give exactly what dlpipe's own reader gives, dtype and shape included; and DALI's
``tfrecord2idx`` must write dlpipe's ``.index`` files byte for byte."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlpipe
from dlpipe.errors import ConfigError
from dlpipe.integrations.dali import feature_spec, index_paths, spec_code
from dlpipe.manifest import load_manifest

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install 'dlpipe[dali]', "
                                "a ~420 MB wheel kept out of the default test extras)")
N = 41  # not a multiple of the batch size


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Columns of every kind: variable ids (with an empty record), a variable column with an inner
    dimension, a bool, float16 and float32 fixed columns, an int scalar."""
    src = tmp_path_factory.mktemp("dali-src")
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 9, N)
    lengths[0], lengths[1] = 0, 8
    live = np.arange(8)[None, :] < lengths[:, None]
    ids = np.where(live, rng.integers(1, 70000, (N, 8)), 0)  # > 2**16: raw ids are uint32
    vec = np.where(live[..., None], rng.normal(size=(N, 8, 3)), 0).astype(np.float32)
    cols = {"input_ids": ids, "vec": vec, "flag": rng.integers(0, 2, N).astype(bool),
            "half": rng.normal(size=(N, 4)).astype(np.float16), "labels": rng.normal(size=(N, 2)).astype(np.float32),
            "rid": np.arange(N, dtype=np.int64)}
    for name, values in cols.items():
        np.save(src / f"{name}.npy", values)
    return [f"{name}={src / name}.npy" for name in cols]


@pytest.fixture(scope="module", params=["raw", "int64_list"])
def dataset(request, sources, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp(f"dali-{request.param}")
    dlpipe.reshard(sources, out, pad_id=0, num_shards=3, workers=1, overwrite=True,
                   sequence_columns=["input_ids", "vec"], int_encoding=request.param)
    return str(out)


def test_feature_spec_follows_the_manifest(dataset):
    info = load_manifest(dataset)
    spec = feature_spec(dataset)
    assert list(spec) == list(info.columns)
    for name, s in spec.items():
        enc = info.columns[name]
        if enc.encoding == "raw":
            assert (s["feature"], s["dtype"], s["shape"]) == ("FixedLenFeature", "string", [])
            assert s["reinterpret"] == (None if enc.storage_dtype == "uint8" else enc.storage_dtype)
        else:
            assert s["feature"] == "VarLenFeature" and s["reinterpret"] is None
            assert s["dtype"] == {"int64_list": "int64", "float_list": "float32"}[enc.encoding]
        read_as = enc.storage_dtype if enc.encoding == "raw" else s["dtype"]
        assert s["cast"] == (None if np.dtype(read_as) == np.dtype(enc.dtype) else enc.dtype)
        assert s["reshape"] == (None if list(enc.shape) == [None] else [-1 if d is None else d for d in enc.shape])
        assert s["pad"] == (info.pad_values.get(name) if enc.variable else None)
    assert spec["vec"]["reshape"] == [-1, 3] and spec["rid"]["reshape"] == []
    assert spec["flag"]["cast"] == "bool"
    assert feature_spec(dataset, ["rid"]).keys() == {"rid"}
    with pytest.raises(ConfigError, match="not in"):
        feature_spec(dataset, ["nope"])


def test_spec_code_and_module_main(dataset):
    code = spec_code(dataset)
    assert "'input_ids': tfrec." in code and "fn.reshape(x, shape=[-1, 3])" in code
    done = subprocess.run([sys.executable, "-m", "dlpipe.integrations.dali", dataset],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == code


def test_index_paths_are_dlpipes_and_refusals(dataset, sources, tmp_path):
    info = load_manifest(dataset)
    paths, indexes = index_paths(dataset)
    assert paths == [str(Path(dataset) / s.path) for s in info.shards]
    assert indexes == [str(Path(dataset) / s.index) for s in info.shards]
    gz = tmp_path / "gz"
    dlpipe.reshard(sources, gz, pad_id=0, num_shards=1, workers=1, compression="gzip",
                   sequence_columns=["input_ids", "vec"])
    with pytest.raises(ConfigError, match="uncompressed"):
        index_paths(gz)
    wds = tmp_path / "wds"
    dlpipe.reshard(sources, wds, pad_id=0, num_shards=1, workers=1, format="webdataset",
                   sequence_columns=["input_ids", "vec"])
    with pytest.raises(ConfigError, match="webdataset"):
        feature_spec(wds)


@needs_dali
def test_tfrecord2idx_writes_dlpipes_index(dataset, tmp_path):
    script = Path(sys.executable).with_name("tfrecord2idx")
    if not script.exists():
        pytest.skip("DALI's tfrecord2idx script is not beside this Python")
    for shard, index in zip(*index_paths(dataset)):
        out = tmp_path / "dali.idx"
        subprocess.run([sys.executable, str(script), shard, str(out)], check=True, timeout=60)
        assert out.read_bytes() == Path(index).read_bytes()


@needs_dali
@pytest.mark.parametrize("pad", [False, True])
def test_dali_reads_every_record_as_dlpipe_does(dataset, pad):
    from nvidia.dali import pipeline_def

    from dlpipe.integrations.dali import read

    batch = 8

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        cols = read(dataset, pad=pad, random_shuffle=False, name="reader")
        return tuple(cols.values())

    p = pipe()
    p.build()
    names = list(feature_spec(dataset))
    records = list(dlpipe.load_dataset(dataset))
    assert p.epoch_size("reader") == N
    got: list[dict] = []
    while len(got) < N:
        outs = p.run()
        for i in range(batch):
            got.append({n: np.asarray(o.at(i)) for n, o in zip(names, outs)})
    info = load_manifest(dataset)
    for want, have in zip(records, got[:N]):  # DALI pads its last batch by repeating records
        for n in names:
            value = have[n]
            assert value.dtype == np.dtype(info.columns[n].dtype), n
            if pad and info.columns[n].variable:
                k = len(want[n])
                assert not value[k:].any()  # padded with the pad value (0)
                value = value[:k]
            np.testing.assert_array_equal(value, want[n], err_msg=n)
