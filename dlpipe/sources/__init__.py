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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dlpipe.errors import ConfigError, FormatError
from dlpipe.sources.base import Column, Source
from dlpipe.storage import Location, is_remote

__all__ = ["Column", "Source", "open_source", "source_kind"]

_TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")


def _split_name(spec: str) -> tuple[str | None, str]:
    """``NAME=path`` -> (NAME, path); a path that merely holds ``=`` is left whole."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and ":" not in name and not os.path.exists(spec):
        return name, path
    return None, spec


def source_kind(path: str, *, layout: str | None = None, isdir: bool | None = None) -> str:
    """Which reader a path needs, from its name (and ``layout`` for raw binaries)."""
    p = _split_name(path)[1]
    low = p.lower()
    isdir = os.path.isdir(p) if isdir is None else isdir
    if layout is not None:
        return "raw"
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(".npz"):
        return "npz"
    if any(s in low for s in _TFRECORD_SUFFIXES):
        return "tfrecord"
    if low.endswith(".parquet") or isdir:
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
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """Open the inputs named by ``specs`` (see the module docstring) as one Source.

    ``columns`` limits Arrow/Parquet input to those columns (text columns cannot be resharded);
    other sources read every column and the engine keeps the selected ones.

    Paths may be fsspec URLs (``s3://bucket/train.npy``; ``storage_options`` go to the
    filesystem). ``.npy`` and raw fixed-width files are read in place with range requests, so
    every worker fetches only its rows; other kinds are fetched once into the local cache
    (``$DLPIPE_CACHE_DIR``, default ``~/.cache/dlpipe``) and read from there.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = [os.fspath(s) for s in specs]
    if not specs:
        raise ConfigError("no SOURCE given; name at least one input file")
    named: list[tuple[str | None, str]] = []
    isdir = {}
    for spec in specs:
        name, path = _split_name(spec)
        path = path if is_remote(path) else Location(path).url  # file:// URLs become plain paths
        named.append((name, path))
        file_part = path.split(":", 1)[0] if not is_remote(path) and (".h5" in path or ".hdf5" in path) \
            and not os.path.exists(path) else path
        loc = Location(file_part, storage_options)
        try:
            exists = loc.exists()
            isdir[path] = exists and loc.isdir()
            empty = exists and not isdir[path] and loc.size() == 0
        except OSError as e:
            raise FormatError(file_part, f"cannot read it ({e.strerror or type(e).__name__})",
                              hint="check the SOURCE URL and its credentials (--storage-option, AWS_* variables)") from None
        if not exists:
            raise FormatError(file_part, "no such file or directory", hint="check the SOURCE path")
        if empty:
            raise FormatError(file_part, "file is empty", hint="pass a non-empty input")
    kinds = {source_kind(p, layout=layout, isdir=isdir[p]) for _, p in named}
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
        return NpySource(files, storage_options)
    if any(name is not None for name, _ in named):
        raise ConfigError("NAME=path is only for .npy columns; other sources name their own columns")
    paths = [p for _, p in named]
    if kind == "raw":
        from dlpipe.sources.raw import RawSource

        return RawSource(paths, layout=layout, header_bytes=header_bytes, storage_options=storage_options)
    if any(is_remote(p) for p in paths):
        origins = [Location(p, storage_options) for p in paths]
        local = [loc.local_copy() for loc in origins]
        source = _open_local(kind, local, compression, columns)
        source.origins = paths
        source._staged = [(path, loc) for path, loc in zip(local, origins) if loc.remote]
        return source
    return _open_local(kind, paths, compression, columns)


def _open_local(kind: str, paths: list[str], compression: str | None, columns: Sequence[str] | None) -> Source:
    if kind == "npz":
        if len(paths) != 1:
            raise ConfigError("pass one .npz archive at a time")
        from dlpipe.sources.npy import NpzSource

        return NpzSource(paths[0])
    if kind == "tfrecord":
        from dlpipe.sources.tfrecord import TFRecordSource

        return TFRecordSource(paths, compression=compression)
    if kind == "arrow":
        from dlpipe.sources.arrow import ArrowSource

        return ArrowSource(paths, columns=list(columns) if columns else None)
    from dlpipe.sources.hdf5 import HDF5Source

    return HDF5Source(paths)
