"""What every source is: named fixed-shape columns, read by row ranges in bounded memory."""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlpipe.errors import FormatError
from dlpipe.storage import Location


@dataclass(frozen=True)
class Column:
    """One column of a source: logical dtype and per-record shape (``(128,)``, ``(2,)`` or ``()``)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """Elements per record."""
        return int(np.prod(self.shape, dtype=np.int64))


class Source(abc.ABC):
    """Records with fixed-shape columns (padded, as legacy pipelines store them).

    Subclasses open files lazily and drop handles when pickled, so a source can be sent to
    worker processes. ``read`` returns arrays of shape ``(stop - start, *column.shape)``.
    """

    kind: str = "source"

    #: where the paths came from when they are local copies of remote objects (for the manifest)
    origins: list[str] | None = None

    def __init__(self, paths: Sequence[str | os.PathLike[str]],
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.locations = [Location(p, storage_options) for p in self.paths]

    @property
    @abc.abstractmethod
    def columns(self) -> Mapping[str, Column]: ...

    @property
    @abc.abstractmethod
    def num_records(self) -> int: ...

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of every column."""

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``indices`` (any order). The default reads the covering range in pieces."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return {name: np.empty((0, *c.shape), c.dtype) for name, c in self.columns.items()}
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        out = {name: np.empty((len(indices), *c.shape), c.dtype) for name, c in self.columns.items()}
        # Group sorted indices into runs that are close together, read each run once.
        gaps = np.flatnonzero(np.diff(sorted_idx) > 4096) + 1
        for run in np.split(np.arange(len(sorted_idx)), gaps):
            lo, hi = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
            block = self.read(lo, hi)
            for name, arr in block.items():
                out[name][order[run]] = arr[sorted_idx[run] - lo]
        return out

    @property
    def num_bytes(self) -> int:
        return sum(loc.size() for loc in self.locations if loc.isfile())

    def fingerprint(self) -> str:
        """Identity of the input: kind, paths, sizes and modification times or ETags (as HF
        datasets does); never credentials."""
        h = hashlib.sha256(self.kind.encode())
        # a local copy of a remote object is known by the object, so a re-fetched copy (another
        # machine, an emptied cache) still resumes the same reshard
        origin_of = {local: origin for local, origin in getattr(self, "_staged", None) or ()}
        for loc in self.locations:
            for f in origin_of.get(loc.url, loc).walk_files():
                h.update(f"{f.identity()}\0".encode())
        for name, c in self.columns.items():
            h.update(f"{name}:{c.dtype.str}:{c.shape}".encode())
        return h.hexdigest()[:32]

    def describe(self) -> str:
        return f"{self.kind} source {', '.join(self.paths)}"

    def column_path(self, name: str) -> str:
        """The file that holds column ``name``, for error messages (the source as a whole when
        its columns share files)."""
        return self.paths[0] if len(self.paths) == 1 else self.describe()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in getattr(self, "_unpicklable", ()):
            state[key] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # A source fetched from object storage into the cache may land on another machine (a
        # Ray worker on another node): fetch it there into the same cache path, which is a pure
        # function of the object's identity.
        for local, origin in state.get("_staged") or ():
            if not os.path.exists(local):
                origin.local_copy(cache_dir=os.path.dirname(os.path.dirname(os.path.dirname(local))))


def check_row_counts(counts: Mapping[str, int], path_of: Mapping[str, str]) -> int:
    """All columns must have the same number of rows; return it or name the odd one out."""
    values = set(counts.values())
    if len(values) > 1:
        ref_name = next(iter(counts))
        for name, n in counts.items():
            if n != counts[ref_name]:
                raise FormatError(
                    path_of[name],
                    f"column {name!r} has {n} rows but {ref_name!r} has {counts[ref_name]}",
                    hint="every column must have one row per record",
                )
    return values.pop() if values else 0
