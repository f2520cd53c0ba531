"""NVIDIA DALI's TFRecord reader (``fn.readers.tfrecord``) on dlpipe shards.

dlpipe's TFRecord shards are plain ``tf.train.Example`` records, and the ``.index`` file beside
each shard is the very format DALI wants (one ``"offset size"`` line per record, byte for byte
what DALI's ``tfrecord2idx`` writes for the same file), so DALI reads them as they are: no
index to generate. What DALI needs from dlpipe is the ``features`` spec and a decode step, both
made from the manifest:

- ``feature_spec(path)``: per column, the DALI feature and how to decode it, as plain data (no
  DALI needed; ``python -m dlpipe.integrations.dali DIR`` prints it as DALI code). Columns stored
  ``int64_list`` / ``float_list`` are ``VarLenFeature(int64 | float32)``; ``raw`` columns (little
  -endian values of the narrowest dtype, one bytes value) are ``FixedLenFeature([], string)``,
  decoded with ``fn.reinterpret`` to their storage dtype; then ``fn.cast`` to the manifest's
  dtype where it differs, and ``fn.reshape`` to the column's shape (``-1`` for the variable axis).
- ``features(path)``: that spec as ``nvidia.dali.tfrecord`` features.
- ``read(path, split)``: inside a ``pipeline_def``, the reader over the split's shards and
  index files plus the decode; a dict column -> DataNode. ``pad=True`` pads variable-length
  columns to the longest in each batch with the column's pad value (``fn.pad``); extra keyword
  arguments go to ``fn.readers.tfrecord`` (``random_shuffle``, ``shard_id``/``num_shards``,
  ``initial_fill``, ``seed``, ``name``...).

Limits: TFRecord datasets only (DALI's webdataset reader wants its own index format), and
uncompressed ones (DALI's TFRecord reader reads no gzip/zlib), on a local or mounted path. The
reader runs on the CPU (so ``device_id=None`` pipelines work); move outputs with ``.gpu()``.
Shuffling is DALI's own (``random_shuffle`` with a buffer), not dlpipe's epoch plan.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.manifest import DatasetInfo, load_manifest

__all__ = ["feature_spec", "features", "index_paths", "read", "spec_code"]

_PURPOSE = "dlpipe.integrations.dali"
# numpy dtype name -> DALI types.DALIDataType name
_DALI_TYPES = {
    "bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16",
    "uint32": "UINT32", "int32": "INT32", "uint64": "UINT64", "int64": "INT64",
    "float16": "FLOAT16", "float32": "FLOAT", "float64": "FLOAT64",
}


def _info(path: str | os.PathLike[str] | DatasetInfo) -> DatasetInfo:
    info = path if isinstance(path, DatasetInfo) else load_manifest(path)
    if info.format != "tfrecord":
        raise ConfigError(f"{info.root} is a {info.format} dataset; DALI's reader here is the TFRecord one "
                          "(reshard with --format tfrecord)")
    return info


def feature_spec(path: str | os.PathLike[str] | DatasetInfo,
                 columns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per column: ``feature`` (``VarLenFeature`` / ``FixedLenFeature``), ``dtype`` (the tfrecord
    type: ``int64``, ``float32``, ``string``), ``shape`` and ``default`` of the feature, then the
    decode: ``reinterpret`` (storage dtype of a raw column, else None; DALI reads bytes as uint8), ``cast`` (the manifest's
    dtype where it differs from what the feature gives, else None), ``reshape`` (the column's
    shape, ``-1`` for its variable axis; None for a variable column of scalars) and ``pad``
    (the pad value of a variable column, else None). Plain data: DALI is not needed."""
    info = _info(path)
    names = list(info.columns) if columns is None else list(columns)
    spec: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in info.columns:
            raise ConfigError(f"column {name!r} is not in {info.root}; columns: {', '.join(info.columns)}")
        enc = info.columns[name]
        if enc.encoding == "raw":
            feature, dtype, shape, default, given = "FixedLenFeature", "string", [], "", enc.storage_dtype
            reinterpret = None if enc.storage_dtype == "uint8" else enc.storage_dtype  # bytes are uint8
        else:  # int64_list / float_list
            dtype = "int64" if enc.encoding == "int64_list" else "float32"
            feature, shape, default, given, reinterpret = "VarLenFeature", None, 0 if dtype == "int64" else 0.0, dtype, None
        shape_out = [-1 if d is None else int(d) for d in enc.shape]
        reshape = None if shape_out == [-1] else shape_out
        spec[name] = {
            "feature": feature, "dtype": dtype, "shape": shape, "default": default,
            "reinterpret": reinterpret,
            "cast": None if np.dtype(enc.dtype) == np.dtype(given) else enc.dtype,
            "reshape": reshape,
            "pad": info.pad_values.get(name) if enc.variable else None,
        }
    return spec


def index_paths(path: str | os.PathLike[str] | DatasetInfo, split: str = "train") -> tuple[list[str], list[str]]:
    """(shard paths, index paths) of ``split``, for ``fn.readers.tfrecord(path=, index_path=)``."""
    info = _info(path)
    if info.compression is not None:
        raise ConfigError(f"{info.root} is {info.compression}-compressed; DALI's TFRecord reader reads "
                          "uncompressed files only (reshard without --compression)")
    if info.remote:
        raise ConfigError(f"{info.root} is remote; DALI reads local (or mounted) files: copy or mount it")
    shards = info.split_shards(split)
    return ([os.fspath(info.shard_location(s).url) for s in shards],
            [os.fspath(info.index_location(s).url) for s in shards])


def features(path: str | os.PathLike[str] | DatasetInfo, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``features`` argument of ``fn.readers.tfrecord`` for these columns."""
    tfrec = require("nvidia.dali.tfrecord", _PURPOSE)
    out = {}
    for name, s in feature_spec(path, columns).items():
        kind = {"int64": tfrec.int64, "float32": tfrec.float32, "string": tfrec.string}[s["dtype"]]
        if s["feature"] == "VarLenFeature":
            out[name] = tfrec.VarLenFeature(kind, s["default"])
        else:
            out[name] = tfrec.FixedLenFeature(s["shape"], kind, s["default"])
    return out


def read(path: str | os.PathLike[str] | DatasetInfo, split: str = "train", columns: Sequence[str] | None = None,
         *, pad: bool = False, **reader_kwargs: Any) -> dict[str, Any]:
    """Inside a DALI ``pipeline_def``: the dataset's columns as DataNodes (module docstring)."""
    fn = require("nvidia.dali.fn", _PURPOSE)
    types = require("nvidia.dali.types", _PURPOSE)
    info = _info(path)
    paths, indexes = index_paths(info, split)
    spec = feature_spec(info, columns)
    inputs = fn.readers.tfrecord(path=paths, index_path=indexes, features=features(info, columns), **reader_kwargs)
    out = {}
    for name, s in spec.items():
        node = inputs[name]
        if s["reinterpret"] is not None:
            node = fn.reinterpret(node, dtype=getattr(types, _DALI_TYPES[s["reinterpret"]]))
        if s["cast"] is not None:
            node = fn.cast(node, dtype=getattr(types, _DALI_TYPES[s["cast"]]))
        if s["reshape"] is not None:
            node = fn.reshape(node, shape=s["reshape"])
        if pad and s["pad"] is not None:
            node = fn.pad(node, axes=(0,), fill_value=s["pad"])
        out[name] = node
    return out


def spec_code(path: str | os.PathLike[str] | DatasetInfo, columns: Sequence[str] | None = None) -> str:
    """``feature_spec`` as the DALI code it stands for (what ``python -m dlpipe.integrations.dali``
    prints)."""
    spec = feature_spec(path, columns)
    lines = ["import nvidia.dali.tfrecord as tfrec", "", "features = {"]
    for name, s in spec.items():
        if s["feature"] == "VarLenFeature":
            lines.append(f"    {name!r}: tfrec.VarLenFeature(tfrec.{s['dtype']}, {s['default']!r}),")
        else:
            lines.append(f"    {name!r}: tfrec.FixedLenFeature({s['shape']!r}, tfrec.{s['dtype']}, {s['default']!r}),")
    lines += ["}", "# decode, per column, after fn.readers.tfrecord(..., features=features):"]
    for name, s in spec.items():
        steps = []
        if s["reinterpret"]:
            steps.append(f"fn.reinterpret(x, dtype=types.{_DALI_TYPES[s['reinterpret']]})")
        if s["cast"]:
            steps.append(f"fn.cast(x, dtype=types.{_DALI_TYPES[s['cast']]})")
        if s["reshape"] is not None:
            steps.append(f"fn.reshape(x, shape={s['reshape']!r})")
        lines.append(f"#   {name}: {' -> '.join(steps) if steps else 'as read'}"
                     + (f"   (pad value {s['pad']!r})" if s["pad"] is not None else ""))
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m dlpipe.integrations.dali DATASET_DIR", file=sys.stderr)
        return 2
    print(spec_code(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

