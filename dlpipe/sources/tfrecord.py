"""TFRecord files of ``tf.train.Example``s with fixed-length (padded) features, read without TensorFlow.

Opening a source walks the framing of every file once (checking CRCs) and keeps only the frame
offsets. Uncompressed files are memory-mapped and only the records asked for are decoded, so
memory stays bounded. GZIP/ZLIB streams cannot be seeked into: a compressed file is decompressed
whole, once per process, and the last one used stays in memory; for random access over compressed
input, reshard it first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.compression import read_decompressed
from dlpipe.formats.tfrecord.example_decode import DecodedFeature, decode_examples
from dlpipe.formats.tfrecord.framing import payload_bounds, scan_frames
from dlpipe.sources.base import Column, Source

__all__ = ["TFRecordSource", "compression_of"]

_DTYPES = {"int64": np.dtype(np.int64), "float": np.dtype(np.float32), "bytes": np.dtype(np.uint8)}
_FIXED_HINT = (
    "every record of a padded (FixedLenFeature) TFRecord file must hold the same features with the "
    "same lengths; pad the data to one length first, or read it with a variable-length reader"
)


def compression_of(path: str, compression: str | None = None) -> str | None:
    """The compression of ``path``: as given, else from the suffix (``.gz``; ``.zz``/``.zlib``)."""
    if compression is not None:
        if compression not in ("none", "gzip", "zlib"):
            raise ConfigError(
                f"compression={compression!r} is not one of none, gzip, zlib (or None: from the suffix)"
            )
        return None if compression == "none" else compression
    low = path.lower()
    if low.endswith(".gz"):
        return "gzip"
    if low.endswith((".zz", ".zlib")):
        return "zlib"
    return None


class TFRecordSource(Source):
    """Records of one or more TFRecord files, in order; every feature is a fixed-shape column.

    int64_list → int64 ``(length,)``, float_list → float32 ``(length,)``, bytes_list holding one
    value of n bytes → uint8 ``(n,)``.
    """

    kind = "tfrecord"
    _unpicklable = ("_maps", "_inflated")

    def __init__(
        self, paths: Sequence[str | os.PathLike[str]], *, compression: str | None = None
    ) -> None:
        super().__init__(paths)
        if not self.paths:
            raise ConfigError("paths is empty; pass at least one TFRecord file")
        self._compression = [compression_of(p, compression) for p in self.paths]
        self._maps: dict[int, np.ndarray] | None = None
        self._inflated: tuple[int, bytes] | None = None
        self._frames = []
        for i, path in enumerate(self.paths):
            buf = self._buffer(i)
            self._frames.append(scan_frames(buf, path=path))
        counts = [len(f) - 1 for f in self._frames]
        self._bounds = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._bounds[1:])
        first = next((i for i, c in enumerate(counts) if c), None)
        if first is None:
            raise FormatError(
                self.paths[0],
                "holds no records",
                offset=0,
                hint="columns are learned from the first record; pass a non-empty file",
            )
        self._columns = _columns_of(
            self._decode(first, np.zeros(1, dtype=np.int64)), self.paths[first]
        )

    @property
    def columns(self) -> Mapping[str, Column]:
        return self._columns

    @property
    def num_records(self) -> int:
        return int(self._bounds[-1])

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_records:
            raise ConfigError(
                f"read({start}, {stop}) is outside 0 <= start <= stop <= {self.num_records}"
            )
        return self.take(np.arange(start, stop, dtype=np.int64))

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``indices`` (any order, repeats allowed); only those records are decoded."""
        indices = np.asarray(indices, dtype=np.int64).ravel()
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_records):
            bad = indices[(indices < 0) | (indices >= self.num_records)][0]
            raise ConfigError(f"record index {int(bad)} is outside 0..{self.num_records - 1}")
        out = {n: np.empty((len(indices), *c.shape), c.dtype) for n, c in self._columns.items()}
        file_of = np.searchsorted(self._bounds, indices, side="right") - 1
        for f in np.unique(file_of):
            rows = np.flatnonzero(file_of == f)
            local = indices[rows] - self._bounds[f]
            block = self._rows(int(f), local)
            for name, arr in block.items():
                if len(rows) == len(indices):
                    out[name] = arr
                else:
                    out[name][rows] = arr
        return out

    def _rows(self, f: int, local: np.ndarray) -> dict[str, np.ndarray]:
        """Decode records ``local`` of file ``f`` and check them against the columns."""
        decoded = self._decode(f, local)
        path, frames = self.paths[f], self._frames[f]

        def fail(at: np.ndarray, message: str) -> FormatError:
            i = int(local[at[0]])
            return FormatError(path, message, offset=int(frames[i]), record=i, hint=_FIXED_HINT)

        for name in decoded.keys() - self._columns.keys():
            raise fail(
                np.flatnonzero(decoded[name].present),
                f"feature {name!r} is not in the first record",
            )
        out = {}
        for name, col in self._columns.items():
            feat = decoded.get(name)
            if feat is None or not feat.present.all():
                missing = np.arange(len(local)) if feat is None else np.flatnonzero(~feat.present)
                raise fail(missing, f"feature {name!r} is missing (the first record has it)")
            if _DTYPES[feat.kind] != col.dtype:
                raise fail(
                    np.arange(len(local)),
                    f"feature {name!r} is {feat.kind}, the first record's is {col.dtype}",
                )
            counts = np.diff(feat.row_splits)
            if feat.kind == "bytes":
                sizes = np.diff(feat.value_splits)
                if np.any(counts != 1):
                    raise fail(
                        np.flatnonzero(counts != 1),
                        f"feature {name!r} holds {int(counts[counts != 1][0])} "
                        "bytes values, expected one",
                    )
                counts = sizes
            bad = np.flatnonzero(counts != col.width)
            if len(bad):
                raise fail(
                    bad,
                    f"feature {name!r} has length {int(counts[bad[0]])}, expected {col.width} "
                    "(the first record's)",
                )
            out[name] = feat.values.reshape(len(local), *col.shape)
        return out

    def _decode(self, f: int, local: np.ndarray) -> dict[str, DecodedFeature]:
        frames = self._frames[f]
        starts, ends = payload_bounds(frames)
        try:
            return decode_examples(
                self._buffer(f),
                starts[local],
                ends[local],
                path=self.paths[f],
                frame_offsets=frames[local],
            )
        except FormatError as e:  # the decoder counts records from 0 within this call
            record = int(local[e.record]) if e.record is not None else None
            raise FormatError(
                e.path, e.detail, offset=e.offset, record=record, hint=e.hint
            ) from None

    def _buffer(self, f: int) -> np.ndarray | bytes:
        """The record stream of file ``f``: a memory map, or the decompressed bytes (one file cached)."""
        if self._compression[f] is None:
            if self._maps is None:
                self._maps = {}
            if f not in self._maps:
                self._maps[f] = read_decompressed(self.paths[f], None)
            return self._maps[f]
        if self._inflated is None or self._inflated[0] != f:
            self._inflated = None  # free the previous file before inflating the next
            self._inflated = (f, read_decompressed(self.paths[f], self._compression[f]))
        return self._inflated[1]

    def describe(self) -> str:
        kinds = {c or "uncompressed" for c in self._compression}
        return f"tfrecord source ({', '.join(sorted(kinds))}) {', '.join(self.paths)}"


def _columns_of(decoded: Mapping[str, DecodedFeature], path: str) -> dict[str, Column]:
    """Columns from the first record, in name order (map order in an Example is not meaningful)."""
    if not decoded:
        raise FormatError(
            path,
            "the first record has no features",
            offset=0,
            record=0,
            hint="pass a TFRecord file of tf.train.Example records",
        )
    cols = {}
    for name in sorted(decoded):
        feat = decoded[name]
        n = int(feat.row_splits[-1])
        if feat.kind == "bytes":
            if n != 1:
                raise FormatError(
                    path,
                    f"feature {name!r} holds {n} bytes values; a column needs exactly one",
                    offset=0,
                    record=0,
                    hint=_FIXED_HINT,
                )
            n = int(feat.value_splits[-1])
        cols[name] = Column(name, _DTYPES[feat.kind], (n,))
    return cols
