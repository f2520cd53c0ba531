"""``measure_dlpipe`` and ``calibrate_step``: dlpipe's TensorFlow pipeline into the model."""

from __future__ import annotations

import os
from dataclasses import replace

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import step_seconds
from dlpipe.benchmark.machine import keep_freed_memory
from dlpipe.benchmark.modes import efficiency, plan
from dlpipe.benchmark.tf_measure.device import (
    PROFILE_STEPS,
    STEP_BATCHES,
    _check,
    _device,
    _is_gpu,
    _Model,
    _on_device,
    _split,
    _tf,
    _to_device,
)
from dlpipe.benchmark.tf_measure.stages import _dlpipe_dataset, _dlpipe_stages
from dlpipe.benchmark.tf_measure.timing import _drive, _Stream, _time_step


def _result(loader: str, run: dict, stages, notes: list[str], padding: str | None = None) -> FrameworkResult:
    return FrameworkResult(
        framework="tf", loader=loader, samples_per_s=run["samples_per_s"], tokens_per_s=run["tokens_per_s"],
        stages=stages, pipeline_queue_samples=None, wait_s=run.get("wait_s", []),
        compute_s=run.get("compute_s", []), notes=notes, padding=padding, token_efficiency=efficiency(run),
    )  # fmt: skip


def _padding_note(run: dict) -> str:
    share = sum(run["tokens_per_s"]) / max(sum(run["padded_tokens_per_s"]), 1e-9)
    return f"pipeline: real tokens are {share:.0%} of the tokens the model computes"


def calibrate_step(cfg: BenchConfig) -> float:
    """Seconds of DeepCAL's real train step on ``device``, on the dataset's first batches as
    ``cfg.padding`` shapes them (their real lengths), after warm-up: each batch's median, their
    mean (``drive.step_seconds``)."""
    _check(cfg)
    device = _device(cfg.device)
    batches = [_split(b) for b in _dlpipe_dataset(cfg, world_size=1, rank=0).take(STEP_BATCHES)]
    steps = max(cfg.steps, 3 * len(batches))  # every batch at least 3 times (budget permitting)
    stage = _time_step("step", _Model("deepcal", device), _on_device(batches, device), replace(cfg, steps=steps))
    return step_seconds(stage.batch_latencies_s, len(batches))


def measure_dlpipe(cfg: BenchConfig) -> FrameworkResult:
    """dlpipe's tf.data loader: its stages alone, then the whole pipeline into the model."""
    from dlpipe.manifest import load_manifest

    _check(cfg)
    tf = _tf()
    device = _device(cfg.device)
    model = _Model(cfg.model, device)
    info = load_manifest(cfg.data)
    threads = tf.config.threading.get_inter_op_parallelism_threads() or len(os.sched_getaffinity(0))
    notes = [f"model {model.spec}" + (f" (stands in for a {cfg.step_s * 1e3:.1f} ms step)" if cfg.step_s else ""),
             f"device {device}, {len(os.sched_getaffinity(0))} CPUs in this process's set, "
             f"inter-op threads {threads}"
             + ("; glibc malloc keeps freed memory (trim/mmap thresholds raised, in both frameworks)"
                if keep_freed_memory() else "")]  # fmt: skip
    notes.append(f"padding: {plan(cfg.padding, cfg.data, cfg.batch_size).text} ({cfg.padding})")
    dataset = _dlpipe_dataset(cfg, notes=notes)  # first: a loader without the mode fails early
    stages = _dlpipe_stages(cfg, info, model, device, notes)
    run = _drive(lambda: _Stream(dataset), model, cfg, device)
    notes.append(_padding_note(run))
    notes.append("queue depth: not sampled (tf.data exposes no prefetch-buffer occupancy in TF 2.x; "
                 "StatsOptions was removed); see --profile for tf.data's own analysis")  # fmt: skip
    if cfg.profile_dir:
        _profile(cfg, dataset, model, device)
        notes.append(
            f"profile: tf.profiler trace in {cfg.profile_dir} (tensorboard --logdir, Profile tab)"
        )
    return _result("dlpipe", run, stages, notes, padding=cfg.padding)


def _profile(cfg: BenchConfig, dataset, model: _Model, device: str) -> None:
    """A short pipeline run under the TF profiler (``plugins/profile/<run>/*.xplane.pb``)."""
    tf = _tf()
    prof = tf.profiler.experimental
    stream = _Stream(dataset)
    move = _is_gpu(device) and model.spec.kind != "deepcal"
    prof.start(cfg.profile_dir)
    try:
        for i in range(min(cfg.steps, PROFILE_STEPS) + 2):
            with prof.Trace("train", step_num=i, _r=1):
                with prof.Trace("dlpipe.wait_for_batch"):
                    features, labels = _split(next(stream))
                    features = _to_device(features, device) if move else features
                with prof.Trace("dlpipe.step"):
                    model(features, labels)
    finally:
        prof.stop()
