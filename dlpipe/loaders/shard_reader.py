"""``ShardReader``: record ranges of a dataset's shards as ragged columns, from local files or
object storage (``dlpipe.loaders.windows.read_windows`` reads a plan's windows with it).

Where the bytes come from:

- **local** (a path or ``file://``): an uncompressed shard is memory-mapped and only the
  requested records are touched; a compressed one is decompressed once and kept while it is
  read (one at a time). A shard's SHA-256 is checked once per process; it covers every byte the
  per-record CRCs would, which run only when it differs, to say which record is bad.
- **remote** (an fsspec URL such as ``s3://``): an uncompressed shard is read with one range
  request per run of records, located with its ``.index``; never the whole file. Windows this
  process reads back to back from one shard share a request of up to ``request_bytes`` (an
  object store answers each request after tens of ms and bills per request; 0 makes one
  request per window range). A range is not the whole file, so its records' CRCs are checked
  instead of the SHA-256 (unless the range happens to be the whole file). A compressed shard cannot be read from the middle: it is fetched
  whole (the next one while this one is read, if ``prefetch_bytes`` holds both), checked
  against its SHA-256 (CRCs if that differs), and decompressed one at a time.
- **cached** (a URL and ``cache_dir``): each shard is downloaded whole into the cache once,
  verified (``remote.fetch_to_cache``), and read as a local file from then on, by every epoch
  and process; its index is kept beside it.

Indexes of a remote dataset are fetched in the background, in the order reading needs them.

Over object storage ``read_windows`` fetches the next windows' bytes on background threads
while the caller decodes the current one, holding at most ``prefetch_bytes`` (the window being
decoded included); ``stats`` shows requests, bytes fetched and the peak held.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats import get_format
from dlpipe.formats.base import Columns, shard_numbering
from dlpipe.formats.compression import decompress, read_decompressed
from dlpipe.formats.index import index_bytes, parse_index, read_index
from dlpipe.loaders.remote import (
    CACHE_CHUNK,
    DEFAULT_PREFETCH_BYTES,
    DEFAULT_REQUEST_BYTES,
    READ_THREADS,
    ByteBudget,
    cached_path,
    fetch_to_cache,
    read_range,
    write_atomic,
)
from dlpipe.manifest import DatasetInfo, ShardInfo

MAPS_KEPT = 64  # memory-mapped shards a reader keeps open (one file descriptor each)
# SHA-256 of local files this process hashed, by (real path, size, mtime, inode)
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


class Fetch:
    """What one fetch gets of a shard: bytes ``[start, end)``, or the whole file (``end`` None),
    for ``ranges`` consecutive record ranges; ``nbytes`` is what it holds in memory."""

    __slots__ = ("end", "nbytes", "ranges", "shard", "start", "whole_file_ok")

    def __init__(self, shard: ShardInfo, start: int = 0, end: int | None = None, nbytes: int = 0) -> None:
        self.shard, self.start, self.end, self.nbytes, self.ranges = shard, start, end, nbytes, 1
        self.whole_file_ok = False  # a range that is the whole file and matched its SHA-256

    def __repr__(self) -> str:
        return f"Fetch({self.shard.path!r}, {self.start}, {self.end}, ranges={self.ranges})"


class ShardReader:
    """Reads records ``[start, stop)`` of a dataset's shards as ragged columns (logical dtypes);
    see the module docstring for where bytes come from. Picklable (loader workers)."""

    def __init__(self, info: DatasetInfo, columns: Sequence[str] | None = None, *, check_crc: bool = True,
                 cache_dir: str | os.PathLike[str] | None = None, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
                 request_bytes: int = DEFAULT_REQUEST_BYTES) -> None:
        self.info = info
        names = list(info.columns) if columns is None else list(columns)
        for name in names:
            if name not in info.columns:
                raise ConfigError(f"column {name!r} is not in the dataset; columns: {', '.join(info.columns)}")
        if not isinstance(prefetch_bytes, int) or prefetch_bytes < 1:
            raise ConfigError(f"prefetch_bytes={prefetch_bytes!r}; must be an int >= 1")
        if not isinstance(request_bytes, int) or request_bytes < 0:
            raise ConfigError(f"request_bytes={request_bytes!r}; must be an int >= 0 (0: one request per window)")
        self.encodings = {n: info.columns[n] for n in names}
        self.format = get_format(info.format)  # the one place the manifest's name is looked at
        self.check_crc = check_crc
        # a local dataset is read in place: a cache would only copy it
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None and info.remote else None
        self.request_bytes = request_bytes
        self.budget = ByteBudget(prefetch_bytes)
        self._index: dict[str, np.ndarray | Future] = {}  # a Future while it is being fetched
        self._index_pid = 0  # the process whose threads fetch the pending ones
        self._buf: tuple[str, np.ndarray] | None = None  # the one decompressed shard kept
        self._maps: dict[str, np.ndarray] = {}  # memory maps of local uncompressed shards, LRU
        self._intact: set[str] = set()  # shards whose SHA-256 matched the manifest in this process
        # a mixture's shards from several datasets (``loaders.mixture``): per shard path, the
        # encodings of these columns and of every column stored there
        self.layouts: dict[str, tuple[dict[str, ColumnEncoding], dict[str, ColumnEncoding]]] = {}

    def __getstate__(self):
        ready = {k: v for k, v in self._index.items() if isinstance(v, np.ndarray)}
        return {**self.__dict__, "_buf": None, "_maps": {}, "_index": ready}

    @property
    def uniform(self) -> bool:
        """Whether every shard stores its columns alike (serialized records of several shards
        then decode in one call, and tf.data parses them with one spec)."""
        return len({tuple(sorted(stored.items())) for _, stored in self.layouts.values()}) <= 1 and all(
            enc == self.encodings for enc, _ in self.layouts.values())

    @property
    def fetches(self) -> bool:
        """Whether reading fetches bytes over the network (then ``read_windows`` reads ahead)."""
        return self.info.remote

    @property
    def stats(self) -> dict[str, int]:
        """Network reads of this process so far and the most read-ahead bytes held at once."""
        b = self.budget
        return {"requests": b.requests, "bytes_fetched": b.bytes_fetched, "peak_buffered_bytes": b.peak,
                "prefetch_bytes": b.limit}

    def index(self, shard: ShardInfo) -> np.ndarray:
        got = self._index.get(shard.path)
        if got is None:
            got = self._index[shard.path] = self._load_index(shard)
        elif isinstance(got, Future):
            # a forked child (a DataLoader worker) has a copy of the future but not its thread
            mine = got.done() or self._index_pid == os.getpid()
            got = self._index[shard.path] = got.result() if mine else self._load_index(shard)
        return got

    def load_indexes(self, shards: Iterable[ShardInfo]) -> None:
        """Start fetching the indexes of ``shards`` (in that order) in the background, so that
        reading does not wait a request's latency at each new shard; ``index`` waits for them."""
        todo = [s for s in shards if s.path not in self._index]
        if not todo:
            return
        self._index_pid = os.getpid()
        pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dlpipe-index")
        for s in todo:
            self._index[s.path] = pool.submit(self._load_index, s)
        pool.shutdown(wait=False)

    def _load_index(self, shard: ShardInfo) -> np.ndarray:
        """The shard's index (its length checked against the manifest, so no record is skipped
        or invented); with a cache, from (or first into) the cache, beside the shard."""
        loc = self.info.index_location(shard)
        if self.cache_dir is None:
            return _counted(read_index(loc), shard, loc.url)
        path = cached_path(self.cache_dir, shard) + ".index"
        if os.path.isfile(path):
            return _counted(read_index(path), shard, path)
        data = index_bytes(loc)
        table = _counted(parse_index(data, loc.url), shard, loc.url)
        write_atomic(path, data)
        return table

    # -- planning and fetching (fetch runs on read-ahead threads)

    def plan(self, shards: Sequence[ShardInfo], ranges: Iterable[tuple[int, int, int]]) -> Iterator[Fetch]:
        """The fetches that cover ``ranges`` ((shard position, start, stop), in reading order),
        each serving the next ``.ranges`` of them."""
        current: Fetch | None = None
        for s, a, b in ranges:
            shard = shards[s]
            same = current is not None and current.shard.path == shard.path
            if self.info.remote and self.cache_dir is None and self.info.compression is None:
                lo, hi = self._span(shard, a, b)
                if same and current.end == lo and hi - current.start <= self.request_bytes:
                    current.end, current.nbytes = hi, hi - current.start
                    current.ranges += 1
                    continue
                unit = Fetch(shard, lo, hi, hi - lo)
            elif same:
                current.ranges += 1
                continue
            elif not self.info.remote:
                unit = Fetch(shard)  # memory-mapped or decompressed in place: nothing to fetch
            else:
                held = min(shard.num_bytes, CACHE_CHUNK) if self.cache_dir else shard.num_bytes
                unit = Fetch(shard, nbytes=held)
            if current is not None:
                yield current
            current = unit
        if current is not None:
            yield current

    def _span(self, shard: ShardInfo, start: int, stop: int) -> tuple[int, int]:
        table = self.index(shard)
        if stop <= start:
            return 0, 0
        return int(table[start, 0]), int(table[stop - 1, 0] + table[stop - 1, 1])

    def fetch(self, unit: Fetch) -> np.ndarray | str | None:
        """The bytes of ``unit``: an array (a range or a whole compressed shard), the path of the
        cached shard, or None for a local dataset (read in place)."""
        if not self.info.remote:
            return None
        loc = self.info.shard_location(unit.shard)
        if self.cache_dir is not None:
            return fetch_to_cache(loc, unit.shard, self.cache_dir, self.budget)
        if unit.end is not None and unit.end <= unit.start:
            return np.empty(0, np.uint8)
        data = read_range(loc, unit.start if unit.end is not None else None, unit.end)
        self.budget.fetched(len(data))
        whole = unit.end is None or (unit.start == 0 and unit.end == unit.shard.num_bytes)
        if whole and hashlib.sha256(data).hexdigest() == unit.shard.sha256:  # cheaper than CRCs
            if unit.end is None:
                self._intact.add(unit.shard.path)
            unit.whole_file_ok = True
        return np.frombuffer(data, dtype=np.uint8)

    def cache_shards(self, shards: Sequence[ShardInfo]) -> list[str]:
        """Local paths of ``shards``: the files themselves for a local dataset, else their cached
        copies, downloading the missing ones on a few threads."""
        if not self.info.remote:
            return [os.path.join(self.info.root, s.path) for s in shards]
        if self.cache_dir is None:
            raise ConfigError(f"{self.info.root} is remote; pass cache_dir to keep local copies of its shards")
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dlpipe-cache") as pool:
            return list(pool.map(lambda s: fetch_to_cache(self.info.shard_location(s), s, self.cache_dir,
                                                          self.budget), shards))

    def check_file(self, shard: ShardInfo, path: str) -> None:
        """Raise a FormatError naming ``path`` (and the bad record, where CRCs can tell) unless
        the local file is the shard the manifest describes; hashed once per process."""
        if not os.path.isfile(path):
            raise FormatError(path, "shard file is missing", hint="run dlpipe verify, or rerun dlpipe reshard")
        if self._verified(shard, path):
            return
        unit = Fetch(shard)
        self.decode(unit, path, [(0, shard.num_records)])  # CRCs locate the bad record
        raise FormatError(path, "differs from the SHA-256 in the manifest (every record's CRC matches)",
                          hint="run dlpipe verify; rerun dlpipe reshard if the shard or manifest was changed")

    # -- decoding (the caller's thread)

    def read(self, shard: ShardInfo, start: int, stop: int) -> Columns:
        """Records ``[start, stop)`` of ``shard``, fetched now (no read-ahead)."""
        unit = next(self.plan([shard], [(0, start, stop)]))
        data = None if self._holds(unit) else self.fetch(unit)
        return self.decode(unit, data, [(start, stop)])

    def _holds(self, unit: Fetch) -> bool:
        """Whether the whole remote shard ``unit`` wants is the one kept decompressed."""
        return (self.info.remote and self.cache_dir is None and unit.end is None and self._buf is not None
                and self._buf[0] == self.info.shard_location(unit.shard).url)

    def decode(self, unit: Fetch, data: Any, ranges: Sequence[tuple[int, int]]) -> Columns:
        """Records of ``ranges`` (``[start, stop)`` pairs of ``unit.shard``, in that order) from
        ``data`` (what ``fetch`` returned); the format decodes them together where it can (a
        TFRecord window of many small shuffle blocks costs about what one run of records does)."""
        buf, base, path, crc = self._bytes(unit, data)
        with shard_numbering(ranges, base):
            frames = [self._frames(unit.shard, a, b, buf, base, path) for a, b in ranges]
            encodings, stored = self.layouts.get(unit.shard.path, (self.encodings, self.info.columns))
            return self.format.decode(buf, frames, encodings, path=path, check_crc=crc, stored=tuple(stored))

    def payloads(self, unit: Fetch, data: Any, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(buffer, starts, ends) of the serialized records ``[start, stop)`` (CRCs checked as in
        ``decode``): what TFRecordDataset would yield, for tf.data over object storage."""
        buf, base, path, crc = self._bytes(unit, data)
        with shard_numbering([(start, stop)], base):
            frames = self._frames(unit.shard, start, stop, buf, base, path)
            starts, ends = self.format.payloads(buf, frames, path=path, check_crc=crc)
        return buf, starts, ends

    def serialized(self, unit: Fetch, data: Any, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The serialized records of ``ranges`` (as in ``decode``) as (bytes, starts, ends): each
        range's frames copied whole, back to back (a view, for one range), CRCs checked as in
        ``decode``."""
        if not self.format.supports_serialized:
            raise ConfigError(f"{self.info.root} holds {self.info.format!r} shards, not serialized Examples")
        buf, base, path, crc = self._bytes(unit, data)
        pieces, starts, ends, at = [], [], [], 0
        with shard_numbering(ranges, base):
            for a, b in ranges:
                frames = self._frames(unit.shard, a, b, buf, base, path)
                first, last = self.format.payloads(buf, frames, path=path, check_crc=crc)
                lo, hi = int(frames[0]), int(frames[-1])
                pieces.append(buf[lo:hi])
                starts.append(first - lo + at)
                ends.append(last - lo + at)
                at += hi - lo
        joined = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return joined, np.concatenate(starts), np.concatenate(ends)

    def _bytes(self, unit: Fetch, data: Any) -> tuple[np.ndarray, int, str, bool]:
        """(buffer, shard offset of its first byte, path or URL for errors, whether to check CRCs)."""
        shard, crcs = unit.shard, self.format.record_crcs and self.check_crc
        if not self.info.remote or self.cache_dir is not None:
            path = data if isinstance(data, str) else os.path.join(self.info.root, shard.path)
            crc = crcs and not self._verified(shard, path)
            if self.info.compression is None:  # memory maps cost little to keep: a shuffle's
                buf = self._maps.pop(path, None)  # windows visit many shards in turn
                if buf is None:
                    buf = np.asarray(read_decompressed(path, None))
                    if len(self._maps) >= MAPS_KEPT:
                        self._maps.pop(next(iter(self._maps)))
                self._maps[path] = buf
                return buf, 0, path, crc
            kept = self._buf
            if kept is None or kept[0] != path:
                kept = self._buf = (path, np.asarray(read_decompressed(path, self.info.compression)))
            return kept[1], 0, path, crc
        url = self.info.shard_location(shard).url
        if unit.end is not None:  # a range: CRCs stand in for the whole file's SHA-256
            return data, unit.start, url, crcs and not unit.whole_file_ok
        kept = self._buf
        if kept is None or kept[0] != url:  # a shard's later windows reuse its decompressed stream
            kept = self._buf = (url, decompress(data, self.info.compression, url) if self.info.compression else data)
        return kept[1], 0, url, crcs and shard.path not in self._intact

    def _frames(self, shard: ShardInfo, start: int, stop: int, buf: np.ndarray, base: int, path: str) -> np.ndarray:
        """Frame offsets of records ``[start, stop)`` in ``buf`` (from the index), n + 1 of them."""
        table = self.index(shard)[start:stop]
        if not len(table):
            return np.zeros(1, np.int64)
        frames = np.append(table[:, 0], table[-1, 0] + table[-1, 1]) - base
        if frames[-1] > len(buf):
            raise FormatError(path, f"shard is shorter ({base + len(buf)} bytes) than its index says",
                              offset=int(frames[-1]), hint="the shard is truncated; rerun dlpipe reshard")
        return frames

    def _verified(self, shard: ShardInfo, path: str) -> bool:
        """Whether the whole local file matches its manifest digest (checked once per process,
        and per file version: every reader in the process shares the answer)."""
        if shard.path not in self._intact:
            try:
                st = os.stat(path)
            except OSError as e:
                raise FormatError(path, f"cannot read the shard ({e.strerror or e})",
                                  hint="it is missing or unreadable; run dlpipe verify, or rerun dlpipe reshard") from None
            key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
            digest = _DIGESTS.get(key)
            if digest is None:
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                        else hashlib.sha256(f.read()).hexdigest()
                _DIGESTS[key] = digest
            if digest != shard.sha256:
                return False
            self._intact.add(shard.path)
        return True

    def decode_serialized(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, path: str,
                          frames: np.ndarray) -> Columns:
        """Serialized records ``buf[starts[i]:ends[i]]`` (from ``serialized``, already checked) as
        ragged columns; errors name ``path`` and ``frames[i]``."""
        return self.format.decode_serialized(buf, starts, ends, self.encodings, path=path, frames=frames)


def _counted(table: np.ndarray, shard: ShardInfo, where: str) -> np.ndarray:
    if len(table) != shard.num_records:
        raise FormatError(where, f"index lists {len(table)} records; the manifest says {shard.num_records}",
                          hint="the index or manifest was changed; rerun dlpipe reshard")
    return table
