"""``measure_dlpipe`` and ``calibrate_step``: dlpipe's PyTorch loader into the model."""

from __future__ import annotations

import statistics

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.torch_measure.device import _device, _Model, _to, _torch
from dlpipe.benchmark.torch_measure.stages import (
    _check,
    _dlpipe_loader,
    _dlpipe_stages,
    _pipeline_notes,
    _result,
)
from dlpipe.benchmark.torch_measure.timing import _drive, _Stream, _time_step


def calibrate_step(cfg: BenchConfig) -> float:
    """Median seconds of DeepCAL's real train step at ``batch_size`` on ``device``, on a batch
    of the dataset (its real lengths), after warm-up."""
    _check(cfg)
    device = _device(cfg.device)
    loader = _dlpipe_loader(BenchConfig(**{**cfg.to_json(), "num_workers": 0}), device, 1, 0)
    batches = [b for _, b in zip(range(8), loader)]
    stage = _time_step(_Model("deepcal", device), batches, cfg.steps)
    return float(statistics.median(stage.batch_latencies_s))


def measure_dlpipe(cfg: BenchConfig) -> FrameworkResult:
    """dlpipe's PyTorch loader: its stages alone, then the whole pipeline into the model."""
    _check(cfg)
    torch = _torch()
    device = _device(cfg.device)
    model = _Model(cfg.model, device)
    loader = _dlpipe_loader(cfg, device, cfg.world_size, cfg.rank)
    stands_in = model.spec.kind == "sleep" and cfg.step_s
    notes = [
        f"model {model.spec}"
        + (f" (stands in for a {cfg.step_s * 1e3:.1f} ms step)" if stands_in else ""),
        f"rank {cfg.rank} of {cfg.world_size}: {len(loader)} batches per epoch, "
        f"num_workers={cfg.num_workers}, torch threads {torch.get_num_threads()}",
    ]
    stages = _dlpipe_stages(cfg, loader, model, device, notes)
    run = _drive(lambda r: _Stream(loader, r), model, cfg, device)
    _pipeline_notes(run, stages, notes)
    if cfg.num_workers == 0:
        serial = 1 / sum(1 / s.capacity for s in stages if s.name in ("parse", "shuffle", "batch"))
        notes.append(
            f"num_workers=0: parse, shuffle and batch run one after another in this process, "
            f"so the feed is at most 1/sum(1/capacity) = {serial:,.0f} samples/s, not the "
            "constraint's capacity; read happens inside parse (memory-mapped shards)"
        )
    if cfg.profile_dir:
        _profile(cfg, loader, model, device)
        notes.append(f"profile: torch.profiler trace in {cfg.profile_dir} (tensorboard --logdir)")
    return _result("dlpipe", run, stages, notes)


def _profile(cfg: BenchConfig, loader, model: _Model, device) -> None:
    """A short pipeline run under torch.profiler, written for TensorBoard's profile plugin."""
    prof = _torch().profiler
    acts = [prof.ProfilerActivity.CPU] + (
        [prof.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    active = min(cfg.steps, 10)
    move = device.type == "cuda" and not model.moves_batches
    stream = _Stream(loader, cfg.repeats)
    with prof.profile(
        activities=acts,
        schedule=prof.schedule(wait=1, warmup=1, active=active, repeat=1),
        on_trace_ready=prof.tensorboard_trace_handler(cfg.profile_dir),
    ) as p:
        for _ in range(active + 2):
            with prof.record_function("dlpipe.wait_for_batch"):
                batch = next(stream)
                batch = _to(batch, device) if move else batch
            with prof.record_function("dlpipe.step"):
                model(batch)
            p.step()
