"""Framework-free timing shared by the measurers of ``dlpipe bench``."""

from __future__ import annotations

import statistics
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


def drive(
    make_stream: Callable[[int], Any],
    fetch: Callable[[Any], tuple[Any, Any]],
    step: Callable[[Any], Any],
    count: Callable[[Any], tuple[int, int, int]],
    *,
    repeats: int,
    warmup: int,
    steps: int,
    depth: Callable[[Any], int | None] | None = None,
) -> dict[str, Any]:
    """``repeats`` × (``warmup`` + ``steps``) batches into a model: the one timing loop of every
    measurer, so both frameworks' numbers mean the same.

    Per repeat a fresh stream (``make_stream(repeat)``); ``fetch(stream)`` takes the next batch
    and moves it where the model wants it, returning (batch, the batch on the host); ``step(batch)``
    runs the model and returns when it has finished; ``count(host)`` gives (samples, real
    tokens, computed tokens: ``modes.batch_counts``). A step's *wait* is its fetch, its *compute* its step; a repeat's
    *wall* runs from its first timed fetch to the end of its last step. ``depth(stream)`` (if
    given) samples the loader's ready batches before each fetch. Returns per repeat
    ``samples``, ``tokens``, ``computed`` (tokens), ``wall`` and the three rates; ``wait_s``, ``compute_s`` and
    ``queue`` (None without ``depth`` samples) of the last repeat, and ``fetch_cpu_s``: the main
    thread's CPU time in each fetch (what taking a batch costs the process that trains)."""
    keys = ("samples_per_s", "tokens_per_s", "padded_tokens_per_s", "samples", "tokens", "computed", "wall")
    out: dict[str, Any] = {k: [] for k in keys}
    for r in range(repeats):
        stream = make_stream(r)
        for _ in range(warmup):
            step(fetch(stream)[0])
        wait, comp, queue, cpu = [], [], [], []
        samples = tokens = padded = 0
        start = time.perf_counter()
        for _ in range(steps):
            ready = depth(stream) if depth is not None else None
            t0, c0 = time.perf_counter(), time.thread_time()
            batch, host = fetch(stream)
            t1 = time.perf_counter()
            cpu.append(time.thread_time() - c0)
            step(batch)
            t2 = time.perf_counter()
            wait.append(t1 - t0)
            comp.append(t2 - t1)
            if ready is not None:
                queue.append(float(ready))
            n, real, total = count(host)
            samples, tokens, padded = samples + n, tokens + real, padded + total
        wall = time.perf_counter() - start
        del stream  # a loader's workers shut down before the next repeat starts new ones
        for key, value in (("samples", samples), ("tokens", tokens), ("computed", padded), ("wall", wall)):
            out[key].append(value)
        out["samples_per_s"].append(samples / wall)
        out["tokens_per_s"].append(tokens / wall)
        out["padded_tokens_per_s"].append(padded / wall)
        out.update(wait_s=wait, compute_s=comp, queue=queue or None, fetch_cpu_s=cpu)
    return out


def step_seconds(latencies: Sequence[float], num_batches: int) -> float:
    """The mean step time over batches that take turns (``latencies[i]`` is batch ``i %
    num_batches``): each batch's median, then their mean, so batches of several widths
    (buckets) count alike and a slow outlier does not."""
    n = max(1, min(num_batches, len(latencies)))
    return float(sum(statistics.median(latencies[i::n]) for i in range(n)) / n)
