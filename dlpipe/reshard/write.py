"""Shard writing: one task per shard of the shard plan, a pure function of the plan.

A task reads its records (a range, or record ids when shuffled) in chunks, strips and
left-aligns their padding, encodes them and writes the shard and its index through the output
directory, hashing the bytes as they go; the done note it leaves lets a rerun skip the shard.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator, Mapping

import numpy as np

from dlpipe._failpoints import failpoint
from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.errors import ConfigError, OutputError
from dlpipe.formats import deflate
from dlpipe.formats.compression import open_compressed_writer
from dlpipe.formats.index import index_lines
from dlpipe.formats.pieces import by_position, flat_rows
from dlpipe.manifest import ShardInfo
from dlpipe.padding import PaddingSpec, left_align
from dlpipe.reshard.job import Job, current_job
from dlpipe.reshard.plan import ShardTask


def task_args(task: ShardTask, bounds: Mapping[str, tuple[int, int]], order: np.ndarray | None,
              encodings: dict[str, ColumnEncoding], lengths: np.ndarray, is_left: np.ndarray | None) -> tuple:
    """What one write task needs: its records (a range, or ids when shuffled) and their lengths."""
    lo = bounds[task.split][0]
    if order is None:
        a, b = lo + task.start, lo + task.stop
        return task, (a, b), encodings, lengths[a:b], None if is_left is None else is_left[a:b]
    ids = order[lo + task.start : lo + task.stop]
    return task, ids, encodings, lengths[ids], None if is_left is None else is_left[ids]


def _batches(job: Job, rows) -> Iterator[tuple[slice, np.ndarray, dict[str, np.ndarray]]]:
    """(positions within the task, record ids, source columns) in chunks of the job's chunk size."""
    if isinstance(rows, tuple):
        start, stop = rows
        for a in range(start, stop, job.chunk_rows):
            b = min(stop, a + job.chunk_rows)
            yield slice(a - start, b - start), np.arange(a, b, dtype=np.int64), job.source.read(a, b)
    else:
        for a in range(0, len(rows), job.chunk_rows):
            ids = rows[a : a + job.chunk_rows]
            yield slice(a, a + len(ids)), ids, job.source.take(ids)


def to_batch(chunk, spec: PaddingSpec, encodings, lengths, is_left) -> dict[str, ColumnBatch]:
    """Stripped, left-aligned columns in their storage dtypes."""
    batch = {}
    for name, enc in encodings.items():
        data = chunk[name]
        storage = np.dtype(enc.storage_dtype)
        if enc.variable:
            # only the chunk's longest record matters: narrower blocks make every later pass cheaper
            longest = int(lengths.max()) if len(lengths) else 0
            data = left_align(by_position(data, spec.max_length), lengths, is_left)[:, :longest]
            batch[name] = ColumnBatch(flat_rows(data).astype(storage, copy=False), lengths * enc.inner)
        else:
            batch[name] = ColumnBatch(flat_rows(data).astype(storage, copy=False), None)
    return batch


ENCODE_BYTES = 2 << 20  # source bytes of the rows encoded at once


def _encode_rows(chunk: Mapping[str, np.ndarray]) -> int:
    """Rows of ``chunk`` to encode at once (a multiple of 64, at least 256)."""
    row_bytes = sum(data[:1].nbytes for data in chunk.values()) or 1
    return max(256, ENCODE_BYTES // row_bytes // 64 * 64)


class _HashingWriter:
    """A file wrapper that counts and hashes (sha256) every byte written through it."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


def _worker_codec(job: Job) -> deflate.Codec | None:
    """The driver's deflate codec, here; refused if this worker would write other bytes."""
    if not job.deflate:
        return None
    codec = deflate.codec(job.deflate["implementation"])
    if codec.identity() != job.deflate:
        raise ConfigError(f"this worker's {codec.name} deflate ({codec.identity()}) differs from the driver's "
                          f"({job.deflate}); install the same version everywhere, or set DLPIPE_DEFLATE=zlib")
    return codec


def write_shard_task(args) -> ShardInfo:
    """One write task (``task_args``' tuple): the shard and its index, then its done note."""
    task, rows, encodings, task_lengths, task_left = args
    job = current_job()
    try:
        tokens, offset = 0, 0
        with job.output.shard_files(task.filename) as (raw, index_file):
            hashed = _HashingWriter(raw)
            out = open_compressed_writer(hashed, job.compression, _worker_codec(job))
            for where, ids, chunk in _batches(job, rows):
                lengths = task_lengths[where].astype(np.int64)
                is_left = np.full(len(lengths), job.spec.side == "left") if task_left is None else task_left[where]
                # a chunk is read at once and encoded a few MB of rows at a time: the encoder's
                # temporaries then stay in cache and the allocator keeps reusing their memory
                # instead of returning it and faulting it in again
                step = _encode_rows(chunk)
                for a in range(0, len(ids), step):
                    part = slice(a, a + step)
                    sub = chunk if step >= len(ids) else {name: data[part] for name, data in chunk.items()}
                    batch = to_batch(sub, job.spec, encodings, lengths[part], is_left[part])
                    buf, offsets = job.fmt.encode_batch(batch, encodings, ids[part])
                    out.write(memoryview(buf))
                    index_file.write(index_lines(offsets, offset))
                    offset += len(buf)
                tokens += int(lengths.sum())
                failpoint("shard-partly-written", task.filename)
            out.write(job.fmt.trailer)
            if out is not hashed:
                out.close()
        info = ShardInfo(task.split, task.filename, task.filename + ".index", task.num_records,
                         tokens, hashed.size, hashed.sha.hexdigest())
        job.output.mark_done(info)
        return info
    except OSError as e:
        hint = "free some space or choose another --output, then rerun to resume" if e.errno == errno.ENOSPC \
            else "check the --output location, then rerun to resume"
        where = job.output.location.join(task.filename)
        raise OutputError(f"{where}: cannot write ({e.strerror or e}); {hint}") from None
