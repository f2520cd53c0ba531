"""How the TensorFlow measurer times things: streams into ``benchmark.drive``, a tf.data
stage alone, a model step alone, host-to-device copies."""

from __future__ import annotations

import time
from collections.abc import Callable

from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.drive import drive
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.modes import batch_counts, samples_in
from dlpipe.benchmark.tf_measure.device import (
    STEP_BUDGET_S,
    _is_gpu,
    _Model,
    _split,
    _tf,
    _to_device,
)
from dlpipe.errors import ConfigError


class _Stream:
    """Batches of an iterable (a tf.data or distributed dataset), epoch after epoch, for ever."""

    def __init__(self, dataset) -> None:
        self.dataset, self.it, self.fresh = dataset, None, True

    def __next__(self):
        while True:
            if self.it is None:
                self.it, self.fresh = iter(self.dataset), True
            try:
                element = next(self.it)
            except StopIteration:
                if self.fresh:
                    raise ConfigError(
                        "the dataset yielded no batches; is this rank's share empty?"
                    ) from None
                self.it = None
                continue
            self.fresh = False
            return element


def _drive(
    make_stream: Callable[[], _Stream], model: _Model, cfg: BenchConfig, device: str
) -> dict:
    """``benchmark.drive`` of ``model`` over fresh streams (see there for what is timed)."""
    move = _is_gpu(device) and model.spec.kind != "deepcal"

    def fetch(stream: _Stream):
        features, labels = _split(next(stream))
        return ((_to_device(features, device) if move else features), labels), features

    return drive(lambda r: make_stream(), fetch, lambda batch: model(*batch), batch_counts,
                 repeats=cfg.repeats, warmup=cfg.warmup, steps=cfg.steps)


def _time_dataset(name: str, dataset, repeats: int) -> StageMeasurement:
    """Iterate ``dataset`` eagerly once untimed, then ``repeats`` times; keep the median pass.

    A pass's time is the sum of its ``next()`` calls (the iterator's creation is not counted);
    items are records (the leading dimension of the first component of each batch)."""
    tf = _tf()

    def one_pass() -> tuple[float, list[float], int]:
        lat, items = [], 0
        it = iter(dataset)
        while True:
            t = time.perf_counter()
            try:
                element = next(it)
            except StopIteration:
                break
            lat.append(time.perf_counter() - t)
            items += int(tf.nest.flatten(element)[0].shape[0])
        return sum(lat), lat, items

    one_pass()
    passes = sorted((one_pass() for _ in range(max(1, repeats))), key=lambda p: p[0])
    total, lat, items = passes[len(passes) // 2]
    if not items:
        raise ConfigError(f"stage {name!r}: the dataset yielded no records")
    return StageMeasurement(name, items, max(total, 1e-9), lat)


def _time_step(name: str, model: _Model, batches: list, cfg: BenchConfig) -> StageMeasurement:
    """The model alone, cycling over ``batches`` (their real widths): each once untimed (a graph
    per shape traced), then up to ``steps`` steps within the budget."""
    for features, labels in batches * (2 if len(batches) == 1 else 1):
        model(features, labels)
    lat: list[float] = []
    records = 0
    start = time.perf_counter()
    while len(lat) < max(cfg.steps, 3) and (
        len(lat) < 3 or time.perf_counter() - start < STEP_BUDGET_S
    ):
        features, labels = batches[len(lat) % len(batches)]
        t = time.perf_counter()
        model(features, labels)
        lat.append(time.perf_counter() - t)
        records += samples_in(features)
    return StageMeasurement(name, records, max(sum(lat), 1e-9), lat)


def _time_h2d(batches: list, device: str, repeats: int, notes: list[str]) -> StageMeasurement:
    """Copies of prepared batches to the device, synchronized; on CPU a deep copy (no transfer)."""
    tf = _tf()
    if _is_gpu(device):
        copy = lambda features: _to_device(features, device)  # noqa: E731
    else:

        def copy(features: dict) -> dict:
            return {k: tf.raw_ops.DeepCopy(x=v) for k, v in features.items()}

        notes.append("h2d: cpu: no transfer; timed as a DeepCopy of each batch (a memcpy)")
    for features, _ in batches:
        copy(features)
    passes = []
    for _ in range(max(1, repeats)):
        lat = []
        for features, _ in batches:
            t = time.perf_counter()
            copy(features)
            lat.append(time.perf_counter() - t)
        passes.append((sum(lat), lat))
    passes.sort(key=lambda p: p[0])
    total, lat = passes[len(passes) // 2]
    records = sum(samples_in(f) for f, _ in batches)
    return StageMeasurement("h2d", records, max(total, 1e-9), lat)
