"""The framework-free core of ``dlpipe bench``: is training input-bound, and where?

    ledger       stages timed alone vs the whole pipeline -> the constraint and its headroom
    utilization  accelerator utilization (AU) with a stand-in model, ``--model`` specs
    machine      what the machine is, its ceilings, CPU sets per process
    results      the stable ``results.json`` (docs/bench-results-schema.md)
    report       markdown report and PNG plots from a results dict
    modes        padding modes (fixed, longest, buckets, packing): loader arguments, token counts
    mode_summary the per-mode training rows, the fastest mode and why, parity per mode

Nothing here imports TensorFlow, PyTorch or matplotlib at import time; the loaders that feed
these measurements live in ``dlpipe.loaders``.
"""

from dlpipe.benchmark.ledger import Ledger, LedgerRow, StageMeasurement
from dlpipe.benchmark.machine import cpu_sets, describe, measure_ceilings, pin
from dlpipe.benchmark.report import render_report, write_plots
from dlpipe.benchmark.results import (
    SCHEMA_VERSION,
    load,
    make_results,
    make_run,
    make_target,
    save,
    validate,
)
from dlpipe.benchmark.utilization import (
    AUSummary,
    ModelSpec,
    SleepModel,
    accelerator_utilization,
    feed_rate,
    meets,
    min_step_time_s,
    parse_model_spec,
    summarize_steps,
)

__all__ = [
    "SCHEMA_VERSION",
    "AUSummary",
    "Ledger",
    "LedgerRow",
    "ModelSpec",
    "SleepModel",
    "StageMeasurement",
    "accelerator_utilization",
    "cpu_sets",
    "describe",
    "feed_rate",
    "load",
    "make_results",
    "make_run",
    "make_target",
    "measure_ceilings",
    "meets",
    "min_step_time_s",
    "parse_model_spec",
    "pin",
    "render_report",
    "save",
    "summarize_steps",
    "validate",
    "write_plots",
]
