"""One measuring process of ``dlpipe bench``.

Started by the runner as ``python -m dlpipe.benchmark.worker``, it reads one job as JSON on
stdin, pins itself to its CPU set *before* importing a framework (so TensorFlow's and PyTorch's
thread pools size themselves to it), runs the job's phases with the framework's measurer and
writes the results as one JSON document on stdout.

Job: ``{"framework": "tf" | "torch", "cpus": [..] | null, "config": BenchConfig JSON,
"phases": ["calibrate", "dlpipe", "dlpipe-sleep", "calibrate-modes", "train-modes", "baselines",
"devices"]}``: the measurements to make, in order; the two ``-modes`` phases read ``"modes"``
(padding modes), ``"sleep_s"`` (a ``sleep:MS`` model's seconds, else null) and
``"mode_runs"`` (per mode: repeats, steps, warmup) from the job and write ``mode_step_s``, ``train`` and ``mode_errors`` ("step" means a training step throughout, as in ``step_s`` and
``BenchConfig.steps``). A DlpipeError becomes ``{"error": "..."}`` so the runner can report it
in one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import replace

from dlpipe.benchmark.config import BenchConfig, FrameworkResult, workers_for
from dlpipe.benchmark.machine import keep_freed_memory, pin
from dlpipe.errors import DlpipeError

CALIBRATION_ROUNDS = 2  # turns each padding mode's step calibration takes (the fastest is kept)
MEASURERS = {"tf": "dlpipe.benchmark.tf_measure", "torch": "dlpipe.benchmark.torch_measure"}


def run_job(job: dict) -> dict:
    framework = job["framework"]
    cpus = job.get("cpus")
    keep_freed_memory()
    if cpus:
        pin(cpus)
        n = str(len(cpus))
        for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
            os.environ.setdefault(var, n)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # OpenMP threads that spin while waiting turn any competing process (a loader worker, the
    # other rank) into an 18x slower step on a small machine; waiting passively costs little
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    measurer = importlib.import_module(MEASURERS[framework])
    cfg = BenchConfig.from_json(job["config"])
    cfg = replace(cfg, num_workers=workers_for(cfg.num_workers, len(os.sched_getaffinity(0)), cfg.devices))
    out: dict = {"framework": framework, "rank": cfg.rank, "cpus": cpus}
    for phase in job["phases"]:
        start = time.perf_counter()
        if phase == "calibrate":
            out["step_s"] = float(measurer.calibrate_step(cfg))
        elif phase == "dlpipe":
            out["dlpipe"] = measurer.measure_dlpipe(cfg).to_json()
        elif phase == "dlpipe-sleep":
            step_s = out.get("step_s") or cfg.step_s
            sleep = replace(cfg, model=f"sleep:{step_s * 1000:.3f}", step_s=step_s)
            out["dlpipe_sleep"] = measurer.measure_dlpipe(sleep).to_json()
        elif phase == "calibrate-modes":
            _calibrate_modes(measurer, cfg, job, out)
        elif phase == "train-modes":
            _train_modes(measurer, cfg, job, out)
        elif phase == "baselines":
            step_s = out.get("step_s") or cfg.step_s
            sleep = replace(cfg, model=f"sleep:{step_s * 1000:.3f}", step_s=step_s) if step_s else cfg
            out["baselines"] = [r.to_json() for r in measurer.measure_baselines(sleep)]
        elif phase == "devices":
            out["devices"] = measurer.measure_devices(cfg).to_json()
        else:
            raise ValueError(f"unknown phase {phase!r}")
        out.setdefault("phase_s", {})[phase] = time.perf_counter() - start
    return out


def _calibrate_modes(measurer, cfg: BenchConfig, job: dict, out: dict) -> None:
    """The stand-in step of each padding mode in ``job["modes"]``: DeepCAL's real step calibrated
    at that mode's batch shapes; with ``job["sleep_s"]`` (a ``sleep:MS`` model) that sleep scaled
    by the mode's calibrated step ÷ the step at ``cfg.padding`` (so MS is the step at that mode).
    A mode that cannot be measured (no packing in this dlpipe) goes to ``mode_errors``.

    The modes take turns for ``CALIBRATION_ROUNDS`` rounds and each keeps its fastest: a burst of
    other work on a shared host then slows one round of every mode rather than one mode's only
    measurement, so the modes compare fairly. ``step_s`` (the AU row, the baselines) becomes the
    default mode's value."""
    cal, errors = {}, out.setdefault("mode_errors", {})
    if "step_s" in out:  # the "calibrate" phase measured cfg.padding already: its first round
        cal[cfg.padding] = out["step_s"]
    modes = list(dict.fromkeys([cfg.padding, *job["modes"]]))
    for round_ in range(CALIBRATION_ROUNDS):
        for mode in modes:
            if mode in errors or (round_ == 0 and mode in cal):
                continue
            try:
                seconds = float(measurer.calibrate_step(replace(cfg, padding=mode)))
            except DlpipeError as e:
                errors[mode] = str(e)
                continue
            cal[mode] = min(cal.get(mode, seconds), seconds)
    if cfg.padding in cal and "step_s" in out:
        out["step_s"] = cal[cfg.padding]
    sleep_s = job.get("sleep_s")
    if sleep_s and cfg.padding not in cal:
        for mode in job["modes"]:
            errors.setdefault(mode, f"no calibrated step at padding={cfg.padding} to scale sleep:{sleep_s * 1e3:g} by")
        cal = {}
    base = cal.get(cfg.padding)
    out["mode_calibrated_s"] = cal
    out["mode_step_s"] = {m: (sleep_s * cal[m] / base if sleep_s else cal[m]) for m in job["modes"] if m in cal}


def _train_modes(measurer, cfg: BenchConfig, job: dict, out: dict) -> None:
    """Each padding mode's training row: the pipeline into its calibrated stand-in step, with
    ``job["mode_runs"][mode]`` (``repeats``, ``steps``, ``warmup``; default ``cfg``'s)."""
    errors, results = out.setdefault("mode_errors", {}), out.setdefault("train", {})
    for mode, step_s in out.get("mode_step_s", {}).items():
        sizes = job.get("mode_runs", {}).get(mode, {})
        run = replace(cfg, padding=mode, model=f"sleep:{step_s * 1000:.3f}", step_s=step_s, **sizes,
                      profile_dir=cfg.profile_dir if mode == cfg.padding else None)  # fmt: skip
        try:
            results[mode] = measurer.measure_dlpipe(run).to_json()
        except DlpipeError as e:
            errors[mode] = str(e)


def main() -> int:
    job = json.load(sys.stdin)
    try:
        result = run_job(job)
    except DlpipeError as e:
        result = {"error": str(e)}
    except Exception as e:  # report, don't hang the runner
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["FrameworkResult", "run_job"]
