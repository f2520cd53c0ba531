"""The machine a benchmark ran on, and how much of it the benchmark had.

``machine_info`` records CPU, memory and library versions; ``cpu_scaling_ceiling`` measures
what 2 processes can gain over 1 right now (shared vCPUs or a busy host keep it under 2);
the CPU-second counters tell a run's own CPU time from everyone else's.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent


def _version(dist: str, *alternatives: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (dist, *alternatives):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _dlpipe_origin() -> dict[str, str | None]:
    """Which dlpipe gets benchmarked: its version and where it was imported from."""
    try:
        import dlpipe
    except ImportError:
        return {"dlpipe": None, "dlpipe_path": None}
    version = _version("dlpipe") or getattr(dlpipe, "__version__", None)
    return {"dlpipe": version, "dlpipe_path": str(Path(dlpipe.__path__[0]))}


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


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": _version("tensorflow-cpu", "tensorflow"),
        "webdataset": _version("webdataset"),
        **_dlpipe_origin(),
        "git_commit": _git_commit(),
    }


def own_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (dlpipe's workers)."""
    import resource

    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have been busy (``/proc/stat``), or nan."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")
