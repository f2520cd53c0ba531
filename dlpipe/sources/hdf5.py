"""HDF5 datasets (h5py): ``file.h5`` takes every numeric dataset, ``file.h5:a,b`` the named ones.

The first axis of each dataset is the record; slicing reads only the rows asked for. Several
files are concatenated in order and must hold the same columns.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.base import Column, Source

__all__ = ["HDF5Source", "split_hdf5_spec"]

_NUMERIC = "biufc"


def split_hdf5_spec(spec: str) -> tuple[str, list[str] | None]:
    """``"file.h5:a,b"`` -> ``("file.h5", ["a", "b"])``; ``"file.h5"`` -> ``("file.h5", None)``."""
    if os.path.isfile(spec):
        return spec, None
    for i, ch in enumerate(spec):  # the first ':' whose left side is a file (paths may hold ':')
        if ch == ":" and os.path.isfile(spec[:i]):
            names = [n.strip() for n in spec[i + 1 :].split(",")]
            if not all(names):
                raise ConfigError(f"{spec!r}: empty dataset name; write file.h5:name1,name2")
            return spec[:i], names
    raise FormatError(
        spec.split(":", 1)[0] if ":" in spec else spec,
        "no such file",
        hint="pass file.h5 or file.h5:name1,name2",
    )


def column_name(dataset: str) -> str:
    """Column name of an HDF5 dataset path: ``/group/ids`` -> ``group_ids``."""
    return dataset.strip("/").replace("/", "_")


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype


def _list_datasets(f, h5py) -> list:
    found = []
    f.visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _select(path: str, f, names: list[str] | None, h5py) -> dict[str, str]:
    """Column name -> dataset path for one open file, validated."""
    if names is None:
        sets = [d for d in _list_datasets(f, h5py) if d.ndim >= 1 and d.dtype.kind in _NUMERIC]
        if not sets:
            raise FormatError(
                path,
                "holds no numeric dataset with a record axis",
                hint="name datasets as file.h5:name1,name2",
            )
        rows = Counter(d.shape[0] for d in sets)
        if len(rows) > 1:
            common = rows.most_common(1)[0][0]
            listing = ", ".join(f"{d.name} {d.shape}" for d in sets)
            pick = ",".join(d.name.lstrip("/") for d in sets if d.shape[0] == common)
            raise FormatError(
                path,
                f"datasets disagree in their first (record) dimension: {listing}",
                hint=f"select datasets with one record count, e.g. {path}:{pick}",
            )
    else:
        sets = []
        for name in names:
            obj = f.get(name)
            if not isinstance(obj, h5py.Dataset):
                have = ", ".join(d.name.lstrip("/") for d in _list_datasets(f, h5py)) or "none"
                what = "no dataset" if obj is None else "a group, not a dataset,"
                raise FormatError(
                    path,
                    f"has {what} named {name!r}; datasets: {have}",
                    hint="name datasets as file.h5:name1,name2",
                )
            if obj.ndim == 0 or obj.dtype.kind not in _NUMERIC:
                raise FormatError(
                    path,
                    f"dataset {name!r} ({obj.dtype}, shape {obj.shape}) is not a "
                    "numeric array with a record axis",
                    hint="select numeric datasets",
                )
            sets.append(obj)
        rows = Counter(d.shape[0] for d in sets)
        if len(rows) > 1:
            listing = ", ".join(f"{d.name} {d.shape}" for d in sets)
            raise FormatError(
                path,
                f"datasets disagree in their first (record) dimension: {listing}",
                hint="every dataset needs one row per record",
            )
    out: dict[str, str] = {}
    for d in sets:
        col = column_name(d.name)
        if col in out:
            raise ConfigError(
                f"{path}: datasets {out[col]!r} and {d.name!r} both become column {col!r}"
            )
        out[col] = d.name
    return out


class HDF5Source(Source):
    """Columns from HDF5 datasets, one or more files (``file.h5`` or ``file.h5:name1,name2``)."""

    kind = "hdf5"
    _unpicklable = ("_handles",)

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.specs = [os.fspath(p) for p in paths]
        if not self.specs:
            raise ConfigError("HDF5Source needs at least one path")
        parsed = [split_hdf5_spec(s) for s in self.specs]
        super().__init__([f for f, _ in parsed])  # plain file paths: fingerprint stats them
        h5py = require("h5py", "reading HDF5")
        self._datasets: list[dict[str, str]] = []
        counts: list[int] = []
        cols: dict[str, Column] | None = None
        for path, names in parsed:
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise FormatError(
                    path, f"not a readable HDF5 file: {e}", hint="pass an .h5 file"
                ) from None
            with f:
                sel = _select(path, f, names, h5py)
                here = {c: Column(c, _native(f[d].dtype), f[d].shape[1:]) for c, d in sel.items()}
                counts.append(f[next(iter(sel.values()))].shape[0])
            if cols is None:
                cols = here
            elif here != cols:
                raise FormatError(
                    path,
                    f"columns {_show(here)} differ from {self.paths[0]}'s {_show(cols)}",
                    hint="every file must hold the same datasets, dtypes and shapes",
                )
            self._datasets.append(sel)
        self._columns = cols or {}
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._handles: list | None = None

    @property
    def columns(self) -> Mapping[str, Column]:
        return self._columns

    @property
    def num_records(self) -> int:
        return int(self._starts[-1])

    def _file(self, i: int):
        if self._handles is None:
            self._handles = [None] * len(self.paths)
        if self._handles[i] is None:
            self._handles[i] = require("h5py", "reading HDF5").File(self.paths[i], "r")
        return self._handles[i]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        n = self.num_records
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) are out of range for {n} records")
        out = {
            name: np.empty((stop - start, *c.shape), c.dtype) for name, c in self._columns.items()
        }
        for i, sel in enumerate(self._datasets):
            f_lo, f_hi = int(self._starts[i]), int(self._starts[i + 1])
            lo, hi = max(start, f_lo), min(stop, f_hi)
            if hi <= lo:
                continue
            f = self._file(i)
            for name, dataset in sel.items():
                # read_direct decodes (and byte-swaps) straight into the output rows
                f[dataset].read_direct(
                    out[name], np.s_[lo - f_lo : hi - f_lo], np.s_[lo - start : hi - start]
                )
        return out

    def describe(self) -> str:
        return f"hdf5 source {', '.join(self.specs)}"

    def close(self) -> None:
        """Close open file handles (they reopen on the next read)."""
        for h in self._handles or ():
            if h is not None:
                h.close()
        self._handles = None


def _show(cols: Mapping[str, Column]) -> str:
    return ", ".join(f"{c.name}:{c.dtype}{list(c.shape)}" for c in cols.values())
