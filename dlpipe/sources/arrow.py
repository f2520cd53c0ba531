"""Parquet files, Arrow IPC files and HF ``save_to_disk`` directories, read with pyarrow only.

Padded list columns (every row the same length) become fixed-shape columns. Parquet is read
batch by batch through its row groups (a cursor makes sequential reads resume, not restart);
Arrow IPC is memory-mapped and only the record batches covering a range are decoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.base import Column, Source

__all__ = ["ArrowSource"]

_BATCH_BYTES = 32 << 20  # decoded bytes per Parquet batch: bounds memory on wide rows
_RAGGED_HINT = "pad the column to a fixed length or drop it (ArrowSource(..., columns=[...]))"


def _pa():
    return require("pyarrow", "reading Parquet/Arrow")


def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:4] == b"PAR1":
        return "parquet"
    return "ipc-file" if head == b"ARROW1" else "ipc-stream"


def _resolve(path: str) -> list[tuple[str, str]]:
    """The data files behind one SOURCE path, in order, with their formats."""
    if not os.path.isdir(path):
        return [(path, _sniff(path))]
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits") or sorted(
                d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
            )
        example = os.path.join(path, splits[0]) if splits else os.path.join(path, "train")
        raise ConfigError(
            f"{path} is a HF DatasetDict with splits {', '.join(splits)}; "
            f"pass one split directory, e.g. {example}"
        )
    state = os.path.join(path, "state.json")
    if os.path.exists(state):
        with open(state) as f:
            names = [d["filename"] for d in json.load(f).get("_data_files", [])]
        files = [os.path.join(path, n) for n in names]
    else:
        entries = sorted(os.listdir(path))
        files = [os.path.join(path, n) for n in entries if n.endswith(".parquet")]
        files = files or [os.path.join(path, n) for n in entries if n.endswith(".arrow")]
    if not files:
        raise FormatError(
            path,
            "directory holds no .parquet or .arrow files",
            hint="pass a HF save_to_disk directory, .parquet or .arrow files",
        )
    return [(f, _sniff(f)) for f in files]


def _type_dims(t) -> tuple[list[int | None], object] | None:
    """Per-record dims of a (nested) list type (None where only the data can tell) and the
    leaf type, or None when the column is not numeric."""
    pa = _pa()
    dims: list[int | None] = []
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        dims.append(t.list_size if pa.types.is_fixed_size_list(t) else None)
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return dims, t
    return None


def _first_row_dims(arr, dims: list[int | None]) -> tuple[int, ...]:
    """Resolve variable dims from row 0 (later rows are checked against it on every read)."""
    cur, out = arr.slice(0, 1), []
    for d in dims:
        if d is None:
            off = cur.offsets.to_numpy() if len(cur) else np.zeros(2, np.int32)
            d = int(off[1] - off[0])
        out.append(d)
        flat = cur.flatten()
        cur = flat.slice(0, 1) if len(flat) else flat
    return tuple(out)


def _to_numpy(
    arr, shape: tuple[int, ...], dtype: np.dtype, path: str, name: str, row0: int
) -> np.ndarray:
    """A column chunk as ``(n, *shape)``; zero-copy for primitive values without nulls."""
    pa = _pa()
    n, cur, per = len(arr), arr, 1
    for depth in range(len(shape) + 1):
        if cur.null_count:
            bad = int(np.flatnonzero(~cur.is_valid().to_numpy(zero_copy_only=False))[0]) // per
            raise FormatError(
                path,
                f"column {name!r} row {row0 + bad} holds a null",
                record=row0 + bad,
                hint="fill nulls, or drop the column (ArrowSource(..., columns=[...]))",
            )
        if depth == len(shape):
            break
        d = shape[depth]
        if not pa.types.is_fixed_size_list(cur.type):
            lengths = np.diff(cur.offsets.to_numpy())
            bad_el = np.flatnonzero(lengths != d)
            if bad_el.size:
                row = row0 + int(bad_el[0]) // per
                what = "list" if depth == 0 else f"nested list (depth {depth})"
                raise FormatError(
                    path,
                    f"column {name!r} row {row} has a {what} of length {int(lengths[bad_el[0]])}, "
                    f"but the first row's is {d}: the column is ragged",
                    record=row,
                    hint=_RAGGED_HINT,
                )
        cur = cur.flatten()
        per *= d
    values = cur.to_numpy(zero_copy_only=False)
    return values.reshape((n, *shape)).astype(dtype, copy=False)


class _IpcReader:
    """One Arrow IPC file (stream or file format), memory-mapped; batches decoded on demand."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self._buf = self._file = None
        pa = _pa()
        try:
            if fmt == "ipc-file":
                reader = pa.ipc.open_file(pa.memory_map(path))
                self.schema = reader.schema
                rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
                self._pos: list[int] = []
            else:
                src = pa.BufferReader(pa.memory_map(path).read_buffer())
                self.schema = pa.ipc.read_schema(pa.ipc.read_message(src))
                self._pos, rows = [], []
                while True:  # note each record batch message's offset: random access later
                    pos = src.tell()
                    try:
                        msg = pa.ipc.read_message(src)
                    except EOFError:
                        break
                    if msg.type != "record batch":
                        raise FormatError(
                            path,
                            f"Arrow stream holds a {msg.type} message",
                            hint="dictionary-encoded columns are not supported; cast them",
                        )
                    self._pos.append(pos)
                    rows.append(pa.ipc.read_record_batch(msg, self.schema).num_rows)
        except (pa.ArrowInvalid, OSError) as e:
            raise FormatError(
                path,
                f"not a readable Arrow IPC file: {e}",
                hint="pass .arrow files from save_to_disk or pyarrow.ipc",
            ) from None
        self.starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_buf": None, "_file": None}

    def _batch(self, i: int):
        pa = _pa()
        if self.fmt == "ipc-file":
            if self._file is None:
                self._file = pa.ipc.open_file(pa.memory_map(self.path))
            return self._file.get_batch(i)
        if self._buf is None:
            self._buf = pa.memory_map(self.path).read_buffer()
        msg = pa.ipc.read_message(self._buf.slice(self._pos[i]))
        return pa.ipc.read_record_batch(msg, self.schema)

    def batches(self, lo: int, hi: int, names: list[str]) -> list:
        out, first = [], int(np.searchsorted(self.starts, lo, side="right")) - 1
        for i in range(max(first, 0), len(self.starts) - 1):
            b_lo, b_hi = int(self.starts[i]), int(self.starts[i + 1])
            if b_lo >= hi:
                break
            if b_hi > lo:
                s = max(lo, b_lo)
                out.append(self._batch(i).select(names).slice(s - b_lo, min(hi, b_hi) - s))
        return out


class _ParquetReader:
    """One Parquet file, read in batches; a cursor lets the next sequential read carry on."""

    def __init__(self, path: str) -> None:
        self.path, self._pf, self._cursor = path, None, None
        self.batch_rows = 8192
        pa = _pa()
        try:
            meta = self._open().metadata
            self.schema = self._open().schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise FormatError(
                path,
                f"not a readable Parquet file: {e}",
                hint="pass files written by pyarrow.parquet or Dataset.to_parquet",
            ) from None
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pf": None, "_cursor": None}

    def _open(self):
        if self._pf is None:
            self._pf = require("pyarrow.parquet", "reading Parquet").ParquetFile(self.path)
        return self._pf

    def batches(self, lo: int, hi: int, names: list[str]) -> list:
        if self._cursor is not None and self._cursor[0] == lo and self._cursor[3] == names:
            pos, it, pending, _ = self._cursor
        else:  # start at the row group holding ``lo`` and skip forward
            g = int(np.searchsorted(self.starts, lo, side="right")) - 1
            groups = list(range(g, len(self.starts) - 1))
            it = self._open().iter_batches(
                batch_size=self.batch_rows, row_groups=groups, columns=names
            )
            pos, pending = int(self.starts[g]), None
        out = []
        while pos < hi:
            batch = pending if pending is not None else next(it)
            pending, end = None, pos + batch.num_rows
            if end > lo:
                s = max(lo, pos)
                out.append(batch.slice(s - pos, min(hi, end) - s))
            if end > hi:
                pending, end = batch.slice(hi - pos), hi
            pos = end
        self._cursor = (pos, it, pending, names)
        return out


class ArrowSource(Source):
    """Numeric columns of Parquet/Arrow data: scalars, and padded (regular) lists as fixed shapes.

    ``columns`` selects a subset, e.g. to leave out a text column. Arrays returned by ``read``
    may be read-only views of memory-mapped data.
    """

    kind = "arrow"

    def __init__(
        self, paths: Sequence[str | os.PathLike[str]], *, columns: list[str] | None = None
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        super().__init__(paths)
        if not self.paths:
            raise ConfigError("ArrowSource needs at least one path")
        files = [f for p in self.paths for f in _resolve(p)]
        self._readers = [
            _ParquetReader(p) if fmt == "parquet" else _IpcReader(p, fmt) for p, fmt in files
        ]
        first = self._readers[0]
        names = list(first.schema.names) if columns is None else list(columns)
        missing = [c for c in names if c not in first.schema.names]
        if missing:
            raise ConfigError(
                f"columns={columns!r}: {first.path} has no column {missing[0]!r}; "
                f"it has {', '.join(first.schema.names)}"
            )
        if not names:
            raise ConfigError(f"columns={columns!r} selects no column")
        self._names = names
        dims, leaf = self._check_schemas(names)
        self._starts = np.concatenate(
            [[0], np.cumsum([r.starts[-1] for r in self._readers], dtype=np.int64)]
        )
        self._columns = self._resolve_shapes(names, dims, leaf)
        row_bytes = sum(c.width * c.dtype.itemsize for c in self._columns.values())
        for r in self._readers:
            if isinstance(r, _ParquetReader):
                r.batch_rows = max(1, min(65536, _BATCH_BYTES // max(row_bytes, 1)))
        if self.num_records:  # check the first rows now, so ragged data fails early
            self.read(0, min(self.num_records, 1024))

    def _check_schemas(self, names: list[str]) -> tuple[dict, dict]:
        dims: dict[str, list[int | None]] = {}
        leaf: dict[str, np.dtype] = {}
        usable = [f.name for f in self._readers[0].schema if _type_dims(f.type) is not None]
        for r in self._readers:
            for name in names:
                if name not in r.schema.names:
                    raise FormatError(
                        r.path,
                        f"has no column {name!r}, which {self._readers[0].path} has",
                        hint="every file must have the same columns",
                    )
                t = r.schema.field(name).type
                spec = _type_dims(t)
                if spec is None:
                    raise FormatError(
                        r.path,
                        f"column {name!r} has type {t}, not numbers or lists of numbers",
                        hint=f"drop it: pass columns={usable!r}" if usable else _RAGGED_HINT,
                    )
                d, dt = spec[0], np.dtype(spec[1].to_pandas_dtype())
                if name not in dims:
                    dims[name], leaf[name] = list(d), dt
                elif len(d) != len(dims[name]) or dt != leaf[name]:
                    raise FormatError(
                        r.path,
                        f"column {name!r} has type {t}, unlike the first file",
                        hint="every file must have the same column types",
                    )
                else:
                    for k, size in enumerate(d):
                        if size is not None and dims[name][k] not in (None, size):
                            raise FormatError(
                                r.path,
                                f"column {name!r} has fixed size {size} at depth "
                                f"{k}, the first file {dims[name][k]}",
                                hint=_RAGGED_HINT,
                            )
                        dims[name][k] = dims[name][k] if size is None else size
        return dims, leaf

    def _resolve_shapes(self, names, dims, leaf) -> dict[str, Column]:
        cols = {}
        nonempty = [r for r in self._readers if r.starts[-1] > 0]
        sample = nonempty[0].batches(0, 1, names)[0] if nonempty else None
        for name in names:
            if sample is not None and None in dims[name]:
                shape = _first_row_dims(sample.column(name), dims[name])
            else:  # no rows to measure: an unknown length is 0
                shape = tuple(d or 0 for d in dims[name])
            cols[name] = Column(name, leaf[name], shape)
        return cols

    @property
    def columns(self) -> Mapping[str, Column]:
        return self._columns

    @property
    def num_records(self) -> int:
        return int(self._starts[-1])

    @property
    def num_bytes(self) -> int:
        return sum(os.path.getsize(r.path) for r in self._readers)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        n = self.num_records
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) are out of range for {n} records")
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in self._names}
        for i, r in enumerate(self._readers):
            f_lo, f_hi = int(self._starts[i]), int(self._starts[i + 1])
            if f_hi <= start or f_lo >= stop:
                continue
            row0 = max(start, f_lo)
            for batch in r.batches(row0 - f_lo, min(stop, f_hi) - f_lo, self._names):
                for name, c in self._columns.items():
                    pieces[name].append(
                        _to_numpy(batch.column(name), c.shape, c.dtype, r.path, name, row0)
                    )
                row0 += batch.num_rows
        out = {}
        for name, c in self._columns.items():
            p = pieces[name]
            out[name] = (
                p[0]
                if len(p) == 1
                else np.concatenate(p)
                if p
                else np.empty((0, *c.shape), c.dtype)
            )
        return out
