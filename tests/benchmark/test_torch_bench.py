"""The PyTorch measurer of ``dlpipe bench``: stages, pipeline timings, baselines, DDP over CPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import dlpipe
from dlpipe.benchmark.config import STAGES, BenchConfig, FrameworkResult
from dlpipe.benchmark.ledger import Ledger
from dlpipe.errors import ConfigError, MissingDependencyError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from token_rows import padded_tokens  # noqa: E402

from dlpipe.benchmark import torch_measure as torch_bench  # noqa: E402

N, WIDTH = 600, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A padded source (input_ids.npy [N, 32], labels.npy) and its dlpipe reshard."""
    src = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(3)
    ids, lengths = padded_tokens(rng, N, WIDTH)
    ids[0], ids[1] = 0, rng.integers(1, 100, WIDTH)  # lengths 0 and full
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", rng.normal(size=(N, 2)).astype(np.float32))
    out = tmp_path_factory.mktemp("shards")
    dlpipe.reshard(
        [str(src / "input_ids.npy"), str(src / "labels.npy")],
        out,
        pad_id=0,
        num_shards=3,
        workers=1,
        overwrite=True,
    )
    return {"source": str(src), "data": str(out)}


def config(data, **kw) -> BenchConfig:
    base = {
        "data": data["data"],
        "source": data["source"],
        "batch_size": 16,
        "steps": 6,
        "warmup": 2,
        "repeats": 2,
    }
    return BenchConfig(**(base | kw))


def check_run(res: FrameworkResult, cfg: BenchConfig, stages) -> None:
    assert res.framework == "torch"
    assert [s.name for s in res.stages] == list(stages)
    assert all(s.capacity > 0 and s.items > 0 for s in res.stages)
    assert len(res.samples_per_s) == len(res.tokens_per_s) == cfg.repeats
    assert all(x > 0 for x in res.samples_per_s + res.tokens_per_s)
    assert len(res.wait_s) == len(res.compute_s) == cfg.steps
    assert min(res.wait_s + res.compute_s) >= 0
    text = json.dumps(res.to_json())
    again = FrameworkResult.from_json(json.loads(text))
    assert json.dumps(again.to_json()) == text
    Ledger.build(again.stages, float(np.median(again.samples_per_s)))


def test_dlpipe_with_sleep_times_all_six_stages(data):
    cfg = config(data, model="sleep:1", step_s=0.001)
    res = torch_bench.measure_dlpipe(cfg)
    check_run(res, cfg, STAGES)
    assert res.loader == "dlpipe"
    assert min(res.compute_s) >= 0.001  # the sleep stands in for the step
    step = res.stages[-1]
    assert step.capacity < cfg.batch_size / 0.001 * 1.01
    assert res.pipeline_queue_samples is None  # no workers, no prefetch queue
    assert any("cpu: no transfer" in n for n in res.notes)


def test_dlpipe_without_model_wraps_epochs_and_samples_the_queue(data):
    # rank 1 of 2 has 300 records = 5 batches of 64 per epoch: 2 + 8 steps cross epochs
    cfg = config(data, batch_size=64, steps=8, repeats=1, world_size=2, rank=1, num_workers=1)
    res = torch_bench.measure_dlpipe(cfg)
    check_run(res, cfg, STAGES[:-1])  # no model, no step stage
    assert sum(res.compute_s) < 0.01
    assert len(res.pipeline_queue_samples) == cfg.steps
    assert res.stages[STAGES.index("batch")].queue_capacity == 2
    assert all(0 <= q <= 2 for q in res.pipeline_queue_samples)
    ledger = Ledger.build(res.stages, float(np.median(res.samples_per_s)))
    assert 0 <= ledger.row("batch").queue_depth <= 1


def test_profile_writes_a_tensorboard_trace(data, tmp_path):
    cfg = config(data, model="sleep:1", steps=3, repeats=1, profile_dir=str(tmp_path / "prof"))
    torch_bench.measure_dlpipe(cfg)
    assert any(name.endswith(".pt.trace.json") for name in os.listdir(tmp_path / "prof"))


def test_baseline_reads_padded_rows(data):
    cfg = config(data, model="sleep:1")
    (res,) = torch_bench.measure_baselines(cfg)
    check_run(res, cfg, ("read", "batch", "h2d", "step"))
    assert res.loader == "baseline-map-style"
    # every record is padded to 32, so real tokens are about half of what the model computes
    assert any("padded to 32" in n for n in res.notes)
    with pytest.raises(ConfigError, match="source"):
        torch_bench.measure_baselines(config(data, source=None))


def test_devices_over_gloo_give_every_rank_equal_batches(data):
    cfg = config(data, devices=2, steps=4, repeats=1)
    res = torch_bench.measure_devices(cfg)
    assert res.loader == "dlpipe" and len(res.samples_per_s) == 1 and res.samples_per_s[0] > 0
    assert len(res.wait_s) == cfg.steps
    assert any("gloo over 2 CPU processes" in n for n in res.notes)
    assert any("[19, 19] -> equal on every rank" in n for n in res.notes)  # 300 records / 16


@pytest.fixture
def tiny_deepcal(monkeypatch):
    """A stand-in with DeepCAL's API, so the deepcal path is tested on its own."""

    class DeepCalTorch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(128, 8, mode="sum")
            self.head = torch.nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            return self.head(self.emb(input_ids, per_sample_weights=attention_mask.float()))

    def torch_train_step(model, optimizer, batch, device):
        b = {k: v.to(device) for k, v in batch.items()}
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(b["input_ids"], b["attention_mask"]), b["labels"])
        loss.backward()
        optimizer.step()
        return loss

    mod = types.ModuleType("dlpipe.models.deepcal_torch")
    mod.DeepCalTorch, mod.torch_train_step = DeepCalTorch, torch_train_step
    mod.make_optimizer = lambda model: torch.optim.Adam(model.parameters(), lr=1e-3)
    monkeypatch.setitem(sys.modules, "dlpipe.models.deepcal_torch", mod)


def test_deepcal_calibrates_and_feeds_the_real_step(data, tiny_deepcal):
    cfg = config(data, model="deepcal", steps=4, repeats=1)
    assert 0 < torch_bench.calibrate_step(cfg) < 1
    check_run(torch_bench.measure_dlpipe(cfg), cfg, STAGES)
    check_run(torch_bench.measure_baselines(cfg)[0], cfg, ("read", "batch", "h2d", "step"))
    # a sleep standing in for DeepCAL: the baseline also times the real step at the padded width
    (res,) = torch_bench.measure_baselines(
        config(data, model="sleep:1", step_s=0.001, steps=3, repeats=1)
    )
    assert any("real DeepCAL step at L=32 (padded)" in n for n in res.notes)


def test_calibrate_the_real_deepcal(data):
    assert 0 < torch_bench.calibrate_step(config(data, steps=3)) < 10


def test_bad_settings_are_refused(data):
    with pytest.raises(ConfigError, match="steps=0"):
        torch_bench.measure_dlpipe(config(data, steps=0))
    with pytest.raises(ConfigError, match="device='tpu'"):
        torch_bench.measure_dlpipe(config(data, device="tpu"))
    with pytest.raises(ConfigError, match="--model"):
        torch_bench.measure_dlpipe(config(data, model="fast"))


def test_imports_without_torch_and_names_the_pip_command(data, monkeypatch):
    code = (
        "import sys; sys.modules['torch'] = None; import dlpipe.benchmark.torch_measure; "
        "print('torch' in sys.modules and sys.modules['torch'] is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.split(".")[0] == "torch" else real(name, *a),
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'dlpipe\[torch\]'"):
        torch_bench.measure_dlpipe(config(data))
