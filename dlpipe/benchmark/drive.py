"""Framework-free timing shared by the measurers of ``dlpipe bench``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from dlpipe.benchmark.ledger import StageMeasurement


def time_units(
    name: str, units: Sequence[tuple[Callable[[], Any], int, int]], repeats: int, warm: bool = True
) -> StageMeasurement:
    """Run every (fn, records, batches) unit ``repeats`` times (after one untimed pass when
    ``warm``); keep the median pass, its per-batch latencies spread over each unit's batches."""
    if warm:
        for fn, _, _ in units:
            fn()
    passes = []
    for _ in range(max(1, repeats)):
        total, lat = 0.0, []
        for fn, _, nb in units:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            total += dt
            lat += [dt / nb] * nb
        passes.append((total, lat))
    passes.sort(key=lambda p: p[0])
    total, lat = passes[len(passes) // 2]
    return StageMeasurement(name, sum(u[1] for u in units), max(total, 1e-9), lat)
