"""The exceptions dlpipe raises.

    DlpipeError
    ├── ConfigError(ValueError)          an argument or option is invalid
    ├── FormatError                      input data is malformed (carries path and offset)
    │   └── PaddingError                 padding cannot be found, or lengths are ambiguous
    ├── OutputError                      the output location cannot be used as asked
    │   └── OutputLockedError            another reshard is writing there
    ├── VerifyError                      written shards disagree with their manifest
    ├── LoaderWorkerError(RuntimeError)  a DataLoader worker died or sent nothing in time
    ├── StorageError(OSError)            a remote call failed on every retry (transient faults)
    └── MissingDependencyError(ImportError)  an optional extra is not installed

The CLI turns any DlpipeError into one line on stderr and exit code 1.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConfigError",
    "DlpipeError",
    "FormatError",
    "LoaderWorkerError",
    "MissingDependencyError",
    "OutputError",
    "OutputLockedError",
    "PaddingError",
    "StorageError",
    "VerifyError",
]


class DlpipeError(Exception):
    """Base class of every error dlpipe raises on purpose."""


class ConfigError(DlpipeError, ValueError):
    """An argument or option is invalid; the message names it, the value and what is valid."""


class FormatError(DlpipeError):
    """Input data is malformed.

    ``path`` and ``offset`` (a byte offset, or None) say where; ``hint`` what to do.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        message: str,
        *,
        offset: int | None = None,
        record: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        self.record = record
        self.hint = hint
        self.detail = message
        where = self.path or "<input>"
        if offset is not None:
            where += f" at byte {offset}"
        if record is not None:
            where += f" (record {record})"
        text = f"{where}: {message}"
        if hint:
            text += f"; {hint}"
        super().__init__(text)

    def __reduce__(self):  # survive pickling across worker processes
        return (
            _rebuild_format_error,
            (type(self), self.path, self.detail, self.offset, self.record, self.hint),
        )


def _rebuild_format_error(cls, path, message, offset, record, hint):
    return cls(path, message, offset=offset, record=record, hint=hint)


class PaddingError(FormatError):
    """Padding cannot be located, or the lengths it implies are ambiguous."""


class OutputError(DlpipeError):
    """The output location cannot be used: it exists with other content, is not writable, is full."""



class OutputLockedError(OutputError):
    """Another reshard is writing to the same output; ``holder`` is what it recorded about
    itself (host, pid, start time; {} when unknown)."""

    def __init__(self, message: str, holder: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})


class LoaderWorkerError(DlpipeError, RuntimeError):
    """A DataLoader worker process died, or (with ``timeout=``) sent no batch in time.

    Raised by dlpipe's PyTorch loaders instead of PyTorch's "DataLoader worker (pid(s) N) exited
    unexpectedly"; the loader's other workers are stopped by then. ``worker_id``, ``pid`` and
    ``exitcode`` (negative: the signal number) say which worker; ``epoch`` and
    ``batches_yielded`` where the epoch stopped. A RuntimeError too, so code that catches
    PyTorch's error still catches it.
    """

    def __init__(
        self,
        message: str,
        *,
        worker_id: int | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        epoch: int | None = None,
        batches_yielded: int | None = None,
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        self.epoch = epoch
        self.batches_yielded = batches_yielded


class StorageError(DlpipeError, OSError):
    """A remote storage call failed on every attempt with transient faults (throttling, 5xx,
    resets, timeouts). An OSError too, so callers that turn OSError into their own one-line
    errors keep doing so; ``url`` is the object, ``attempts`` how many were made."""

    def __init__(self, url: str, message: str, attempts: int = 0) -> None:
        OSError.__init__(self, errno.EIO, message)
        self.url, self.attempts = url, attempts

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # survive pickling across worker processes
        return (type(self), (self.url, self.strerror, self.attempts))


class VerifyError(DlpipeError):
    """Shards on disk disagree with their manifest (CRC, counts or checksums)."""


class MissingDependencyError(DlpipeError, ImportError):
    """An optional dependency is missing; the message carries the pip command that installs it."""
