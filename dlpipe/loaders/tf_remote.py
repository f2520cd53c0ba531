"""tf.data over object storage, without tensorflow-io.

TensorFlow's file ops open local paths; ``s3://`` needs the tensorflow-io plugin, a large
dependency pinned to TensorFlow's version. ``to_tf_dataset`` therefore reads a remote dataset
one of two ways, both leaving the rest of its graph (file shuffle, interleave, block shuffle,
one ``parse_example`` per batch) as it is for local files:

- **with** ``cache_dir``: the split's shards are fetched into the cache (verified against the
  manifest) when the dataset is built, and ``TFRecordDataset`` reads the local copies; from then
  on it is the local pipeline at local speed.
- **without**: each shard's ``TFRecordDataset(f).batch(64)`` becomes a ``from_generator`` over
  dlpipe's Python reader (``shard_chunks``): chunks of a multiple of 64 records, up to about
  ``request_bytes`` each, one range request each, fetched ahead within the reader's
  ``prefetch_bytes`` (shared by the files read at once), record CRCs checked. A chunk travels as
  (bytes, starts, lengths); one ``tf.strings.substr`` cuts it into its serialized records, shaped
  ``[k, 64]`` and unbatched into the same 64-record blocks TFRecordDataset gives, so a seeded
  pipeline yields the same batches as from local disk. Python runs once per chunk (thousands of
  records), never per record; records are parsed in the graph as usual. (Measured in
  ``bench/results/s3_loaders.md``: no slower than TFRecordDataset on local files.)

The generator path cannot be serialized (tf.data service, ``tf.distribute`` auto-sharding by
file: it shards by data instead) and holds the GIL while it slices chunks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dlpipe._deps import require
from dlpipe.loaders.remote import DEFAULT_REQUEST_BYTES, read_ahead
from dlpipe.loaders.shard_reader import ShardReader
from dlpipe.manifest import ShardInfo

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

_SPEC = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64))


def shard_chunks(reader: ShardReader, shard: ShardInfo, block: int) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
    """A shard's serialized records in order, as (chunk bytes, record starts, record lengths):
    chunks of a multiple of ``block`` records, the shard's last short block on its own."""
    n = shard.num_records
    if n == 0:
        return
    table = reader.index(shard)
    step = reader.request_bytes or DEFAULT_REQUEST_BYTES
    end = int(table[-1, 0] + table[-1, 1])
    cuts = (np.searchsorted(table[:, 0], np.arange(step, end, step), side="right") - 1) // block * block
    bounds = np.unique(np.concatenate([[0], cuts, [n // block * block, n]]))
    ranges = [(0, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    todo = iter(ranges)
    units = reader.plan([shard], ranges)
    with contextlib.closing(read_ahead(units, reader.fetch, lambda u: u.nbytes, reader.budget, threads=1)) as stream:
        for unit, data in stream:
            for _ in range(unit.ranges):
                _, a, b = next(todo)
                buf, starts, ends = reader.payloads(unit, data, a, b)
                lo = int(starts[0])
                yield np.asarray(buf[lo : int(ends[-1])]).tobytes(), starts - lo, ends - starts


def remote_blocks(reader: ShardReader, shards: Sequence[ShardInfo], block: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """``url -> Dataset`` of ``block``-record string vectors of that shard (what
    ``TFRecordDataset(path).batch(block)`` gives for a local file)."""
    by_url = {reader.info.shard_location(s).url: s for s in shards}
    reader.load_indexes(shards)

    def chunks(url: bytes) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
        # a reader per file: files are read on several threads, each keeps its own
        # decompressed shard; the prefetch budget and index cache stay shared
        yield from shard_chunks(copy.copy(reader), by_url[url.decode()], block)

    def blocks(chunk: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
        records = tf.strings.substr(chunk, starts, lengths)
        n = tf.size(records)
        return tf.reshape(records, [-1, tf.where(n % block == 0, block, n)])  # [chunk / block, block]

    def open_file(url: tf.Tensor) -> tf.data.Dataset:
        # unbatch of [k, block] rather than rebatch(block): rebatch's slices share the chunk's
        # buffer, and slicing them again downstream makes TensorFlow log an error per batch
        data = tf.data.Dataset.from_generator(chunks, args=(url,), output_signature=_SPEC)
        return data.map(blocks).unbatch()

    return open_file

