"""What every shard format is: the ``ShardFormat`` interface, and the columns its readers give.

A format is one object (``dlpipe.formats.get_format(name)``, from the manifest's ``format``). Its
write side names the files and turns a batch of stripped records into bytes plus record offsets
(which the ``.index`` file records); its read side turns runs of records of a shard's
(decompressed) bytes, located by that index, back into ragged columns, and checks a whole shard
for ``dlpipe verify``. The reshard engine, ``ShardReader`` and ``verify`` ask a format object;
none of them tests a format's name.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import numpy as np

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.errors import ConfigError, FormatError

__all__ = ["Columns", "Ragged", "ShardFormat", "concat_columns", "shard_numbering"]

# One column of n records as read: flat values in the logical dtype, and n + 1 int64 row splits
# counted in elements (record i is values[splits[i]:splits[i + 1]]).
Ragged = tuple[np.ndarray, np.ndarray]
Columns = dict[str, Ragged]

_COMPRESSED_SUFFIX = {None: "", "gzip": ".gz", "zlib": ".zz"}


class ShardFormat(ABC):
    """A shard format. Objects are stateless; compare them by ``name``."""

    name: ClassVar[str]
    extension: ClassVar[str]  # suffix of an uncompressed shard file
    compressions: ClassVar[tuple[str | None, ...]]  # what may wrap the stream (None: nothing)
    auto_compression: ClassVar[str | None]  # what compression="auto" means
    trailer: ClassVar[bytes] = b""  # bytes that end a shard, after its last record
    # every record carries checksums, which decode(check_crc=True) verifies (a reader asks when it
    # has not matched the whole file's SHA-256: a byte range, or a file that differs)
    record_crcs: ClassVar[bool] = False
    # records are serialized messages a framework parses itself (tf.data): ``payloads`` and
    # ``decode_serialized`` work, and a window's records from several shards decode in one call
    supports_serialized: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<shard format {self.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardFormat) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # -- naming and compression

    def resolve_compression(self, compression: str | None) -> str | None:
        """``"auto"``: this format's ``auto_compression``; ``"none"``: None; else as given."""
        if compression == "auto":
            return self.auto_compression
        return None if compression == "none" else compression

    def check_compression(self, compression: str | None) -> None:
        """A ConfigError unless ``compression`` (already resolved) is one this format allows."""
        if compression not in self.compressions:
            valid = ", ".join("none" if c is None else c for c in self.compressions)
            raise ConfigError(f"compression={compression!r} is not valid for {self.name}; use one of {valid}")

    def suffix(self, compression: str | None) -> str:
        """The file suffix of a shard: ``.tfrecord.gz``, ``.tar`` ..."""
        self.check_compression(compression)
        return self.extension + _COMPRESSED_SUFFIX[compression]

    # -- writing

    @abstractmethod
    def encode_batch(self, batch: Mapping[str, ColumnBatch], encodings: Mapping[str, ColumnEncoding],
                     keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bytes of n records (ids ``keys``) back to back, and their n + 1 offsets (the .index)."""

    # -- reading

    @abstractmethod
    def decode(self, buf: np.ndarray, runs: Sequence[np.ndarray], encodings: Mapping[str, ColumnEncoding], *,
               path: str, check_crc: bool = False, stored: Sequence[str] | None = None) -> Columns:
        """The records of ``runs`` as ragged columns of ``encodings``, one run after another; each
        run is the n + 1 offsets in ``buf`` of consecutive records (from the shard's index).
        ``check_crc`` verifies each record's checksums where ``record_crcs``. ``stored`` names
        every column the shard holds, when ``encodings`` selects some. Errors name ``path`` and
        number records and offsets within the runs."""

    def payloads(self, buf: np.ndarray, frames: np.ndarray, *, path: str,
                 check_crc: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Start and end in ``buf`` of each serialized record of a run (``frames``: its n + 1
        offsets), checksums verified if asked; only where ``supports_serialized``."""
        raise self._not_serialized()

    def decode_serialized(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                          encodings: Mapping[str, ColumnEncoding], *, path: str,
                          frames: np.ndarray) -> Columns:
        """Serialized records ``buf[starts[i]:ends[i]]`` (already checked) as ragged columns;
        errors name ``path`` and offset ``frames[i]``. Only where ``supports_serialized``."""
        raise self._not_serialized()

    @abstractmethod
    def verify(self, buf: np.ndarray, columns: Mapping[str, ColumnEncoding], *,
               path: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Walk a whole (decompressed) shard without its index, checking every record against
        ``columns``: each record's token count, and the n + 1 record offsets where the walk finds
        them (None: the index can be checked by its length only)."""

    def _not_serialized(self) -> ConfigError:
        return ConfigError(f"{self.name} shards do not hold serialized records (tf.data reads TFRecord)")


def concat_columns(parts: Sequence[Columns], names: Iterable[str]) -> Columns:
    """Ragged columns ``names`` of consecutive record ranges as one."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in names:
        values = np.concatenate([p[name][0] for p in parts])
        splits = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            splits.append(p[name][1][1:] - p[name][1][0] + base)
            base = int(splits[-1][-1]) if len(splits[-1]) else base
        out[name] = (values, np.concatenate(splits))
    return out


@contextlib.contextmanager
def shard_numbering(ranges: Sequence[tuple[int, int]], base: int) -> Iterator[None]:
    """Re-raise a FormatError with its record and byte offset counted from the start of the
    shard: ``ShardFormat.decode`` numbers them within the runs it was given, one after another
    (``ranges``: the ``[start, stop)`` records of each run; ``base``: the shard offset of the
    buffer's first byte)."""
    try:
        yield
    except FormatError as e:
        if not base and (e.record is None or (len(ranges) == 1 and ranges[0][0] == 0)):
            raise
        record = None
        if e.record is not None:
            sizes = np.array([b - a for a, b in ranges])
            k = min(int(np.searchsorted(np.cumsum(sizes), e.record, side="right")), len(ranges) - 1)
            record = ranges[k][0] + e.record - int(sizes[:k].sum())
        offset = None if e.offset is None else e.offset + base
        raise type(e)(e.path, e.detail, offset=offset, record=record, hint=e.hint) from None
