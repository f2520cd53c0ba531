"""``dlpipe verify``: re-read every shard and check it against the manifest.

Checks, per shard: the file exists with the recorded size and SHA-256; what the format's own walk
checks (``ShardFormat.verify``: every TFRecord frame's length and data CRC, or every tar header's
checksum, and that every record decodes to the manifest's columns); the record count; the index
file; and the token count.

The dataset may be local or at an fsspec URL (``storage_options`` as for ``load_dataset``): a
remote shard is fetched whole, one at a time, into memory (a local one is memory-mapped).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.errors import DlpipeError, VerifyError
from dlpipe.formats import ShardFormat, get_format
from dlpipe.formats.compression import decompress, read_decompressed
from dlpipe.manifest import DatasetInfo, ShardInfo, load_manifest
from dlpipe.storage import Location


@dataclass
class VerifyReport:
    root: str
    shards: int = 0
    records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{self.root}: {state}: {self.shards} shards, {self.records:,} records, "
                f"{self.bytes:,} bytes checked in {self.seconds:.1f} s")


def verify(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
           raise_on_error: bool = True) -> VerifyReport:
    """Check every shard under ``path`` (a local path or fsspec URL) against its manifest; raise
    VerifyError on a mismatch (or, with ``raise_on_error=False``, list the problems in the report)."""
    t0 = time.perf_counter()
    info = load_manifest(path, storage_options)
    report = VerifyReport(info.root)
    fmt = get_format(info.format)
    for shard in info.shards:
        try:
            _verify_shard(info, fmt, shard)
        except DlpipeError as e:
            report.problems.append(str(e))
        report.shards += 1
        report.records += shard.num_records
        report.bytes += shard.num_bytes
    report.seconds = time.perf_counter() - t0
    if report.problems and raise_on_error:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise VerifyError(report.problems[0] + more)
    return report


def _verify_shard(info: DatasetInfo, fmt: ShardFormat, shard: ShardInfo) -> None:
    loc = info.shard_location(shard)
    path = loc.url
    data = _shard_bytes(loc, shard)
    if len(data) != shard.num_bytes:
        raise VerifyError(f"{path}: {len(data)} bytes, manifest says {shard.num_bytes}; the shard is truncated or "
                          "replaced, rerun the reshard")
    sha = hashlib.sha256()
    for at in range(0, len(data), 1 << 22):
        sha.update(data[at : at + (1 << 22)])
    if sha.hexdigest() != shard.sha256:
        raise VerifyError(f"{path}: SHA-256 differs from the manifest; the shard is corrupt, rerun the reshard")
    if loc.remote:
        buf = decompress(data, info.compression, path) if info.compression else data
    else:
        buf = read_decompressed(path, info.compression)
    lengths, offsets = fmt.verify(buf, info.columns, path=path)
    count = len(lengths)
    if count != shard.num_records:
        raise VerifyError(f"{path}: {count} records, manifest says {shard.num_records}")
    if int(lengths.sum()) != shard.num_tokens:
        raise VerifyError(f"{path}: {int(lengths.sum())} tokens, manifest says {shard.num_tokens}")
    _verify_index(info.index_location(shard), offsets, count)


def _shard_bytes(loc: Location, shard: ShardInfo) -> np.ndarray:
    """The shard's bytes: a memory map of a local file, the fetched object of a remote one."""
    try:
        if not loc.remote:
            if not os.path.getsize(loc.url):
                return np.empty(0, np.uint8)
            return np.memmap(loc.url, dtype=np.uint8, mode="r")
        return np.frombuffer(loc.read_bytes(), dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError):
        raise VerifyError(f"{loc.url}: shard listed in the manifest is missing; rerun the reshard") from None
    except OSError as e:
        raise VerifyError(f"{loc.url}: cannot read the shard ({e.strerror or e}); check the path and "
                          "--storage-option credentials") from None


def _verify_index(loc: Location, offsets: np.ndarray | None, count: int) -> None:
    path = loc.url
    try:
        data = loc.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise VerifyError(f"{path}: index file is missing; rerun the reshard") from None
    except OSError as e:
        raise VerifyError(f"{path}: cannot read the index file ({e.strerror or e})") from None
    try:
        table = np.loadtxt(io.BytesIO(data), dtype=np.int64, ndmin=2) if data.strip() else np.zeros((0, 2), np.int64)
    except ValueError:
        raise VerifyError(f"{path}: index file is not 'offset size' lines; rerun the reshard") from None
    if len(table) != count:
        raise VerifyError(f"{path}: index lists {len(table)} records, shard holds {count}")
    if offsets is not None and count:
        want = np.stack([offsets[:-1], np.diff(offsets)], axis=1)
        if not np.array_equal(table, want):
            i = int(np.flatnonzero((table != want).any(axis=1))[0])
            raise VerifyError(f"{path}: index line {i + 1} says {table[i].tolist()}, the shard has "
                              f"{want[i].tolist()}; rerun the reshard")
