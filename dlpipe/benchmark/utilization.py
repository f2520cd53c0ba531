"""Accelerator utilization (AU), MLPerf-Storage style: does the input pipeline keep the model fed?

The model is replaced by a fixed compute time (``--model sleep:MS``), so the number depends on
the input pipeline alone. A training loop records, per step, how long it waited for the next
batch (``wait_for_data_s``) and how long the step computed (``compute_s``).

    AU = total compute time / total wall time,   wall = wait + compute per step,

with the FIRST step left out: it pays for pipeline start-up (workers forking, files opening,
buffers filling) that a long run amortises. MLPerf Storage asks for AU ≥ 90%.

How fast could the model go before the pipeline falls behind? That is the pipeline's own
throughput in batches/s, measured with ``--model none`` (compute 0, so every step is pure
data wait): ``feed_rate``. A model whose step takes at least ``min_step_time_s(rate, 0.9)``
stays ≥ 90% fed by a prefetching pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from dlpipe.errors import ConfigError

__all__ = [
    "AU_THRESHOLD",
    "AUSummary",
    "ModelSpec",
    "SleepModel",
    "accelerator_utilization",
    "feed_rate",
    "meets",
    "min_step_time_s",
    "parse_model_spec",
    "summarize_steps",
]

AU_THRESHOLD = 0.9


def _steps(wait_for_data_s: Sequence[float] | np.ndarray, compute_s: Sequence[float] | np.ndarray,
           skip_first: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    wait = np.asarray(wait_for_data_s, dtype=np.float64)
    comp = np.asarray(compute_s, dtype=np.float64)
    if wait.shape != comp.shape or wait.ndim != 1:
        raise ConfigError(
            f"wait_for_data_s and compute_s must be 1-D and equally long; got shapes "
            f"{wait.shape} and {comp.shape}"
        )
    if skip_first < 0:
        raise ConfigError(f"skip_first={skip_first!r} must be >= 0")
    if wait.size <= skip_first:
        raise ConfigError(
            f"need more than skip_first={skip_first} steps to measure AU; got {wait.size}"
        )
    if (wait < 0).any() or (comp < 0).any():
        raise ConfigError("step timings must be >= 0")
    return wait[skip_first:], comp[skip_first:]


def accelerator_utilization(
    wait_for_data_s: Sequence[float] | np.ndarray,
    compute_s: Sequence[float] | np.ndarray,
    *,
    skip_first: int = 1,
) -> float:
    """Total compute ÷ total wall time over the steps after the first ``skip_first``."""
    wait, comp = _steps(wait_for_data_s, compute_s, skip_first)
    wall = float(wait.sum() + comp.sum())
    return float(comp.sum()) / wall if wall > 0 else 0.0


def meets(au: float, threshold: float = AU_THRESHOLD) -> bool:
    """Whether ``au`` reaches ``threshold`` (MLPerf Storage: 0.9)."""
    return au >= threshold


def feed_rate(wait_for_data_s: Sequence[float] | np.ndarray, *, skip_first: int = 1) -> float:
    """Batches/s the input pipeline delivers with ``--model none``: steps ÷ total data wait.

    With no compute, a step is nothing but waiting for data, so this is the pipeline's own
    throughput: the most steps/s it could feed a model that took no time.
    """
    wait, _ = _steps(wait_for_data_s, np.zeros(len(wait_for_data_s)), skip_first)
    total = float(wait.sum())
    return wait.size / total if total > 0 else math.inf


def min_step_time_s(feed_batches_per_s: float, threshold: float = AU_THRESHOLD) -> float:
    """The shortest model step a pipeline delivering ``feed_batches_per_s`` keeps ≥ threshold fed.

    With prefetching, a step's wall time is max(compute, 1/rate), so AU = compute × rate
    when compute < 1/rate; AU ≥ threshold needs compute ≥ threshold / rate.
    """
    if feed_batches_per_s <= 0:
        raise ConfigError(f"feed_batches_per_s={feed_batches_per_s!r} must be positive")
    return threshold / feed_batches_per_s


@dataclass
class AUSummary:
    """AU over a run, with the totals it came from (first steps excluded).

    ``steps_per_s`` is the step rate reached (0.0 if no time passed at all);
    ``feed_steps_per_s`` the input pipeline's own rate from a ``--model none`` run, if known.
    """

    au: float
    threshold: float
    meets: bool
    steps: int
    skipped_steps: int
    compute_s: float
    wait_s: float
    wall_s: float
    steps_per_s: float
    model: str
    feed_steps_per_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AUSummary:
        return cls(**data)


def summarize_steps(
    wait_for_data_s: Sequence[float] | np.ndarray,
    compute_s: Sequence[float] | np.ndarray,
    *,
    model: str = "none",
    skip_first: int = 1,
    threshold: float = AU_THRESHOLD,
    feed_steps_per_s: float | None = None,
) -> AUSummary:
    """AU, its totals and the step rate reached, for ``results.json``.

    With ``model='none'`` the step rate reached is the feed rate, and is recorded as such.
    """
    wait, comp = _steps(wait_for_data_s, compute_s, skip_first)
    wall = float(wait.sum() + comp.sum())
    au = float(comp.sum()) / wall if wall > 0 else 0.0
    return AUSummary(
        au=au,
        threshold=threshold,
        meets=meets(au, threshold),
        steps=int(wait.size),
        skipped_steps=skip_first,
        compute_s=float(comp.sum()),
        wait_s=float(wait.sum()),
        wall_s=wall,
        steps_per_s=wait.size / wall if wall > 0 else 0.0,
        model=model,
        feed_steps_per_s=(
            feed_steps_per_s
            if feed_steps_per_s is not None or model != "none" or wall <= 0
            else wait.size / wall
        ),
    )


class SleepModel:
    """A stand-in model step that takes ``ms`` milliseconds and no CPU to speak of.

    It sleeps until ``spin_s`` (default 100 µs) before the deadline, then busy-waits on
    ``time.perf_counter`` for the rest. Why both: ``time.sleep`` alone overshoots by roughly
    50–100 µs on Linux (timer slack and wake-up latency), which is 1–10% of a 1–10 ms step and
    would bias AU; spinning the whole step would burn a core the input pipeline needs (a real
    accelerator step leaves the host CPU mostly free). The spin costs ≤ ``spin_s`` per step.
    """

    def __init__(self, ms: float, *, spin_s: float = 100e-6) -> None:
        if not (ms >= 0 and math.isfinite(ms)):
            raise ConfigError(f"SleepModel ms={ms!r} must be a finite number >= 0")
        self.seconds = ms / 1e3
        self.spin_s = spin_s

    def __call__(self, batch: Any = None) -> None:
        deadline = time.perf_counter() + self.seconds
        coarse = self.seconds - self.spin_s
        if coarse > 0:
            time.sleep(coarse)
        while time.perf_counter() < deadline:
            pass

    def __repr__(self) -> str:
        return f"SleepModel(ms={self.seconds * 1e3:g})"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value: ``deepcal`` (the real model), ``sleep:MS`` or ``none``."""

    kind: Literal["deepcal", "sleep", "none"]
    sleep_ms: float | None = None

    def __str__(self) -> str:
        return f"sleep:{self.sleep_ms:g}" if self.kind == "sleep" else self.kind

    def make_sleep_model(self) -> SleepModel | None:
        """The SleepModel for ``sleep:MS``; None for the other kinds (no stand-in)."""
        return SleepModel(self.sleep_ms) if self.kind == "sleep" and self.sleep_ms else None


def parse_model_spec(spec: str) -> ModelSpec:
    """``'sleep:25'`` -> ModelSpec('sleep', 25.0); ``'deepcal'``, ``'none'`` as themselves."""
    text = spec.strip().lower()
    if text in ("deepcal", "none"):
        return ModelSpec(text)  # type: ignore[arg-type]
    if text.startswith("sleep:"):
        try:
            ms = float(text.split(":", 1)[1])
        except ValueError:
            ms = math.nan
        if ms > 0 and math.isfinite(ms):
            return ModelSpec("sleep", ms)
    raise ConfigError(
        f"--model={spec!r} is not a model; use deepcal, none or sleep:MS with MS > 0 "
        "milliseconds per step (e.g. sleep:25)"
    )
