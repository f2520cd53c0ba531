"""``measure_dlpipe`` and ``calibrate_step``: dlpipe's PyTorch loader into the model."""

from __future__ import annotations

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import step_seconds
from dlpipe.benchmark.machine import keep_freed_memory
from dlpipe.benchmark.modes import plan
from dlpipe.benchmark.torch_measure.device import _device, _Model, _to, _torch
from dlpipe.benchmark.torch_measure.stages import (
    _check,
    _dlpipe_loader,
    _dlpipe_stages,
    _pipeline_notes,
    _result,
)
from dlpipe.benchmark.torch_measure.timing import _drive, _Stream, _time_step

STEP_BATCHES = 8  # calibration cycles over this many batches (their widths as the data has them)


def calibrate_step(cfg: BenchConfig) -> float:
    """Seconds of DeepCAL's real train step on ``device``, on the dataset's first batches as
    ``cfg.padding`` shapes them (their real lengths), after warm-up: each batch's median, their
    mean (``drive.step_seconds``)."""
    _check(cfg)
    device = _device(cfg.device)
    loader = _dlpipe_loader(BenchConfig(**{**cfg.to_json(), "num_workers": 0}), device, 1, 0)
    batches = [b for _, b in zip(range(STEP_BATCHES), loader)]
    steps = max(cfg.steps, 3 * len(batches))  # every batch at least 3 times (budget permitting)
    stage = _time_step(_Model("deepcal", device), batches, steps, widths=STEP_BATCHES)
    return step_seconds(stage.batch_latencies_s, len(batches))


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
        f"num_workers={cfg.num_workers}, torch threads {torch.get_num_threads()}"
        + ("; glibc malloc keeps freed memory (trim/mmap thresholds raised, as a caching "
           "allocator would, in both frameworks)" if keep_freed_memory() else ""),
    ]
    notes.append(f"padding: {plan(cfg.padding, cfg.data, cfg.batch_size).text} ({cfg.padding})")
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
    return _result("dlpipe", run, stages, notes, padding=cfg.padding)


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
