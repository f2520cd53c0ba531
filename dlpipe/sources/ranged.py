"""Rows of a fixed-width array in object storage, read with HTTP range requests.

The remote counterpart of ``np.memmap`` for the sources whose records sit at computable byte
offsets (``.npy``, raw fixed-width files): ``rows[a:b]`` is one range request for exactly those
rows, so the scan and unshuffled shards read only their own rows. Memory is bounded by what is
asked for. (Shuffled shards take rows from anywhere; the sources read those from a local copy.)
"""

from __future__ import annotations

import numpy as np

from dlpipe.errors import FormatError
from dlpipe.storage import Location


class RangeRows:
    def __init__(self, location: Location, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> None:
        self.location = location
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.offset = offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.shape[1:]), self.dtype)
        begin = self.offset + start * self.row_bytes
        data = self.location.read_bytes(begin, self.offset + stop * self.row_bytes)
        if len(data) != (stop - start) * self.row_bytes:
            raise FormatError(self.location.url, f"short read: asked for rows [{start}, {stop}), got "
                              f"{len(data)} bytes", offset=begin + len(data),
                              hint="the object changed or was cut short while reading; re-create it")
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("RangeRows reads row ranges (a slice); random rows come from a local copy")
        start, stop, step = key.indices(len(self))
        rows = self._rows(start, max(start, stop))
        return rows if step == 1 else rows[::step]
