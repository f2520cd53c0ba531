"""How the PyTorch measurer times things: loader streams into ``benchmark.drive``, a model step
alone, host-to-device copies."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.drive import drive, time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.modes import batch_counts, samples_in
from dlpipe.benchmark.torch_measure.device import STEP_BUDGET_S, _Model, _sync, _to


class _Stream:
    """Batches of a loader, epoch after epoch (``set_epoch`` then a fresh iterator), for ever."""

    def __init__(self, loader, epoch: int) -> None:
        self.loader, self.epoch, self.it = loader, epoch, None

    def __next__(self) -> Any:
        while True:
            if self.it is None:
                target = self.loader if hasattr(self.loader, "set_epoch") else self.loader.sampler
                if hasattr(target, "set_epoch"):
                    target.set_epoch(self.epoch)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def ready(self) -> int | None:
        """Batches finished by workers and not yet taken (None without workers). Reads private
        DataLoader state (``_data_queue``, ``_task_info``); None if that ever changes."""
        inner = getattr(self.it, "_inner", self.it)
        try:
            queued = inner._data_queue.qsize()
            stored = sum(len(v) == 2 for v in inner._task_info.values())
        except (AttributeError, NotImplementedError):
            return None
        return int(queued + stored)


def _drive(make_stream: Callable[[int], _Stream], model: _Model, cfg: BenchConfig, device) -> dict:
    """``benchmark.drive`` of ``model`` over fresh streams (see there for what is timed)."""
    move = device.type == "cuda" and not model.moves_batches

    def fetch(stream: _Stream):
        host = next(stream)
        return (_to(host, device) if move else host), host

    return drive(make_stream, fetch, model, batch_counts, repeats=cfg.repeats, warmup=cfg.warmup, steps=cfg.steps,
                 depth=_Stream.ready)


def _time_step(
    model: _Model, batches: Sequence[dict], steps: int, *, widths: int = 8
) -> StageMeasurement:
    """The model alone on up to ``widths`` finished batches taken in turn (their widths as the
    data has them): each once untimed for DeepCAL (new shapes pick kernels, grow allocators),
    then up to ``steps`` steps, stopping after ``STEP_BUDGET_S`` (at least 3)."""
    batches = batches[:widths]
    for batch in batches if model.spec.kind == "deepcal" else batches[:1]:
        model(batch)
    lat: list[float] = []
    items = 0
    start = time.perf_counter()
    while len(lat) < max(steps, 3) and (
        len(lat) < 3 or time.perf_counter() - start < STEP_BUDGET_S
    ):
        batch = batches[len(lat) % len(batches)]
        t = time.perf_counter()
        model(batch)
        lat.append(time.perf_counter() - t)
        items += samples_in(batch)
    return StageMeasurement("step", items, max(sum(lat), 1e-9), lat)


def _time_h2d(batches: list[dict], device, repeats: int, notes: list[str]) -> StageMeasurement:
    """Host-to-device copies of finished batches: pinned (the stage), pageable (a note)."""
    records = [(samples_in(b), 1) for b in batches]
    if device.type != "cuda":
        units = [
            (functools.partial(lambda b: {k: v.clone() for k, v in b.items()}, b), n, k)
            for b, (n, k) in zip(batches, records)
        ]
        notes.append("h2d: cpu: no transfer; timed as a clone() of each batch (a memcpy)")
        return time_units("h2d", units, repeats)

    def copy(b: dict) -> None:
        _to(b, device)
        _sync(device)

    pinned = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    stage = time_units(
        "h2d", [(functools.partial(copy, b), n, k) for b, (n, k) in zip(pinned, records)], repeats
    )
    pageable = time_units(
        "h2d", [(functools.partial(copy, b), n, k) for b, (n, k) in zip(batches, records)], repeats
    )
    notes.append(
        f"h2d: pinned {stage.capacity:,.0f} samples/s, pageable {pageable.capacity:,.0f} samples/s"
    )
    return stage
