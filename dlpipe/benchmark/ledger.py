"""The stage ledger: which stage of an input pipeline is the constraint, and by how much.

A pipeline (read → parse → shuffle → batch → host-to-device → step) runs no faster than
its slowest stage. Each stage is timed ALONE (its *capacity*, records/s) and the whole
pipeline once; the ledger puts them side by side. Every count is in records (samples), not
batches, so a batching stage compares with a parsing one.

- **constraint**: the stage with the lowest capacity (first in pipeline order on a tie);
  **headroom**: the next-lowest capacity ÷ the lowest (1.0 on a tie), i.e. how much faster
  the constraint must get before another stage takes its place.
- **utilization**: pipeline throughput ÷ stage capacity. In theory ≤ 1 and exactly 1 for the
  constraint of a perfectly overlapped pipeline; the raw value is kept (a value above 1 means
  the stage ran faster inside the pipeline than alone: noise or a warmer cache) and only the
  display is clipped.
- A pipeline far below its constraint's capacity (< ``INTERFERENCE_RATIO``) means the stages
  interfere (share cores, contend for the GIL) or the hand-offs between them cost time.
- **queue depth**: mean occupancy ÷ capacity of the prefetch buffer after a stage. Near 1 the
  consumer is slower than the stage; near 0 the stage starves its consumer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dlpipe.errors import ConfigError

__all__ = ["INTERFERENCE_RATIO", "Ledger", "LedgerRow", "StageMeasurement", "format_rate"]

INTERFERENCE_RATIO = 0.7


def format_rate(x: float | None) -> str:
    """41234.5 -> '41.2k': three significant figures, for tables and sentences."""
    if x is None or not math.isfinite(x):
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _format_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


@dataclass
class StageMeasurement:
    """One stage timed alone: ``items`` records in ``seconds``, plus per-batch latencies.

    ``queue_depth_samples`` are occupancies of the prefetch buffer after the stage (sampled
    while it ran), ``queue_capacity`` that buffer's size; ``stalls`` counts named stall or
    failure events (e.g. ``{"read-retry": 3, "empty-queue": 120}``).
    """

    name: str
    items: int
    seconds: float
    batch_latencies_s: list[float] | np.ndarray = field(default_factory=list)
    queue_depth_samples: list[float] | np.ndarray | None = None
    queue_capacity: int | None = None
    stalls: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("StageMeasurement name must be a non-empty string")
        if not self.items or self.items <= 0:
            raise ConfigError(f"stage {self.name!r}: items={self.items!r} must be positive")
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ConfigError(f"stage {self.name!r}: seconds={self.seconds!r} must be positive")
        if self.queue_capacity is not None and self.queue_capacity <= 0:
            raise ConfigError(
                f"stage {self.name!r}: queue_capacity={self.queue_capacity!r} must be positive"
            )

    @property
    def capacity(self) -> float:
        """Records per second this stage sustains alone."""
        return self.items / self.seconds


@dataclass
class LedgerRow:
    """One stage's line in the ledger (all rates in records/s)."""

    name: str
    items: int
    seconds: float
    capacity: float
    utilization: float
    batches: int
    p50_latency_s: float | None
    p95_latency_s: float | None
    queue_depth: float | None
    top_stall: str | None
    top_stall_count: int
    constraint: bool

    @property
    def utilization_display(self) -> float:
        """Utilization clipped to [0, 1] for tables and plots; ``utilization`` keeps the raw value."""
        return min(max(self.utilization, 0.0), 1.0)


def _queue_depth(
    samples: Sequence[float] | np.ndarray | None, capacity: int | None
) -> float | None:
    if samples is None or capacity is None:
        return None
    arr = np.asarray(samples, dtype=np.float64)
    return float(arr.mean() / capacity) if arr.size else None


def _top_stall(stalls: Mapping[str, int] | None) -> tuple[str | None, int]:
    """The most frequent stall; ties go to the name first in sorted order (deterministic)."""
    if not stalls:
        return None, 0
    name, count = min(stalls.items(), key=lambda kv: (-kv[1], kv[0]))
    return (name, int(count)) if count > 0 else (None, 0)


@dataclass
class Ledger:
    """Capacity, utilization, latency and queue depth per stage, and the constraint."""

    rows: list[LedgerRow]
    pipeline_items_per_s: float
    constraint: str
    next_stage: str | None
    headroom: float | None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        stages: Sequence[StageMeasurement],
        pipeline_items_per_s: float,
        pipeline_queue_samples: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    ) -> Ledger:
        """Rows in pipeline order from stages timed alone and the whole pipeline's throughput.

        ``pipeline_queue_samples`` maps a stage name to buffer occupancies sampled during the
        whole-pipeline run; where given they replace the stage's own samples, because the
        queue only means something when producer and consumer run together.
        """
        if not stages:
            raise ConfigError("Ledger.build needs at least one stage; got an empty list")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique; got {names}")
        if not (pipeline_items_per_s >= 0 and math.isfinite(pipeline_items_per_s)):
            raise ConfigError(
                f"pipeline_items_per_s={pipeline_items_per_s!r} must be a finite number >= 0"
            )
        pipeline_queue_samples = dict(pipeline_queue_samples or {})
        unknown = set(pipeline_queue_samples) - set(names)
        if unknown:
            raise ConfigError(f"pipeline_queue_samples names unknown stages {sorted(unknown)}")

        capacities = np.array([s.capacity for s in stages], dtype=np.float64)
        order = np.argsort(capacities, kind="stable")  # stable: ties keep pipeline order
        lowest = int(order[0])
        rows = []
        for i, s in enumerate(stages):
            lat = np.asarray(s.batch_latencies_s, dtype=np.float64)
            p50, p95 = np.percentile(lat, [50, 95]).tolist() if lat.size else (None, None)
            samples = pipeline_queue_samples.get(s.name, s.queue_depth_samples)
            stall, stall_count = _top_stall(s.stalls)
            rows.append(
                LedgerRow(
                    name=s.name,
                    items=int(s.items),
                    seconds=float(s.seconds),
                    capacity=float(capacities[i]),
                    utilization=float(pipeline_items_per_s / capacities[i]),
                    batches=int(lat.size),
                    p50_latency_s=p50,
                    p95_latency_s=p95,
                    queue_depth=_queue_depth(samples, s.queue_capacity),
                    top_stall=stall,
                    top_stall_count=stall_count,
                    constraint=i == lowest,
                )
            )

        next_stage, headroom = None, None
        if len(stages) > 1:
            nxt = int(order[1])
            next_stage = names[nxt]
            headroom = float(capacities[nxt] / capacities[lowest])
        notes = cls._notes(rows, rows[lowest], float(pipeline_items_per_s))
        return cls(rows, float(pipeline_items_per_s), names[lowest], next_stage, headroom, notes)

    @staticmethod
    def _notes(rows: list[LedgerRow], constraint: LedgerRow, pipeline: float) -> list[str]:
        notes = []
        tied = [r.name for r in rows if r.capacity == constraint.capacity]
        if len(tied) > 1:
            notes.append(
                f"tie: {', '.join(tied)} have the same capacity; {constraint.name} is named "
                "the constraint because it comes first in the pipeline"
            )
        ratio = pipeline / constraint.capacity
        if ratio < INTERFERENCE_RATIO:
            notes.append(
                f"the pipeline runs at {ratio:.0%} of its constraint's capacity "
                f"(< {INTERFERENCE_RATIO:.0%}): stages interfere (shared cores, GIL) or the "
                "overhead between stages is large"
            )
        over = [r.name for r in rows if r.utilization > 1.05]
        if over:
            notes.append(
                f"utilization above 1 for {', '.join(over)}: faster inside the pipeline than "
                "alone (noisy measurement or a warmer cache)"
            )
        return notes

    def row(self, name: str) -> LedgerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the form ``results.json`` embeds); ``json.dumps`` it for text."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Ledger:
        """The inverse of ``to_json``; accepts the dict or its JSON text."""
        d = dict(json.loads(data) if isinstance(data, str) else data)
        d["rows"] = [LedgerRow(**r) for r in d["rows"]]
        d["notes"] = list(d.get("notes", []))
        return cls(**d)

    def summary(self) -> str:
        """One sentence: the constraint, its capacity and the next stage's headroom."""
        c = self.row(self.constraint)
        text = f"the constraint is `{c.name}` at {format_rate(c.capacity)} samples/s"
        if self.next_stage is not None and self.headroom is not None:
            text += f"; next is `{self.next_stage}` with {self.headroom:.1f}x headroom"
        return text

    def render_markdown(self) -> str:
        """The ledger as a markdown table, the constraint row marked, then the notes."""
        lines = [
            "| stage | capacity (samples/s) | utilization | p50 / p95 per batch "
            "| queue depth | top stall |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            name = f"**{r.name}** ◀ constraint" if r.constraint else r.name
            util = f"{r.utilization_display:.0%}"
            if r.utilization > 1:
                util += f" (raw {r.utilization:.2f})"
            lat = f"{_format_seconds(r.p50_latency_s)} / {_format_seconds(r.p95_latency_s)}"
            depth = "n/a" if r.queue_depth is None else f"{r.queue_depth:.0%}"
            stall = f"{r.top_stall} ({r.top_stall_count})" if r.top_stall else "—"
            lines.append(
                f"| {name} | {format_rate(r.capacity)} | {util} | {lat} | {depth} | {stall} |"
            )
        lines.append(f"| *pipeline* | {format_rate(self.pipeline_items_per_s)} | | | | |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"
