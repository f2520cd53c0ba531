"""The machine a benchmark ran on, its ceilings, and how to split its CPUs between processes.

``describe`` records what the numbers were measured on without importing TensorFlow or
PyTorch (versions from package metadata through ``library_versions``, the one version collector
of dlpipe's benchmarks and ``bench/``; GPUs from ``nvidia-smi`` when present).
``measure_ceilings`` times, in a few seconds, what no loader can beat on this machine:
reading a file from the page cache, copying memory, and CRC32C. ``cpu_sets`` and ``pin``
give each of N benchmark processes its own CPUs, a NUMA node each when there are enough.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import ConfigError

__all__ = [
    "CORE_VERSIONS",
    "cpu_sets",
    "describe",
    "gpus",
    "library_versions",
    "measure_ceilings",
    "numa_nodes",
    "pin",
]

_SYS_NODE = Path("/sys/devices/system/node")
_SYS_CPU = Path("/sys/devices/system/cpu")


def parse_cpu_list(text: str) -> list[int]:
    """Linux cpulist syntax: ``'0-3,8,10-11'`` -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def numa_nodes(root: Path = _SYS_NODE) -> dict[int, list[int]]:
    """NUMA node -> its CPUs, from sysfs; {} where sysfs does not say (then treat as one node)."""
    nodes: dict[int, list[int]] = {}
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        text = _read(d / "cpulist")
        if text is not None and text.strip():
            nodes[int(d.name[4:])] = parse_cpu_list(text)
    return nodes


def _sockets(root: Path = _SYS_CPU) -> int | None:
    ids = {_read(p) for p in root.glob("cpu[0-9]*/topology/physical_package_id")}
    ids.discard(None)
    return len(ids) or None


def _core_groups(cpus: Iterable[int], root: Path = _SYS_CPU) -> list[list[int]]:
    """``cpus`` grouped by physical core (SMT siblings together), in CPU order."""
    cpus = sorted(cpus)
    available, seen, groups = set(cpus), set(), []
    for cpu in cpus:
        if cpu in seen:
            continue
        text = _read(root / f"cpu{cpu}" / "topology" / "thread_siblings_list")
        siblings = parse_cpu_list(text) if text else [cpu]
        group = sorted((set(siblings) & available) | {cpu})
        seen.update(group)
        groups.append(group)
    return groups


def _cpu_model() -> str | None:
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_bytes() -> int | None:
    for line in (_read(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpus(timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """NVIDIA GPUs as [{'index', 'name', 'memory_mib'}] from nvidia-smi; [] if absent or failing."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        name, _, mem = line.rpartition(",")
        if not name.strip():
            continue
        try:
            memory = int(float(mem.strip().split()[0]))
        except (ValueError, IndexError):
            memory = None
        found.append({"index": len(found), "name": name.strip(), "memory_mib": memory})
    return found


# a package name -> the distributions that provide it, first found wins
_DISTRIBUTIONS = {"tensorflow": ("tensorflow", "tensorflow-cpu")}
CORE_VERSIONS = ("dlpipe", "numpy", "tensorflow", "torch", "torchdata", "google-crc32c")


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Package name -> installed version (package metadata), or None; imports none of them.

    ``tensorflow`` also finds ``tensorflow-cpu``. ``dlpipe`` is the version of the dlpipe
    running this code (which may be a checkout on ``sys.path``, not the installed one).
    """
    out: dict[str, str | None] = {}
    for name in names:
        if name == "dlpipe":
            from dlpipe._version import __version__

            out[name] = __version__
            continue
        out[name] = None
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def describe(extra_versions: Iterable[str] = ()) -> dict[str, Any]:
    """What the numbers were measured on. Imports neither TensorFlow nor PyTorch.

    ``versions`` holds ``CORE_VERSIONS`` and then ``extra_versions`` (the packages a caller
    compares against, e.g. ``webdataset``)."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    nodes = numa_nodes()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "sockets": _sockets(),
        "numa_nodes": len(nodes) or 1,
        "numa_cpus": {str(k): v for k, v in nodes.items()},
        "memory_bytes": _memory_bytes(),
        "gpus": gpus(),
        "python": platform.python_version(),
        "versions": library_versions(dict.fromkeys([*CORE_VERSIONS, *extra_versions])),
    }


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    file_bytes: int = 256 << 20,
    copy_bytes: int = 256 << 20,
    crc_bytes: int = 64 << 20,
) -> dict[str, Any]:
    """Bytes/s of a page-cache file read, a memory copy and CRC32C; about 1–3 s in all.

    The file is written to ``data_dir`` (where the benchmark's shards live; default the
    temp dir), read once to fill the page cache, and timed on the second read; on a tmpfs
    this is memory bandwidth through the read syscall. A loader reading shards from the page
    cache cannot beat the first; every dlpipe record read is CRC-checked, so the last bounds
    a verifying reader per core.
    """
    import google_crc32c

    for name, n in (
        ("file_bytes", file_bytes),
        ("copy_bytes", copy_bytes),
        ("crc_bytes", crc_bytes),
    ):
        if n <= 0:
            raise ConfigError(f"{name}={n!r} must be positive")
    chunk = 8 << 20
    payload = np.random.default_rng(0).integers(0, 256, min(chunk, file_bytes), dtype=np.uint8)
    buf = bytearray(chunk)
    with tempfile.TemporaryDirectory(prefix="dlpipe-ceiling-", dir=data_dir) as tmp:
        path = Path(tmp) / "read.bin"
        with open(path, "wb") as f:
            for start in range(0, file_bytes, chunk):
                f.write(payload[: min(chunk, file_bytes - start)])

        def read_all() -> None:
            with open(path, "rb", buffering=0) as f:
                view = memoryview(buf)
                while f.readinto(view):
                    pass

        read_all()  # fill the page cache
        read_s = _best_seconds(read_all, 1)

    src = np.ones(copy_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in outside the timing
    copy_s = _best_seconds(lambda: np.copyto(dst, src), 3)

    crc_buf = np.random.default_rng(1).integers(0, 256, crc_bytes, dtype=np.uint8).tobytes()
    crc_s = _best_seconds(lambda: google_crc32c.value(crc_buf), 2)
    return {
        "page_cache_read_bytes_per_s": file_bytes / read_s,
        "memcpy_bytes_per_s": copy_bytes / copy_s,
        "crc32c_bytes_per_s": crc_bytes / crc_s,
        "crc32c_implementation": getattr(google_crc32c, "implementation", None),
        "sizes_bytes": {"read": file_bytes, "memcpy": copy_bytes, "crc32c": crc_bytes},
    }


def _split(seq: list, n: int) -> list[list]:
    """``seq`` in n contiguous, nearly equal parts (the first parts one longer)."""
    k, extra = divmod(len(seq), n)
    parts, start = [], 0
    for i in range(n):
        end = start + k + (i < extra)
        parts.append(seq[start:end])
        start = end
    return parts


def cpu_sets(
    n_procs: int,
    *,
    available: Iterable[int] | None = None,
    nodes: Mapping[int, Iterable[int]] | None = None,
    cores: Iterable[Iterable[int]] | None = None,
) -> list[list[int]]:
    """Split the CPUs this process may use into ``n_procs`` disjoint sets that cover them.

    With at least ``n_procs`` NUMA nodes holding usable CPUs, each set is whole nodes (memory
    stays local). Otherwise whole physical cores are split, SMT siblings kept together, so two
    processes never share a core; with fewer cores than processes, single CPUs are split.
    ``available``, ``nodes`` and ``cores`` default to this host (affinity and sysfs); pass them
    to plan for another topology.
    """
    if isinstance(n_procs, bool) or not isinstance(n_procs, int) or n_procs < 1:
        raise ConfigError(f"n_procs={n_procs!r} must be a positive integer")
    cpus = sorted(set(os.sched_getaffinity(0) if available is None else available))
    if len(cpus) < n_procs:
        raise ConfigError(
            f"n_procs={n_procs} needs at least {n_procs} CPUs; this process may use {len(cpus)}: {cpus}"
        )
    usable = set(cpus)
    node_map = numa_nodes() if nodes is None else nodes
    node_cpus = [sorted(set(c) & usable) for _, c in sorted(node_map.items())]
    node_cpus = [c for c in node_cpus if c]
    if len(node_cpus) >= n_procs and sum(map(len, node_cpus)) == len(cpus):
        return [sorted(c for node in group for c in node) for group in _split(node_cpus, n_procs)]
    if cores is None:
        groups = _core_groups(cpus)
    else:
        groups = [sorted(set(g) & usable) for g in cores]
        covered = {c for g in groups for c in g}
        groups = [g for g in groups if g] + [[c] for c in cpus if c not in covered]
    if len(groups) >= n_procs:
        return [sorted(c for g in part for c in g) for part in _split(groups, n_procs)]
    return _split(cpus, n_procs)


def pin(cpus: Iterable[int]) -> set[int]:
    """Restrict this process (and the workers it starts later) to ``cpus``; returns the old set."""
    wanted = set(cpus)
    if not wanted:
        raise ConfigError("pin needs at least one CPU; got an empty set")
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as e:
        raise ConfigError(
            f"cannot pin to CPUs {sorted(wanted)} (usable: {sorted(old)}): {e}"
        ) from e
    return old


_MALLOC_TUNED: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc malloc's trim and mmap thresholds in this measuring process, once (both
    frameworks' processes, so neither gets an allocator the other lacks).

    A CPU training step allocates tens of MB of fresh activations and gradients; glibc returns
    them to the kernel after each step and faults them in again in the next (~10,000 page faults
    and ~30 ms of system CPU per DeepCAL step at [256, 128], measured). TensorFlow's allocator
    keeps its memory; PyTorch's CPU performance guide recommends a caching allocator (jemalloc,
    tcmalloc) for the same reason. This is the same effect without another library. False
    where the C library is not glibc (nothing changes).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            # M_TRIM_THRESHOLD (-1): keep up to 1 GiB free at the top of the heap;
            # M_MMAP_THRESHOLD (-3): blocks up to 256 MiB come from the heap, not fresh mmaps
            _MALLOC_TUNED = bool(libc.mallopt(-1, 1 << 30)) and bool(libc.mallopt(-3, 1 << 28))
        except (OSError, AttributeError):
            pass
    return _MALLOC_TUNED
