"""How each column is stored in shards, the batches writers encode, and each column's stats.

A column is either *variable* (its first axis was padded; the padding is stripped and each record
keeps only its real elements) or *fixed* (labels, coordinates: every record the same shape).
Values are stored as little-endian ``storage_dtype``, the narrowest dtype that holds every value
of the column losslessly; readers cast back to the logical ``dtype`` recorded in the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dlpipe.errors import ConfigError

if TYPE_CHECKING:
    from dlpipe.padding import PaddingSpec

ENCODINGS = ("raw", "int64_list", "float_list")
_INT_LADDER = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.uint64]


@dataclass(frozen=True)
class ColumnEncoding:
    """One column as stored: logical dtype/shape, storage dtype and TFRecord feature encoding.

    ``shape`` is the logical per-record shape; ``None`` marks the variable (stripped) axis.
    ``encoding``: ``raw`` = one bytes_list value of little-endian ``storage_dtype`` values;
    ``int64_list`` / ``float_list`` = TensorFlow-native lists.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    storage_dtype: str
    encoding: str = "raw"

    @property
    def variable(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    @property
    def inner(self) -> int:
        """Elements per step of the variable axis (or per record, for a fixed column)."""
        dims = self.shape[1:] if self.variable else self.shape
        return int(np.prod(dims, dtype=np.int64)) if dims else 1

    def to_json(self) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "storage_dtype": self.storage_dtype,
            "encoding": self.encoding,
        }

    @classmethod
    def from_json(cls, name: str, d: dict) -> ColumnEncoding:
        return cls(name, d["dtype"], tuple(d["shape"]), d["storage_dtype"], d["encoding"])


@dataclass
class ColumnBatch:
    """One column for n records, ready to encode: ``data`` is (n, width) in storage dtype, and
    row i's first ``elems[i]`` values are real (``elems`` None: all of them)."""

    data: np.ndarray
    elems: np.ndarray | None


def narrowest_dtype(dtype: np.dtype, lo, hi) -> np.dtype:
    """The smallest dtype that holds every value in [lo, hi] of a column of ``dtype`` exactly."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind in "iu":
        if lo is None:  # empty column
            return np.dtype(np.uint8)
        for cand in _INT_LADDER:
            info = np.iinfo(cand)
            if info.min <= int(lo) and int(hi) <= info.max:
                return np.dtype(cand)
    if dtype.kind == "f":
        return dtype.newbyteorder("=")
    raise ConfigError(f"cannot store dtype {dtype}; dlpipe stores integer, float and bool columns")


def varint_bytes_total(data: np.ndarray) -> int:
    """Bytes the values of an integer array take as protobuf varints (negatives take 10)."""
    if data.size == 0:
        return 0
    v = data.ravel()
    total = v.size
    if v.dtype.kind == "i":
        negative = int(np.count_nonzero(v < 0))
        total += 9 * negative
        if negative:
            v = v[v >= 0]
    hi = int(v.max()) if v.size else 0
    k = 1
    while k < 10 and hi >= 1 << (7 * k):
        total += int(np.count_nonzero(v >= (1 << (7 * k))))
        k += 1
    return total


def choose_encoding(
    name: str,
    dtype: np.dtype,
    shape: tuple[int | None, ...],
    lo,
    hi,
    *,
    int_encoding: str = "auto",
    num_values: int = 0,
    varint_bytes: int | None = None,
) -> ColumnEncoding:
    """Pick storage dtype and encoding for a column from its value range.

    ``raw``: little-endian values of the narrowest lossless dtype (fastest to decode).
    ``int64_list``: TF-native varints, readable with a plain ``tf.io.VarLenFeature(tf.int64)``
    (floats then go to float_list when float32). ``auto``: per integer column, whichever is
    smaller for the data (``num_values`` real values taking ``varint_bytes`` as varints): a few
    large values, such as rare code points above 2**16, make the narrowest dtype wide for every
    value while varints spend one byte on each small one.
    """
    if int_encoding not in ("auto", "raw", "int64_list"):
        raise ConfigError(f"int_encoding={int_encoding!r}; use 'auto', 'raw' or 'int64_list'")
    dtype = np.dtype(dtype)
    storage = narrowest_dtype(dtype, lo, hi)
    if int_encoding == "auto":
        small = varint_bytes is not None and varint_bytes < num_values * storage.itemsize
        fits = not (dtype == np.uint64 and hi is not None and int(hi) >= 2**63)
        if dtype.kind in "iu" and small and fits:
            return ColumnEncoding(name, dtype.name, tuple(shape), "int64", "int64_list")
        return ColumnEncoding(name, dtype.name, tuple(shape), storage.name, "raw")
    encoding = "raw"
    if int_encoding == "int64_list":
        if dtype.kind in "iub":
            if dtype == np.uint64 and hi is not None and int(hi) >= 2**63:
                raise ConfigError(f"column {name!r} holds uint64 values >= 2**63; int64_list cannot")
            storage, encoding = np.dtype(np.int64), "int64_list"
        elif dtype == np.float32:
            encoding = "float_list"
    return ColumnEncoding(name, dtype.name, tuple(shape), storage.name, encoding)


def column_stats(spec: PaddingSpec, encodings: Mapping[str, ColumnEncoding], lengths: np.ndarray,
                 pad_value: Mapping[str, int | None]) -> dict[str, dict]:
    """The manifest's per-column stats of each stored sequence column: its pad value and the
    distribution of record lengths (loaders pick length-bucket boundaries from its quantiles)."""
    stats: dict[str, dict] = {}
    if spec.method == "none" or len(lengths) == 0:
        return stats
    q = np.percentile(lengths, [50, 90, 99]).tolist()
    hist, edges = np.histogram(lengths, bins=min(16, max(1, spec.max_length)), range=(0, spec.max_length))
    length_stats = {
        "padded_length": spec.max_length, "min": int(lengths.min()), "max": int(lengths.max()),
        "mean": float(lengths.mean()), "p50": q[0], "p90": q[1], "p99": q[2],
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "padding_efficiency_of_source": float(lengths.mean() / spec.max_length) if spec.max_length else 1.0,
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        # every 5th percentile: loaders pick length-bucket boundaries from these
        "quantiles": np.percentile(lengths, np.arange(0, 101, 5), method="higher").astype(int).tolist(),
    }
    for name in spec.sequence_columns:
        if name in encodings:
            stats[name] = {"pad_value": pad_value.get(name), "lengths": length_stats}
    return stats
