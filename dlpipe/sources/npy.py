"""``.npy`` files (one column each) and ``.npz`` archives (several columns), memory-mapped."""

from __future__ import annotations

import ast
import io
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dlpipe.errors import FormatError
from dlpipe.sources.base import Column, Source, check_row_counts
from dlpipe.sources.ranged import RangeRows
from dlpipe.storage import Location

_MAGIC = b"\x93NUMPY"
_HEADER_READ = 1 << 16  # numpy pads headers to 64 bytes; 64 KiB covers any real one


def read_npy_header(f, path: str, base: int = 0) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of the .npy stream at ``f``, validated."""
    head = f.read(10)
    if len(head) < 10 or not head.startswith(_MAGIC):
        raise FormatError(path, "not a .npy file (bad magic)", offset=base,
                          hint="pass .npy files written by numpy.save")
    major = head[6]
    if major == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        head += f.read(2)
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise FormatError(path, f"unsupported .npy version {major}", offset=base + 6)
    text = f.read(hlen)
    if len(text) < hlen:
        raise FormatError(path, "truncated .npy header", offset=base + start,
                          hint="the file was cut short; re-create it")
    try:
        meta = ast.literal_eval(text.decode("latin1"))
        dtype = np.dtype(meta["descr"])
        shape = tuple(int(s) for s in meta["shape"])
        fortran = bool(meta["fortran_order"])
    except Exception:
        raise FormatError(path, "unreadable .npy header", offset=base + start) from None
    if dtype.hasobject:
        raise FormatError(path, "object arrays cannot be resharded", offset=base + start,
                          hint="save numeric arrays (np.save(..., allow_pickle=False))")
    return dtype, shape, fortran, base + start + hlen


def _header_stream(loc: Location, size: int):
    """The start of a .npy file as a file object (one small range request when remote)."""
    if not loc.remote:
        return open(loc.url, "rb")
    return io.BytesIO(loc.read_bytes(0, min(size, _HEADER_READ)))


class NpySource(Source):
    """Columns from ``.npy`` files, each a 1-D or N-D array whose first axis is the record."""

    kind = "npy"
    _unpicklable = ("_maps",)

    def __init__(self, files: Mapping[str, str | os.PathLike[str]],
                 storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(list(files.values()), storage_options)
        self._files = {name: os.fspath(p) for name, p in files.items()}
        self._where = dict(zip(self._files, self.locations))
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        counts = {}
        for name, path in self._files.items():
            loc = self._where[name]
            size = loc.size()
            if size == 0:
                raise FormatError(path, "file is empty", hint="pass a .npy file written by numpy.save")
            with _header_stream(loc, size) as f:
                dtype, shape, fortran, offset = read_npy_header(f, path)
            if len(shape) == 0:
                raise FormatError(path, "a 0-d array has no records", hint="save one row per record")
            if fortran and len(shape) > 1:
                raise FormatError(path, "Fortran-ordered arrays are not supported",
                                  hint="save with np.save(path, np.ascontiguousarray(a))")
            need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size < need:
                raise FormatError(path, f"truncated: header promises {need} bytes, file has {size}",
                                  offset=size, hint="the file was cut short; re-create it")
            self._layout[name] = (dtype, shape, offset)
            counts[name] = shape[0]
        self._n = check_row_counts(counts, self._files)
        self._maps: dict[str, np.ndarray] | None = None
        self._fetched = False  # remote files are read from this process's local copies

    @property
    def columns(self) -> Mapping[str, Column]:
        return {n: Column(n, d.newbyteorder("=") if d.byteorder not in "=|" else d, s[1:])
                for n, (d, s, _) in self._layout.items()}

    @property
    def num_records(self) -> int:
        return self._n

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            self._maps = {}
            for name, (d, s, off) in self._layout.items():
                loc = self._where[name]
                if loc.remote and not self._fetched:
                    self._maps[name] = RangeRows(loc, d, s, off)
                else:
                    self._maps[name] = np.memmap(loc.local_copy(), dtype=d, mode="r", offset=off, shape=s)
        return self._maps

    def column_path(self, name: str) -> str:
        return self._files[name]

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        # Rows from anywhere in the file (a shuffled shard): a range request per run of rows would
        # fetch most of a remote file again for every chunk, so it is fetched once into this
        # machine's cache and memory-mapped from then on.
        if not self._fetched and any(loc.remote for loc in self.locations):
            self._fetched, self._maps = True, None
        return super().take(indices)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        cols = self.columns
        return {name: np.asarray(m[start:stop], dtype=cols[name].dtype) for name, m in self._open().items()}


class NpzSource(Source):
    """Columns from one ``.npz`` archive. Stored (uncompressed) members are memory-mapped;
    compressed members are streamed from the archive on each read."""

    kind = "npz"
    _unpicklable = ("_maps",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__([path])
        path = os.fspath(path)
        self._path = path
        if os.path.getsize(path) == 0:
            raise FormatError(path, "file is empty", hint="pass an .npz archive written by numpy.savez")
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise FormatError(path, "not a valid .npz (zip) archive, or truncated",
                              hint="re-create it with numpy.savez") from None
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...], int | None, str]] = {}
        counts = {}
        with zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with zf.open(info) as f:
                    dtype, shape, _, data_off = read_npy_header(f, f"{path}:{info.filename}")
                offset = None
                if info.compress_type == zipfile.ZIP_STORED:
                    with open(path, "rb") as raw:  # local header has variable-length fields
                        raw.seek(info.header_offset + 26)
                        n1, n2 = (int.from_bytes(raw.read(2), "little") for _ in range(2))
                    offset = info.header_offset + 30 + n1 + n2 + data_off
                if len(shape) == 0:
                    raise FormatError(path, f"member {name!r} is 0-d and has no records")
                self._layout[name] = (dtype, shape, offset, info.filename)
                counts[name] = shape[0]
        if not self._layout:
            raise FormatError(path, "archive holds no .npy members")
        self._n = check_row_counts(counts, {n: f"{path}:{n}" for n in counts})
        self._maps: dict[str, np.ndarray] | None = None

    @property
    def columns(self) -> Mapping[str, Column]:
        return {n: Column(n, d, s[1:]) for n, (d, s, _, _) in self._layout.items()}

    @property
    def num_records(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        out = {}
        for name, (dtype, shape, offset, member) in self._layout.items():
            if offset is not None:
                m = np.memmap(self._path, dtype=dtype, mode="r", offset=offset, shape=shape)
                out[name] = np.array(m[start:stop])
            else:
                out[name] = _read_compressed_rows(self._path, member, dtype, shape, start, stop)
        return out


def _read_compressed_rows(path, member, dtype, shape, start, stop) -> np.ndarray:
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        read_npy_header(f, path)
        f.seek(f.tell() + start * row_bytes)  # zipfile streams forward; bounded memory
        data = f.read((stop - start) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))
