"""The schema of ``dataset_info.json``, checked once when a dataset is opened.

A manifest may come from a place the reader does not control (a shared bucket, a downloaded
corpus), so nothing in it is trusted before this check: every field has its type and range
checked, the counts must add up, and every shard and index path must be a plain relative path
inside the dataset (no absolute paths, ``..``, URL schemes or, for a local dataset, symlinks
that lead out of it). A path that escaped would make a reader open another file with the
reader's own permissions or credentials. A problem is a FormatError naming the manifest and the
field, e.g. ``dlpipe.shards[3].path``.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

import numpy as np

from dlpipe.columns import ENCODINGS
from dlpipe.errors import FormatError
from dlpipe.formats import FORMATS

SCHEMA_VERSION = 1
SHARD_FIELDS = ("split", "path", "index", "num_records", "num_tokens", "num_bytes", "sha256")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Bad(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def check_manifest(raw: Any, where: str, *, local_root: str | None = None) -> None:
    """Raise a FormatError naming ``where`` and the first bad field of ``raw`` (a parsed
    ``dataset_info.json``). ``local_root``: the dataset's directory, when local, to refuse shard
    paths that leave it through a symlink."""
    try:
        _check(raw, local_root)
    except _Bad as e:
        raise FormatError(where, f"invalid manifest field {e}",
                          hint="re-create it with dlpipe reshard; dlpipe reads only what it wrote") from None


def confined_path(path: Any, field: str, local_root: str | None = None) -> str:
    """``path`` if it is a normalized relative path inside the dataset, else _Bad."""
    if not isinstance(path, str) or not path:
        raise _Bad(field, f"must be a non-empty relative path, got {path!r}")
    if path.startswith("/") or "\\" in path or _SCHEME.match(path):
        raise _Bad(field, f"{path!r} is not a relative path inside the dataset (absolute paths, URLs "
                          "and backslashes are refused)")
    if posixpath.normpath(path) != path or path == "." or path.split("/")[0] == "..":
        raise _Bad(field, f"{path!r} is not a normalized path inside the dataset (no '.', '..' or '//')")
    if local_root is not None:
        real_root = os.path.realpath(local_root)
        real = os.path.realpath(os.path.join(local_root, path))
        if os.path.commonpath([real_root, real]) != real_root:
            raise _Bad(field, f"{path!r} leads out of the dataset through a symlink (to {real})")
    return path


def _check(raw: Any, local_root: str | None) -> None:
    _dict(raw, "<top level>")
    d = _dict(raw.get("dlpipe"), "dlpipe")
    version = d.get("schema_version")
    if not _is_int(version) or version < 1:
        raise _Bad("dlpipe.schema_version", f"must be an integer >= 1, got {version!r}")
    if version > SCHEMA_VERSION:
        raise _Bad("dlpipe.schema_version", f"{version} is newer than this dlpipe reads ({SCHEMA_VERSION}); "
                                            "upgrade dlpipe")
    fmt = d.get("format")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise _Bad("dlpipe.format", f"{fmt!r}; known formats: {', '.join(FORMATS)}")
    if d.get("compression", "missing") not in FORMATS[fmt].compressions:
        raise _Bad("dlpipe.compression", f"{d.get('compression', 'missing')!r}; for {fmt}: "
                                         f"{', '.join(str(c).lower() for c in FORMATS[fmt].compressions)}")
    columns = _dict(d.get("columns"), "dlpipe.columns")
    if not columns:
        raise _Bad("dlpipe.columns", "has no columns")
    for name, col in columns.items():
        _check_column(name, col, f"dlpipe.columns.{name}")
    features = _dict(raw.get("features"), "features")
    if set(features) != set(columns):
        raise _Bad("features", f"names {sorted(features)} differ from dlpipe.columns {sorted(columns)}")
    shards = d.get("shards")
    if not isinstance(shards, list):
        raise _Bad("dlpipe.shards", f"must be a list, got {type(shards).__name__}")
    seen: set[str] = set()
    per_split: dict[str, list[int]] = {}
    for i, s in enumerate(shards):
        field = f"dlpipe.shards[{i}]"
        _dict(s, field)
        if sorted(s) != sorted(SHARD_FIELDS):
            raise _Bad(field, f"has fields {sorted(s)}; expected {sorted(SHARD_FIELDS)}")
        if not isinstance(s["split"], str) or not s["split"]:
            raise _Bad(f"{field}.split", f"must be a non-empty string, got {s['split']!r}")
        for key in ("path", "index"):
            p = confined_path(s[key], f"{field}.{key}", local_root)
            if p in seen:
                raise _Bad(f"{field}.{key}", f"{p!r} is named twice in the manifest")
            seen.add(p)
        for key in ("num_records", "num_tokens", "num_bytes"):
            if not _is_int(s[key]) or s[key] < 0:
                raise _Bad(f"{field}.{key}", f"must be an integer >= 0, got {s[key]!r}")
        if not isinstance(s["sha256"], str) or not _SHA256.match(s["sha256"]):
            raise _Bad(f"{field}.sha256", f"must be 64 lowercase hex digits, got {s['sha256']!r}")
        per_split.setdefault(s["split"], []).append(s["num_records"])
    _check_splits(raw.get("splits"), per_split)


def _check_column(name: str, col: Any, field: str) -> None:
    _dict(col, field)
    dtype = _dtype(col.get("dtype"), f"{field}.dtype")
    storage = _dtype(col.get("storage_dtype"), f"{field}.storage_dtype")
    shape = col.get("shape")
    if not isinstance(shape, list) or not all(
        (d is None and i == 0) or (_is_int(d) and d >= 0) for i, d in enumerate(shape)
    ):
        raise _Bad(f"{field}.shape", f"must be a list of sizes >= 0, None only first, got {shape!r}")
    encoding = col.get("encoding")
    if encoding not in ENCODINGS:
        raise _Bad(f"{field}.encoding", f"{encoding!r}; known encodings: {', '.join(ENCODINGS)}")
    # what reshard writes: integers in the narrowest integer type that holds the column's value
    # range (uint8 for int8 data in [0, 127]: the reader checks that range), floats as they are
    # or narrower; TF lists of their own types
    fits = {
        "raw": lambda: (storage.kind in "iu" and dtype.kind in "biu") or np.can_cast(storage, dtype, "safe"),
        "int64_list": lambda: storage == np.int64 and dtype.kind in "biu",
        "float_list": lambda: storage == np.float32 and dtype == np.float32,
    }[encoding]
    if not fits():
        raise _Bad(field, f"storage_dtype {storage} with encoding {encoding} cannot hold dtype {dtype}")
    pad = col.get("pad_value")
    if pad is not None and not isinstance(pad, (int, float)):
        raise _Bad(f"{field}.pad_value", f"must be a number or null, got {pad!r}")
    lengths = col.get("lengths")
    if lengths is not None:
        _dict(lengths, f"{field}.lengths")
        lo, hi = lengths.get("min"), lengths.get("max")
        if not (_is_int(lo) and _is_int(hi) and 0 <= lo <= hi):
            raise _Bad(f"{field}.lengths", f"min/max must be integers 0 <= min <= max, got {lo!r}/{hi!r}")


def _check_splits(splits: Any, per_split: dict[str, list[int]]) -> None:
    _dict(splits, "splits")
    if set(splits) != set(per_split):
        raise _Bad("splits", f"names {sorted(splits)} differ from the shards' splits {sorted(per_split)}")
    for name, counts in per_split.items():
        entry = _dict(splits[name], f"splits.{name}")
        if entry.get("num_examples") != sum(counts):
            raise _Bad(f"splits.{name}.num_examples",
                       f"{entry.get('num_examples')!r}, but its shards hold {sum(counts)} records")
        if entry.get("shard_lengths") != counts:
            raise _Bad(f"splits.{name}.shard_lengths", f"{entry.get('shard_lengths')!r} differ from the "
                                                       f"shards' num_records {counts}")


def _dict(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be an object, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype(value: Any, field: str) -> np.dtype:
    try:
        dtype = np.dtype(value) if isinstance(value, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.byteorder == ">":
        raise _Bad(field, f"{value!r} is not a bool, integer or float dtype name")
    return dtype
