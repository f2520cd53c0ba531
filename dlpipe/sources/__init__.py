"""Sources: padded fixed-length inputs, each read in bounded memory.

``open_source`` turns the SOURCE arguments of ``dlpipe reshard`` into one Source:

- ``name=path.npy ...``      one column per .npy file (the name defaults to the file stem)
- ``path.npz``               every array in the archive is a column
- ``path.bin`` + ``layout``  raw fixed-width records (``input_ids:int32[128],labels:float32[2]``)
- ``path.tfrecord``          tf.train.Examples with fixed-length features (``.gz``/``.zz`` for compressed)
- ``dir/`` or ``*.parquet``  a HF ``save_to_disk`` directory, or Parquet files (pyarrow)
- ``path.h5[:a,b]``          HDF5 datasets (h5py)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.base import Column, Source

__all__ = ["Column", "Source", "open_source", "source_kind"]

_TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")


def source_kind(path: str, *, layout: str | None = None) -> str:
    """Which reader a path needs, from its name (and ``layout`` for raw binaries)."""
    p = path.split("=", 1)[1] if "=" in path and not os.path.exists(path) else path
    low = p.lower()
    if layout is not None:
        return "raw"
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(".npz"):
        return "npz"
    if any(s in low for s in _TFRECORD_SUFFIXES):
        return "tfrecord"
    if low.endswith(".parquet") or os.path.isdir(p):
        return "arrow"
    if low.endswith((".arrow",)):
        return "arrow"
    if ".h5" in low or ".hdf5" in low:
        return "hdf5"
    if low.endswith((".bin", ".dat", ".raw")):
        raise ConfigError(
            f"{p}: raw binary input needs a record layout; pass --layout "
            "'input_ids:int32[128]' (several fields: 'a:int32[128],b:float32[2]') and --header-bytes if any"
        )
    raise ConfigError(
        f"{p}: cannot tell the source type from the name; use .npy, .npz, .tfrecord, .parquet, "
        ".h5, a HF save_to_disk directory, or pass --layout for a raw binary file"
    )


def open_source(
    specs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    layout: str | None = None,
    header_bytes: int = 0,
    compression: str | None = None,
    columns: Sequence[str] | None = None,
) -> Source:
    """Open the inputs named by ``specs`` (see the module docstring) as one Source.

    ``columns`` limits Arrow/Parquet input to those columns (text columns cannot be resharded);
    other sources read every column and the engine keeps the selected ones.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = [os.fspath(s) for s in specs]
    if not specs:
        raise ConfigError("no SOURCE given; name at least one input file")
    named: list[tuple[str | None, str]] = []
    for spec in specs:
        name, path = (spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec))
        named.append((name, path))
        file_part = path.split(":", 1)[0] if (".h5" in path or ".hdf5" in path) and not os.path.exists(path) else path
        if not os.path.exists(file_part):
            raise FormatError(file_part, "no such file or directory", hint="check the SOURCE path")
        if os.path.isfile(file_part) and os.path.getsize(file_part) == 0:
            raise FormatError(file_part, "file is empty", hint="pass a non-empty input")
    kinds = {source_kind(p, layout=layout) for _, p in named}
    if len(kinds) > 1:
        raise ConfigError(f"SOURCE arguments mix input types ({', '.join(sorted(kinds))}); pass one type at a time")
    kind = kinds.pop()

    if kind == "npy":
        from dlpipe.sources.npy import NpySource

        files = {}
        for name, path in named:
            name = name or Path(path).stem
            if name in files:
                raise ConfigError(f"column {name!r} is given twice; name columns as NAME=path.npy")
            files[name] = path
        return NpySource(files)
    if any(name is not None for name, _ in named):
        raise ConfigError("NAME=path is only for .npy columns; other sources name their own columns")
    paths = [p for _, p in named]
    if kind == "npz":
        if len(paths) != 1:
            raise ConfigError("pass one .npz archive at a time")
        from dlpipe.sources.npy import NpzSource

        return NpzSource(paths[0])
    if kind == "raw":
        from dlpipe.sources.raw import RawSource

        return RawSource(paths, layout=layout, header_bytes=header_bytes)
    if kind == "tfrecord":
        from dlpipe.sources.tfrecord import TFRecordSource

        return TFRecordSource(paths, compression=compression)
    if kind == "arrow":
        from dlpipe.sources.arrow import ArrowSource

        return ArrowSource(paths, columns=list(columns) if columns else None)
    from dlpipe.sources.hdf5 import HDF5Source

    return HDF5Source(paths)
