"""What every reshard task needs, handed to each worker once by its executor's initializer.

The scan and write tasks are plain functions of small arguments (a record range, a shard task);
the large, shared part of a run (source, padding, output) is the ``Job``, which ``init_worker``
installs in a worker process before its first task and ``current_job`` returns there.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlpipe.formats import ShardFormat
from dlpipe.padding import PaddingSpec
from dlpipe.reshard.output_dir import OutputDir
from dlpipe.sources import Source


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, sent once per worker process."""

    source: Source
    spec: PaddingSpec
    fmt: ShardFormat
    compression: str | None
    output: OutputDir
    chunk_rows: int
    workers: int = 1
    deflate: dict | None = None  # the driver's codec identity (gzip/zlib): every worker must match it


_JOB: Job | None = None


def init_worker(job: Job | None) -> None:
    """An executor's initializer: install ``job`` in this process (None: uninstall it, which
    lets its source's memory maps and files go)."""
    global _JOB
    _JOB = job


def current_job() -> Job:
    """The job ``init_worker`` installed in this process."""
    if _JOB is None:
        raise RuntimeError("no reshard job in this process: the executor did not run init_worker")
    return _JOB
