"""The TensorFlow measurer of ``dlpipe bench``: stages, pipeline timings, baselines, devices."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from token_rows import padded_tokens  # noqa: E402

import dlpipe
from dlpipe.benchmark import tf_measure as tf_bench
from dlpipe.benchmark.config import STAGES, BenchConfig, FrameworkResult
from dlpipe.benchmark.ledger import Ledger
from dlpipe.errors import ConfigError, MissingDependencyError
from dlpipe.manifest import load_manifest

pytestmark = pytest.mark.tf

N, WIDTH = 600, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A padded source (input_ids.npy [N, 32], labels.npy) and its dlpipe reshard (3 shards)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("dlpipe.loaders.tf_data", reason="the tf.data loader is not there yet")
    src = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(3)
    ids, _ = padded_tokens(rng, N, WIDTH)
    ids[0], ids[1] = 0, rng.integers(1, 100, WIDTH)  # lengths 0 and full
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", rng.normal(size=(N, 2)).astype(np.float32))
    out = tmp_path_factory.mktemp("shards")
    specs = [str(src / "input_ids.npy"), str(src / "labels.npy")]
    dlpipe.reshard(specs, out, pad_id=0, num_shards=3, workers=1, overwrite=True)
    return {"source": str(src), "data": str(out)}


def config(data, **kw) -> BenchConfig:
    base = {"data": data["data"], "source": data["source"], "batch_size": 16, "steps": 6, "warmup": 2,
            "repeats": 2}  # fmt: skip
    return BenchConfig(**(base | kw))


def check_run(res: FrameworkResult, cfg: BenchConfig, stages, loader: str = "dlpipe") -> None:
    assert (res.framework, res.loader) == ("tf", loader)
    assert [s.name for s in res.stages] == list(stages)
    assert all(s.capacity > 0 and s.items > 0 for s in res.stages)
    assert len(res.samples_per_s) == len(res.tokens_per_s) == cfg.repeats
    assert all(x > 0 for x in res.samples_per_s + res.tokens_per_s)
    assert len(res.wait_s) == len(res.compute_s) == cfg.steps
    assert min(res.wait_s + res.compute_s) >= 0
    text = json.dumps(res.to_json())
    again = FrameworkResult.from_json(json.loads(text))
    assert json.dumps(again.to_json()) == text
    if res.stages:
        Ledger.build(again.stages, float(np.median(again.samples_per_s)))


def test_dlpipe_with_sleep_times_all_six_stages_and_profiles(data, tmp_path):
    cfg = config(data, model="sleep:1", step_s=0.001, profile_dir=str(tmp_path / "prof"))
    res = tf_bench.measure_dlpipe(cfg)
    check_run(res, cfg, STAGES)
    assert min(res.compute_s) >= 0.001  # the sleep stands in for the step
    assert res.stages[-1].capacity < cfg.batch_size / 0.001 * 1.01
    # read: the first steps x batch_size records
    assert res.stages[0].items == cfg.steps * cfg.batch_size
    assert res.pipeline_queue_samples is None
    assert any("cpu: no transfer" in n for n in res.notes)
    traces = [f for _, _, fs in os.walk(tmp_path / "prof" / "plugins" / "profile") for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces)


def test_dlpipe_without_model_reads_its_rank_share_across_epochs(data):
    # rank 1 of 2 reads half the epoch's records (record ranges, as the PyTorch loader splits;
    # ~300 records = 5 batches of 64): 2 + 8 steps wrap epochs
    cfg = config(data, batch_size=64, steps=8, repeats=1, world_size=2, rank=1)
    res = tf_bench.measure_dlpipe(cfg)
    check_run(res, cfg, STAGES[:-1])  # no model, no step stage
    assert res.stages[0].items == -(-load_manifest(data["data"]).num_records("train") // 2)
    assert sum(res.compute_s) < 0.01
    assert any("rank 1 of 2" in n for n in res.notes)
    # a token is real where the mask is 1; every sample has its mask
    assert res.tokens_per_s[0] < res.samples_per_s[0] * WIDTH


def test_baselines_feed_the_padded_source_three_ways(data):
    cfg = config(data, model="sleep:1", step_s=0.001)
    results = tf_bench.measure_baselines(cfg)
    loaders = [r.loader for r in results]
    assert loaders == [
        "baseline-keras-numpy",
        "baseline-from-tensor-slices",
        "baseline-hf-to-tf-dataset",
    ]
    fit, slices, hf = results
    check_run(fit, cfg, (), loader=loaders[0])
    assert min(fit.compute_s) >= 0.001
    for res in (slices, hf):
        check_run(res, cfg, ("batch", "step"), loader=res.loader)
        assert any("at L=32 (padded)" in n for n in res.notes)
    assert any(f"first {N:,} padded rows" in n for n in hf.notes)
    with pytest.raises(ConfigError, match="source"):
        tf_bench.measure_baselines(config(data, source=None))


@pytest.mark.filterwarnings("error:Your input ran out of data")
def test_baselines_without_model_still_time_the_input_path(data):
    cfg = config(data, steps=50, repeats=2)  # more steps than the arrays' 38 batches
    fit, slices, hf = tf_bench.measure_baselines(cfg)
    assert (
        len(fit.samples_per_s) == 2 and all(x > 0 for x in fit.samples_per_s) and fit.wait_s == []
    )
    assert any("one fit call of 38 steps" in n for n in fit.notes)
    assert [s.name for s in slices.stages] == [s.name for s in hf.stages] == ["batch"]


def test_devices_over_logical_cpus(data):
    from dlpipe.benchmark.tf_measure.devices import STEPS_PER_CALL

    cfg = config(data, devices=2, steps=STEPS_PER_CALL + 3, repeats=1)  # a whole call and a part
    res = tf_bench.measure_devices(cfg)
    assert (res.framework, res.loader) == ("tf", "dlpipe")
    assert len(res.samples_per_s) == 1 and res.samples_per_s[0] > 0
    assert res.wait_s == [] and len(res.compute_s) == cfg.steps  # input waits are inside the calls
    assert any("MirroredStrategy over 2 logical CPU devices" in n for n in res.notes)
    assert any("global batch 32 (16 per replica)" in n for n in res.notes)


def _spec(name: str, package: bool = False) -> importlib.machinery.ModuleSpec:
    return importlib.machinery.ModuleSpec(name, None, is_package=package)


@pytest.fixture
def tiny_deepcal(monkeypatch):
    """A stand-in with DeepCAL's TF API, so the deepcal path is tested on its own."""
    import tensorflow as tf

    def build_tf_model(vocab: int = 128, seq_len=None):
        k = tf.keras
        ids = k.Input((seq_len,), dtype="int64", name="input_ids")
        mask = k.Input((seq_len,), dtype="int64", name="attention_mask")
        x = k.layers.Embedding(vocab, 8)(ids) * k.ops.expand_dims(k.ops.cast(mask, "float32"), -1)
        return k.Model(
            {"input_ids": ids, "attention_mask": mask}, k.layers.Dense(2)(k.ops.sum(x, axis=1))
        )

    def tf_train_step(model, optimizer):
        @tf.function(reduce_retracing=True)
        def step(features, labels):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(features, training=True) - labels))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return step

    mod = types.ModuleType("dlpipe.models.deepcal_tf")
    mod.__spec__ = _spec(mod.__name__)
    mod.build_tf_model, mod.tf_train_step = build_tf_model, tf_train_step
    if importlib.util.find_spec("dlpipe.models") is None:
        pkg = types.ModuleType("dlpipe.models")
        pkg.__spec__, pkg.__path__ = _spec("dlpipe.models", True), []
        monkeypatch.setitem(sys.modules, "dlpipe.models", pkg)
    monkeypatch.setitem(sys.modules, "dlpipe.models.deepcal_tf", mod)


def test_deepcal_calibrates_and_feeds_the_real_step(data, tiny_deepcal):
    cfg = config(data, model="deepcal", steps=4, repeats=1)
    assert 0 < tf_bench.calibrate_step(cfg) < 1
    check_run(tf_bench.measure_dlpipe(cfg), cfg, STAGES)
    fit, slices, _ = tf_bench.measure_baselines(cfg)
    assert all(x > 0 for x in fit.samples_per_s)
    check_run(slices, cfg, ("batch", "step"), loader=slices.loader)
    # a sleep standing in for DeepCAL: the baselines also time the real step at the padded width
    _, slices, _ = tf_bench.measure_baselines(
        config(data, model="sleep:1", step_s=0.001, steps=3, repeats=1)
    )
    assert any("real DeepCAL step at L=32 (padded)" in n for n in slices.notes)


def test_calibrate_the_real_deepcal(data):
    assert 0 < tf_bench.calibrate_step(config(data, steps=3)) < 10


def test_bad_settings_are_refused(data):
    with pytest.raises(ConfigError, match="steps=0"):
        tf_bench.measure_dlpipe(config(data, steps=0))
    with pytest.raises(ConfigError, match="device='tpu'"):
        tf_bench.measure_dlpipe(config(data, device="tpu"))
    with pytest.raises(ConfigError, match="--model"):
        tf_bench.measure_dlpipe(config(data, model="fast"))
    with pytest.raises(ConfigError, match="rank=3"):
        tf_bench.measure_dlpipe(config(data, world_size=2, rank=3))


def test_imports_without_tensorflow_and_names_the_pip_command(monkeypatch, tmp_path):
    code = (
        "import sys; sys.modules['tensorflow'] = None; import dlpipe.benchmark.tf_measure; "
        "print('tensorflow' in sys.modules and sys.modules['tensorflow'] is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "tensorflow" else real(name, *a))  # fmt: skip
    with pytest.raises(MissingDependencyError, match=r"pip install 'dlpipe\[tf\]'"):
        tf_bench.measure_dlpipe(BenchConfig(data=str(tmp_path)))
