"""One measuring process of ``dlpipe bench``.

Started by the runner as ``python -m dlpipe.benchmark.worker``, it reads one job as JSON on
stdin, pins itself to its CPU set *before* importing a framework (so TensorFlow's and PyTorch's
thread pools size themselves to it), runs the job's phases with the framework's measurer and
writes the results as one JSON document on stdout.

Job: ``{"framework": "tf" | "torch", "cpus": [..] | null, "config": BenchConfig JSON,
"phases": ["calibrate", "dlpipe", "dlpipe-sleep", "baselines", "devices"]}``: the measurements
to make, in order ("step" means a training step throughout, as in ``step_s`` and
``BenchConfig.steps``). A DlpipeError becomes ``{"error": "..."}`` so the runner can report it
in one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from dataclasses import replace

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.machine import pin
from dlpipe.errors import DlpipeError

MEASURERS = {"tf": "dlpipe.benchmark.tf_measure", "torch": "dlpipe.benchmark.torch_measure"}


def run_job(job: dict) -> dict:
    framework = job["framework"]
    cpus = job.get("cpus")
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
    out: dict = {"framework": framework, "rank": cfg.rank, "cpus": cpus}
    for phase in job["phases"]:
        if phase == "calibrate":
            out["step_s"] = float(measurer.calibrate_step(cfg))
        elif phase == "dlpipe":
            out["dlpipe"] = measurer.measure_dlpipe(cfg).to_json()
        elif phase == "dlpipe-sleep":
            step_s = out.get("step_s") or cfg.step_s
            sleep = replace(cfg, model=f"sleep:{step_s * 1000:.3f}", step_s=step_s)
            out["dlpipe_sleep"] = measurer.measure_dlpipe(sleep).to_json()
        elif phase == "baselines":
            step_s = out.get("step_s") or cfg.step_s
            sleep = replace(cfg, model=f"sleep:{step_s * 1000:.3f}", step_s=step_s) if step_s else cfg
            out["baselines"] = [r.to_json() for r in measurer.measure_baselines(sleep)]
        elif phase == "devices":
            out["devices"] = measurer.measure_devices(cfg).to_json()
        else:
            raise ValueError(f"unknown phase {phase!r}")
    return out


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
