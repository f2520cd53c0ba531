"""The contract between ``dlpipe bench``'s orchestrator and each framework's measurer.

The orchestrator (``runner.py``) starts one process per CPU share or device group, each with a
``BenchConfig``; inside, ``dlpipe.benchmark.torch_measure`` or ``tf_measure`` measures and returns
``FrameworkResult``s (JSON-able) which the orchestrator merges into ``results.json``.

Each framework module provides::

    calibrate_step(cfg) -> float                    # seconds of one real DeepCAL train step
    measure_dlpipe(cfg) -> FrameworkResult          # stages alone + pipeline + AU, dlpipe loader
    measure_baselines(cfg) -> list[FrameworkResult] # the padded source fed the old ways
    measure_devices(cfg) -> FrameworkResult         # every device: DDP / MirroredStrategy
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dlpipe.benchmark.ledger import StageMeasurement

STAGES = ("read", "parse", "shuffle", "batch", "h2d", "step")
# TF/PyTorch samples/s ratios within this range count as parity
PARITY_RANGE = (0.8, 1.25)


def workers_for(num_workers: int | str, cpus: int, replicas: int = 1) -> int:
    """The PyTorch DataLoader workers of a measuring process that has ``cpus`` CPUs for
    ``replicas`` model replicas (DDP ranks sharing them). ``"auto"``: one worker per CPU of a
    replica's share when it has two or more, else none. Like with like: a lone tf.data pipeline
    spreads its parse over every CPU of its process, and PyTorch's way to do the same is workers;
    on a single CPU a worker only adds a hand-off to the main process."""
    if num_workers != "auto":
        return int(num_workers)
    share = cpus // max(replicas, 1)
    return share if share >= 2 else 0


@dataclass(frozen=True)
class BenchConfig:
    """What one measuring process does. Rates are records (samples) per second."""

    data: str  # a dlpipe dataset directory (TFRecord shards)
    source: str | None = None  # the padded source (input_ids.npy, labels.npy) for baselines
    split: str = "train"
    batch_size: int = 256
    steps: int = 100  # training steps (one batch through the model each) per timed repeat
    warmup: int = 10  # batches before timing
    repeats: int = 3
    model: str = "none"  # "none" | "sleep:MS" | "deepcal"
    step_s: float | None = None  # the calibrated step time the sleep stands in for
    device: str = "cpu"  # "cpu", or "cuda" / "gpu" (the framework's first visible device)
    devices: int = 1  # for measure_devices: how many (GPUs, or logical CPU devices / gloo ranks)
    world_size: int = 1  # this process's share of the shards: rank of world_size
    rank: int = 0
    num_workers: int | str = 0  # DataLoader workers; "auto": worker.run_job sets ``workers_for``
    seed: int = 0
    profile_dir: str | None = None  # write a framework profiler trace here when set
    padding: str = "longest"  # how batches are shaped: dlpipe.benchmark.modes.MODES

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchConfig:
        return cls(**data)


@dataclass
class FrameworkResult:
    """One framework's measurement in one process, before merging."""

    framework: str  # "tf" | "torch"
    loader: str  # "dlpipe" | "baseline-<how>"
    samples_per_s: list[float]  # one per repeat, whole pipeline (loader -> model)
    tokens_per_s: list[float] = field(default_factory=list)
    stages: list[StageMeasurement] = field(default_factory=list)  # each stage timed alone
    pipeline_queue_samples: list[float] | None = None
    wait_s: list[float] = field(default_factory=list)  # per step: waiting for the batch
    compute_s: list[float] = field(default_factory=list)  # per step: the model (or sleep)
    notes: list[str] = field(default_factory=list)
    padding: str | None = None  # the padding mode of the batches (dlpipe.benchmark.modes)
    token_efficiency: float | None = None  # real tokens / computed tokens over the timed batches

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [
            asdict(s) | {"batch_latencies_s": list(map(float, s.batch_latencies_s))}
            for s in self.stages
        ]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameworkResult:
        data = dict(data)
        data["stages"] = [StageMeasurement(**s) for s in data.get("stages", [])]
        return cls(**data)
