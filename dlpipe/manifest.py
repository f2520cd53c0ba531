"""``dataset_info.json``: HF-style features and splits, plus dlpipe's own section.

The HF part (``features``, ``splits``) lets tools that know HF datasets understand the data;
the ``dlpipe`` section is what dlpipe's readers and ``verify`` need: format, per-column
encoding, every shard with its counts and checksum, and where the data came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import FormatError
from dlpipe.manifest_schema import SCHEMA_VERSION, check_manifest
from dlpipe.storage import Location

MANIFEST = "dataset_info.json"


@dataclass(frozen=True)
class ShardInfo:
    split: str
    path: str  # relative to the dataset root
    index: str
    num_records: int
    num_tokens: int
    num_bytes: int
    sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DatasetInfo:
    """What ``dataset_info.json`` holds, parsed. ``root`` is the path or URL as given (without
    ``file://``); ``location`` the same place with its storage options, through which shard and
    index paths are joined (``shard_location``)."""

    root: str
    format: str
    compression: str | None
    columns: dict[str, ColumnEncoding]
    shards: list[ShardInfo]
    pad_values: dict[str, float | int] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    location: Location | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.location is None:
            self.location = Location(self.root)

    @property
    def remote(self) -> bool:
        return self.location.remote

    def shard_location(self, shard: ShardInfo) -> Location:
        return self.location.join(shard.path)

    def index_location(self, shard: ShardInfo) -> Location:
        return self.location.join(shard.index)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(s.split for s in self.shards))

    def split_shards(self, split: str) -> list[ShardInfo]:
        found = [s for s in self.shards if s.split == split]
        if not found and split not in self.splits:
            from dlpipe.errors import ConfigError

            raise ConfigError(f"split={split!r} is not in {self.root}; splits are {', '.join(self.splits)}")
        return found

    def num_records(self, split: str | None = None) -> int:
        return sum(s.num_records for s in self.shards if split is None or s.split == split)


def hf_feature(enc: ColumnEncoding) -> dict:
    """The HF ``features`` entry of a column (``Value`` / ``List``)."""
    value = {"dtype": "bool" if enc.dtype == "bool" else enc.dtype, "_type": "Value"}
    dims = list(enc.shape)
    for dim in reversed(dims):
        value = {"feature": value, "_type": "List"} | ({} if dim is None else {"length": dim})
    return value


def build_manifest(
    *,
    fmt: str,
    compression: str | None,
    columns: Mapping[str, ColumnEncoding],
    shards: list[ShardInfo],
    column_stats: Mapping[str, dict],
    source: dict,
    plan: dict,
    version: str,
) -> dict:
    splits = {}
    for s in shards:
        entry = splits.setdefault(s.split, {"name": s.split, "num_bytes": 0, "num_examples": 0,
                                             "shard_lengths": [], "dataset_name": None})
        entry["num_bytes"] += s.num_bytes
        entry["num_examples"] += s.num_records
        entry["shard_lengths"].append(s.num_records)
    total = sum(s.num_bytes for s in shards)
    return {
        "description": "",
        "citation": "",
        "homepage": "",
        "license": "",
        "features": {name: hf_feature(enc) for name, enc in columns.items()},
        "splits": splits,
        "dataset_size": total,
        "size_in_bytes": total,
        "dlpipe": {
            "schema_version": SCHEMA_VERSION,
            "version": version,
            "format": fmt,
            "compression": compression,
            "columns": {name: enc.to_json() | dict(column_stats.get(name, {})) for name, enc in columns.items()},
            "shards": [s.to_json() for s in shards],
            "source": source,
            "plan": plan,
        },
    }


def load_manifest(root: str | os.PathLike[str] | Location, storage_options: Mapping[str, Any] | None = None) -> DatasetInfo:
    """Parse ``root/dataset_info.json`` (``root`` a local path, ``file://`` or any fsspec URL);
    a FormatError names what is wrong. The manifest is the reshard's commit point: without it
    there is no dataset, whatever shards are there."""
    location = root if isinstance(root, Location) else Location(root, storage_options)
    root = location.url
    path = location.join(MANIFEST)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FormatError(root, f"no {MANIFEST} here, so this is not a dlpipe dataset (or the reshard "
                          "has not finished)", hint="run dlpipe reshard, or point at its --output") from None
    except OSError as e:
        raise FormatError(str(path), f"cannot read the manifest ({e.strerror or e})",
                          hint="check the path and, for a URL, its --storage-option credentials") from None
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise FormatError(str(path), f"the manifest is not JSON ({e})", hint="re-create it with dlpipe reshard") from None
    check_manifest(raw, str(path), local_root=None if location.remote else root)
    try:
        d = raw["dlpipe"]
        columns = {n: ColumnEncoding.from_json(n, c) for n, c in d["columns"].items()}
        shards = [ShardInfo(**s) for s in d["shards"]]
        pad_values = {n: c["pad_value"] for n, c in d["columns"].items() if c.get("pad_value") is not None}
        return DatasetInfo(root, d["format"], d["compression"], columns, shards, pad_values, raw, location)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(str(path), f"malformed manifest ({type(e).__name__}: {e})",
                          hint="re-create it with dlpipe reshard") from None


_EXAMPLE_OVERHEAD = 24  # rough bytes per record of framing and keys, for balancing only


def record_cost(encodings: Mapping[str, ColumnEncoding], balance_by: str) -> tuple[float, float]:
    """(scale, offset): a record of length L costs about ``L * scale + offset`` bytes (or tokens)
    in a shard; the shard plan balances shards by it."""
    if balance_by == "tokens":
        return 1.0, 0.0
    fixed = _EXAMPLE_OVERHEAD
    per_step = 0
    for enc in encodings.values():
        size = np.dtype(enc.storage_dtype).itemsize * enc.inner
        if enc.encoding == "int64_list":
            size = enc.inner  # varints: about a byte for small ids
        if enc.variable:
            per_step += size
        else:
            fixed += size
    return float(per_step), float(fixed)
