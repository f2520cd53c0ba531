"""Raw fixed-width binary records (legacy dumps, nanoGPT-style ``.bin``), memory-mapped.

A record is a packed C-struct described by a layout string such as
``input_ids:int32[128],labels:float32[2],id:int64``; several files are concatenated in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.base import Column, Source
from dlpipe.sources.ranged import RangeRows

__all__ = ["RawSource", "parse_layout"]

_EXAMPLE = (
    "'input_ids:int32[128],labels:float32[2],id:int64' (or one field: 'int32[128]', 'uint16')"
)
_DEFAULT_NAME = "input_ids"
_FIELD = re.compile(
    r"^\s*(?:(?P<name>[^:\[\]\s]+)\s*:)?\s*(?P<dtype>[^:\[\]\s]+)\s*(?:\[(?P<shape>[^\[\]]*)\])?\s*$"
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def _split_fields(layout: str) -> list[str]:
    """Split on commas that are not inside ``[...]`` (shapes such as ``[4,4]`` hold commas)."""
    fields, depth, cur = [], 0, []
    for ch in layout:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur))
    return fields


def _bad(layout: str, token: str, why: str) -> ConfigError:
    return ConfigError(
        f"--layout {layout!r}: bad field {token.strip()!r}: {why}; valid example: {_EXAMPLE}"
    )


def _parse_dtype(layout: str, token: str, text: str) -> np.dtype:
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise _bad(
            layout, token, f"{text!r} is not a numpy dtype (use int32, <i4, >f8, uint16, ...)"
        ) from None
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise _bad(layout, token, f"dtype {text!r} is not a plain numeric type")
    if text[0] not in "<>=|" and dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<")  # files are little-endian unless the layout says otherwise
    return dtype


def _parse_shape(layout: str, token: str, text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise _bad(layout, token, f"shape [{text}] must be positive integers like [128] or [4,4]")
    return tuple(int(p) for p in parts)


def parse_layout(layout: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """``(name, on-disk dtype, shape)`` per field of a record layout string.

    One unnamed field is called ``input_ids``; with several fields every one needs a name.
    Dtypes without an explicit byte order (``<``, ``>``, ``=``) are little-endian.
    """
    if not isinstance(layout, str) or not layout.strip():
        raise ConfigError(f"--layout {layout!r} is empty; valid example: {_EXAMPLE}")
    if layout.count("[") != layout.count("]"):
        raise ConfigError(f"--layout {layout!r}: unbalanced brackets; valid example: {_EXAMPLE}")
    tokens = _split_fields(layout)
    fields: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for token in tokens:
        if not token.strip():
            raise _bad(layout, token, "empty field (stray comma?)")
        m = _FIELD.match(token)
        if m is None:
            raise _bad(layout, token, "expected NAME:DTYPE[SHAPE]")
        name = m["name"]
        if name is None:
            if len(tokens) > 1:
                raise _bad(layout, token, "with several fields each needs a name, as in NAME:DTYPE")
            name = _DEFAULT_NAME
        elif not _NAME.match(name):
            raise _bad(layout, token, f"field name {name!r} must start with a letter or _")
        if any(name == f[0] for f in fields):
            raise _bad(layout, token, f"field name {name!r} is used twice")
        fields.append(
            (name, _parse_dtype(layout, token, m["dtype"]), _parse_shape(layout, token, m["shape"]))
        )
    return fields


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype


class RawSource(Source):
    """Packed fixed-size records in one or more binary files, each with an optional header."""

    kind = "raw"
    _unpicklable = ("_maps",)

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        layout: str,
        header_bytes: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        super().__init__(paths, storage_options)
        if not self.paths:
            raise ConfigError("RawSource needs at least one path")
        if isinstance(header_bytes, bool) or not isinstance(header_bytes, int) or header_bytes < 0:
            raise ConfigError(f"--header-bytes must be an integer >= 0, got {header_bytes!r}")
        self.layout = layout
        self.header_bytes = header_bytes
        self._fields = parse_layout(layout)
        # A packed structured dtype: fields follow each other with no alignment padding.
        self._record = np.dtype([(n, d, s) if s else (n, d) for n, d, s in self._fields])
        size = self._record.itemsize
        counts = []
        for path, loc in zip(self.paths, self.locations):
            nbytes = loc.size()
            if nbytes < header_bytes:
                raise FormatError(
                    path,
                    f"file has {nbytes} bytes, fewer than the {header_bytes}-byte header",
                    offset=nbytes,
                    hint="check --layout and --header-bytes",
                )
            full, extra = divmod(nbytes - header_bytes, size)
            if extra:
                raise FormatError(
                    path,
                    f"{extra} trailing bytes are not a whole record (record size {size} bytes "
                    f"from layout {layout!r}, {full} whole records)",
                    offset=header_bytes + full * size,
                    record=full,
                    hint="check --layout and --header-bytes",
                )
            counts.append(full)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: list[np.ndarray | None] | None = None
        self._fetched = False  # remote files are read from this process's local copies

    @property
    def columns(self) -> Mapping[str, Column]:
        return {n: Column(n, _native(d), s) for n, d, s in self._fields}

    @property
    def num_records(self) -> int:
        return int(self._starts[-1])

    @property
    def record_bytes(self) -> int:
        """Bytes per record on disk."""
        return self._record.itemsize

    def _map(self, i: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [None] * len(self.paths)
        m = self._maps[i]
        if m is None:
            n = int(self._starts[i + 1] - self._starts[i])
            if n == 0:  # mmap cannot map zero bytes
                m = np.empty(0, self._record)
            elif self.locations[i].remote and not self._fetched:
                m = RangeRows(self.locations[i], self._record, (n,), self.header_bytes)
            else:
                m = np.memmap(
                    self.locations[i].local_copy(),
                    dtype=self._record,
                    mode="r",
                    offset=self.header_bytes,
                    shape=(n,),
                )
            self._maps[i] = m
        return m

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        return {name: np.empty((n, *c.shape), c.dtype) for name, c in self.columns.items()}

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        n = self.num_records
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) are out of range for {n} records")
        out = self._empty(stop - start)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        for i in range(max(first, 0), len(self.paths)):
            if pos >= stop:
                break
            lo, hi = (
                pos - int(self._starts[i]),
                min(stop, int(self._starts[i + 1])) - int(self._starts[i]),
            )
            if hi <= lo:
                continue
            recs = self._map(i)[lo:hi]
            for name in out:
                out[name][pos - start : pos - start + hi - lo] = recs[name]
            pos += hi - lo
        return out

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``indices``: memmap fancy indexing touches only the records asked for. Remote
        files are fetched once into this machine's cache first (see ``NpySource.take``)."""
        if not self._fetched and any(loc.remote for loc in self.locations):
            self._fetched, self._maps = True, None
        indices = np.asarray(indices, dtype=np.int64)
        n = self.num_records
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"indices out of range for {n} records")
        out = self._empty(len(indices))
        file_of = np.searchsorted(self._starts, indices, side="right") - 1
        for i in np.unique(file_of):
            mask = file_of == i
            recs = self._map(int(i))[indices[mask] - self._starts[i]]
            for name in out:
                out[name][mask] = recs[name]
        return out

    def describe(self) -> str:
        head = f", {self.header_bytes}-byte header" if self.header_bytes else ""
        return f"raw source {', '.join(self.paths)} (layout {self.layout!r}{head})"
