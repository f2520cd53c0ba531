"""How much of the machine a benchmark had: CPU-second counters and a 2-process calibration.

What the machine *is* comes from ``dlpipe.benchmark.machine.describe`` (one schema for
``dlpipe bench`` and ``bench/``); this module only measures use. ``own_cpu_seconds`` and
``tree_cpu_seconds`` count a run's own CPU time, ``machine_busy_seconds`` everyone's, so a
report can tell its own work from competing load; ``cpu_scaling_ceiling`` measures what 2
processes can gain over 1 right now (shared vCPUs or a busy host keep it under 2).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np


def own_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (dlpipe's workers)."""
    import resource

    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def tree_cpu_seconds() -> float:
    """``own_cpu_seconds`` plus the live descendants (DataLoader workers, Ray's daemons, an
    S3 server): a worker that exits in between still counts, once reaped."""
    import psutil

    total = own_cpu_seconds()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            t = child.cpu_times()
            total += t.user + t.system
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have been busy (``/proc/stat``), or nan."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _busy_work(_: int) -> float:
    """A fixed CPU-bound task (Python loop + numpy), for the scaling calibration."""
    t0 = time.perf_counter()
    total = 0
    for i in range(1_500_000):
        total += i
    a = np.arange(1 << 20, dtype=np.int64)
    for _ in range(40):
        a = (a * 3 + 1) % 1_000_003
    return time.perf_counter() - t0


def cpu_scaling_ceiling(workers: int = 2, tasks: int = 8, repeat: int = 3) -> float:
    """Throughput of ``workers`` processes / 1 process on identical CPU-bound tasks.

    What this machine can give any 2-process program: vCPUs that share a physical core,
    or a busy host, keep it below ``workers``. Measured with fork, as dlpipe uses.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else None

    def seconds(n: int) -> float:
        with ProcessPoolExecutor(n, mp_context=ctx) as pool:
            list(pool.map(_busy_work, range(n)))  # start the workers outside the timing
            t0 = time.perf_counter()
            list(pool.map(_busy_work, range(tasks)))
            return time.perf_counter() - t0

    one = statistics.median(seconds(1) for _ in range(repeat))
    many = statistics.median(seconds(workers) for _ in range(repeat))
    return one / many


def uptime() -> str | None:
    """``uptime``'s line (load averages, users), or None where there is no such command."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
