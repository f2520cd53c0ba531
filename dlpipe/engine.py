"""The reshard engine: scan the source, plan shards, write them on a process pool, manifest last.

1. **Scan** (in parallel, by record ranges): every record's real length, each integer column's
   value range (which picks its storage dtype) and what the padded regions hold.
2. **Plan**: split, optionally shuffle, and cut shards balanced by bytes or tokens.
3. **Write**: one task per shard. A shard is a pure function of the plan, so output is
   byte-identical for any worker count. Each shard goes to a hidden temporary name, is synced,
   and renamed (index first, data last) when complete; a note in ``.dlpipe/done`` records its
   stats. A rerun with the same plan skips finished shards, so a crash resumes where it stopped.
4. **Manifest**: ``dataset_info.json`` is written last; its presence means the dataset is whole.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

import dlpipe.shards as shard_formats
from dlpipe._failpoints import failpoint
from dlpipe._units import format_bytes, parse_size
from dlpipe.columns import ColumnBatch, ColumnEncoding, choose_encoding, varint_bytes_total
from dlpipe.errors import ConfigError, DlpipeError, OutputError, PaddingError
from dlpipe.formats import deflate
from dlpipe.formats.packing import flat_rows, steps, varint_size
from dlpipe.formats.tfrecord import index_lines, open_compressed_writer
from dlpipe.manifest import ShardInfo, build_manifest
from dlpipe.output_dir import OutputDir
from dlpipe.padding import (
    PaddingSpec,
    left_align,
    pad_values,
    record_lengths,
    resolve_padding,
)
from dlpipe.plan import ShardTask, parse_splits, plan_shards, record_order, split_bounds
from dlpipe.progress import Progress
from dlpipe.sources import Source, open_source

_EXAMPLE_OVERHEAD = 24  # rough bytes per record of framing and keys, for balancing only


@dataclass
class ReshardSummary:
    output: str
    num_records: int
    num_shards: int
    input_bytes: int
    output_bytes: int
    seconds: float
    shards_written: int
    shards_reused: int

    @property
    def records_per_s(self) -> float:
        return self.num_records / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else float("inf")

    def __str__(self) -> str:
        reused = f", {self.shards_reused} reused from an earlier run" if self.shards_reused else ""
        return (
            f"{self.num_records:,} records in {self.num_shards} shards{reused}: "
            f"{format_bytes(self.input_bytes)} -> {format_bytes(self.output_bytes)} "
            f"({self.ratio:.1f}x smaller), {self.seconds:.1f} s, {self.records_per_s:,.0f} records/s"
        )


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, sent once per worker process."""

    source: Source
    spec: PaddingSpec
    fmt: str
    compression: str | None
    output: OutputDir
    chunk_rows: int
    workers: int = 1
    deflate: dict | None = None  # the driver's codec identity (gzip/zlib): every worker must match it


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def reshard(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    format: str = "tfrecord",
    compression: str | None = "auto",
    num_shards: int | None = None,
    shard_size: int | str | None = None,
    num_shards_multiple_of: int = 1,
    balance_by: str = "bytes",
    workers: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    splits: Mapping[str, float] | str | None = None,
    pad_id: int | None = None,
    lengths_column: str | None = None,
    mask_column: str | None = "attention_mask",
    padding_side: str = "auto",
    sequence_columns: Sequence[str] | None = None,
    keep_mask: bool = False,
    int_encoding: str = "auto",
    layout: str | None = None,
    header_bytes: int = 0,
    source_compression: str | None = None,
    columns: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    storage_options: Mapping[str, object] | None = None,
) -> ReshardSummary:
    """Reshard padded fixed-length ``sources`` into variable-length shards under ``output``.

    See ``dlpipe reshard --help`` for every option; the CLI calls this with the same names.
    Returns a summary; raises a DlpipeError subclass on bad input or options, leaving no
    partial shard or manifest behind (finished shards of an interrupted run are kept so that a
    rerun resumes).

    ``engine="ray"`` runs the same tasks on a Ray cluster (``ray_address``, default: join the
    running one or start a local one); the output is byte-identical. Sources and ``output`` may
    be fsspec URLs; ``storage_options`` go to their filesystems.
    """
    t0 = time.perf_counter()
    out = OutputDir(output, storage_options)
    compression = shard_formats.resolve_compression(format, compression)
    shard_formats.check_format(format, compression)
    if num_shards is not None and shard_size is not None:
        raise ConfigError("pass num_shards or shard_size, not both")
    shard_bytes = parse_size(shard_size, name="shard_size") if shard_size is not None else None
    if num_shards is None and shard_bytes is None:
        shard_bytes = 256 * 10**6
    if balance_by not in ("bytes", "tokens"):
        raise ConfigError(f"balance_by={balance_by!r}; use 'bytes' or 'tokens'")
    if engine not in ("local", "ray"):
        raise ConfigError(f"engine={engine!r}; use 'local' (a process pool) or 'ray'")
    workers = os.cpu_count() or 1 if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers={workers}; must be >= 1")
    fractions = parse_splits(splits)
    if header_bytes < 0:
        raise ConfigError(f"header_bytes={header_bytes}; must be >= 0")

    source = open_source(sources, layout=layout, header_bytes=header_bytes, compression=source_compression,
                         columns=columns, storage_options=storage_options)
    spec = resolve_padding(
        source.columns, pad_id=pad_id, lengths_column=lengths_column, mask_column=mask_column,
        padding_side=padding_side, sequence_columns=sequence_columns, keep_mask=keep_mask,
        source_name=source.paths[0] if len(source.paths) == 1 else source.describe(),
    )
    if columns is not None:
        unknown = [c for c in columns if c not in source.columns]
        if unknown:
            raise ConfigError(f"columns {unknown} are not in the source; it has {', '.join(source.columns)}")
    out_names = [n for n in source.columns if n not in spec.dropped and (columns is None or n in columns)]
    if not out_names:
        raise ConfigError("no columns left to write after dropping the mask/lengths columns")
    row_bytes = sum(c.width * c.dtype.itemsize for c in source.columns.values()) or 1
    chunk_rows = int(max(256, min(65536, (8 << 20) // row_bytes)))
    show = sys.stderr.isatty() if progress is None else progress
    n = source.num_records

    if engine == "ray":  # joined only now, so a bad argument above leaves no Ray instance behind
        from dlpipe.ray_engine import RayExecutor, connect

        workers = connect(ray_address)  # the cluster's CPUs decide how finely the scan is cut
    # the deflate implementation decides a compressed shard's bytes: chosen once, recorded in the
    # plan (a rerun with another install is a different plan), and checked in every worker
    codec = deflate.codec() if compression else None
    job = _Job(source, spec, format, compression, out, chunk_rows, workers,
               codec.identity() if codec else None)
    pool = None
    if engine == "ray":
        pool = RayExecutor(initializer=_init_worker, initargs=(job,), address=ray_address)
    elif workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker, initargs=(job,))
    lock = None
    try:
        # one run per output: a second one is refused (OutputLockedError) before it scans
        lock = out.lock()
        (lengths, is_left), ranges, varints, pads = _scan(job, pool, show)
        pad_value = _check_pad_values(spec, pads, source)
        encodings = _encodings(source, spec, out_names, ranges, int_encoding, lengths, varints, pad_value)

        order = record_order(n, shuffle=shuffle, seed=seed)
        ordered_lengths = lengths if order is None else lengths[order]
        scale, offset = _record_cost(encodings, balance_by)
        bounds = split_bounds(n, fractions)
        tasks = plan_shards(ordered_lengths, bounds, suffix=shard_formats.suffix(format, compression),
                            num_shards=num_shards, shard_size=shard_bytes, multiple_of=num_shards_multiple_of,
                            scale=scale, offset=offset)
        del ordered_lengths
        plan = {
            "num_shards": len(tasks), "shuffle": shuffle, "seed": seed if shuffle else None,
            "splits": fractions, "balance_by": balance_by, "int_encoding": int_encoding,
            "padding": {k: v for k, v in asdict(spec).items() if k != "dropped"} | {"dropped": list(spec.dropped)},
            "shards": [[t.split, t.start, t.stop] for t in tasks],
            **({"deflate": job.deflate} if job.deflate else {}),
        }
        plan_hash = _hash({"plan": plan, "source": source.fingerprint(), "format": format,
                           "compression": compression, "columns": {k: e.to_json() for k, e in encodings.items()}})
        plan["hash"] = plan_hash
        done = out.prepare(plan_hash, overwrite)
        if done is None:  # already complete with the same plan
            return _summary(out, source, tasks, time.perf_counter() - t0, written=0, reused=len(tasks))

        todo = [t for t in tasks if t.filename not in done]
        stats = dict(done)
        with Progress(n, "write", enabled=show) as bar:
            bar.update(sum(s.num_records for s in done.values()))
            for task, info in zip(todo, _run(pool, job, _write_shard_task, [_task_args(t, bounds, order, encodings, lengths, is_left) for t in todo])):
                stats[task.filename] = info
                bar.update(task.num_records)

        shard_infos = [stats[t.filename] for t in tasks]
        column_stats = _column_stats(spec, encodings, lengths, pad_value)
        source_info = {
            "kind": source.kind, "paths": source.origins or source.paths, "fingerprint": source.fingerprint(),
            "num_records": n, "num_bytes": source.num_bytes,
            "columns": {k: {"dtype": c.dtype.name, "shape": list(c.shape)} for k, c in source.columns.items()},
        }
        from dlpipe._version import __version__

        manifest = build_manifest(fmt=format, compression=compression, columns=encodings, shards=shard_infos,
                                  column_stats=column_stats, source=source_info, plan=plan, version=__version__)
        try:
            out.commit(manifest)
        except OSError as e:
            raise OutputError(f"{out}: cannot write the manifest ({e.strerror or e}); rerun to finish") from None
        return _summary(out, source, tasks, time.perf_counter() - t0, written=len(todo), reused=len(done))
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        if lock is not None:  # refused: the temporaries are the running holder's
            out.remove_temporaries()
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if lock is not None:
            lock.release()


def _pool_context():
    """fork where the platform has it, as PyTorch's DataLoader does: workers start in
    milliseconds and need no ``__main__`` guard. Workers run only numpy and file I/O, so the
    threads of a framework imported by the parent do not matter to them. ``DLPIPE_START_METHOD``
    overrides it (spawn, forkserver)."""
    method = os.environ.get("DLPIPE_START_METHOD")
    if method is None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _run(pool, job: _Job, fn: Callable, args: list) -> Iterator:
    """Results of fn over args, in order: on the pool, or in this process when there is none."""
    if pool is None:
        _init_worker(job)
        return (fn(a) for a in args)
    return pool.map(fn, args)


# ---------------------------------------------------------------------------------------------
# scan


def _scan_range(bounds: tuple[int, int]) -> tuple[np.ndarray, dict, dict, dict]:
    job = _JOB
    start, stop = bounds
    chunk = job.source.read(start, stop)
    lengths, is_left = record_lengths(chunk, job.spec, path=job.source.paths[0], first_record=start)
    # Value ranges over whole rows, padding included: the storage dtype then also holds each
    # column's pad value, which readers need to re-pad batches.
    ranges = {
        name: (data.min().item(), data.max().item())
        for name, data in chunk.items()
        if data.dtype.kind in "iub" and data.size
    }
    # varint bytes of every integer value, padding included; the engine subtracts the padding
    varints = {name: varint_bytes_total(data) for name, data in chunk.items() if data.dtype.kind in "iu"}
    pads = pad_values(chunk, job.spec, lengths, is_left)
    # one length (and side, only when a mask can mix sides) per record goes back: keep them narrow
    narrow = lengths.astype(np.min_scalar_type(max(job.spec.max_length, 1)))
    side = is_left if job.spec.method == "mask" else None
    return (narrow, side), ranges, varints, {k: (start, v) for k, v in pads.items()}


def _scan(job: _Job, pool, show: bool) -> tuple[tuple[np.ndarray, np.ndarray], dict, dict, dict]:
    """Every record's length and padding side, value ranges, varint sizes and pad values."""
    n = job.source.num_records
    # enough parts that workers finish together, few enough that each is worth a task
    step = max(job.chunk_rows // 2, min(job.chunk_rows * 4, -(-n // (8 * job.workers)) if n else 1))
    parts = [(a, min(n, a + step)) for a in range(0, n, step)]
    lengths, lefts, ranges, varints, pads = [], [], {}, {}, {}
    with Progress(n, "scan", enabled=show) as bar:
        for (a, b), ((lens, left), rng, vb, pad) in zip(parts, _run(pool, job, _scan_range, parts)):
            lengths.append(lens)
            lefts.append(left)
            for name, v in vb.items():
                varints[name] = varints.get(name, 0) + v
            for name, r in rng.items():
                if r is None:
                    continue
                lo, hi = ranges.get(name, r)
                ranges[name] = (min(lo, r[0]), max(hi, r[1]))
            for name, v in pad.items():
                pads.setdefault(name, []).append(v)
            bar.update(b - a)
    width_type = np.min_scalar_type(max(job.spec.max_length, 1))
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, width_type)
    all_left = np.concatenate(lefts) if lefts and lefts[0] is not None else None
    return (all_lengths, all_left), ranges, varints, pads


def _encodings(source, spec, names, ranges, int_encoding, lengths, varints, pad_value) -> dict[str, ColumnEncoding]:
    out = {}
    n = source.num_records
    real_steps = int(lengths.sum(dtype=np.int64))
    for name in names:
        col = source.columns[name]
        variable = name in spec.sequence_columns
        shape = (None, *col.shape[1:]) if variable else col.shape
        inner = col.width // col.shape[0] if variable and col.shape[0] else max(col.width, 1)
        num_values = real_steps * inner if variable else n * col.width
        vb = varints.get(name)
        if vb is not None and variable:  # take the padding's varints back out
            pad = pad_value.get(name) or 0
            pad_size = 10 if pad < 0 else int(varint_size(np.array([pad]))[0])
            vb -= (n * spec.max_length - real_steps) * inner * pad_size
        lo, hi = ranges.get(name, (None, None))
        out[name] = choose_encoding(name, col.dtype, shape, lo, hi, int_encoding=int_encoding,
                                    num_values=num_values, varint_bytes=vb)
    return out


def _check_pad_values(spec: PaddingSpec, pads: dict, source: Source) -> dict:
    """Each sequence column's padded region must hold one constant; return it per column."""
    out = {spec.reference: spec.pad_id} if spec.method == "pad_id" else {}
    for name, parts in pads.items():
        seen = [(start, v) for start, v in parts if v]
        values = {v for _, v in seen}
        if not values:
            out[name] = spec.pad_id if name == spec.reference else None
            continue
        first = seen[0][1]
        bad = next(((s, v) for s, v in seen if v[0] != v[1] or v != first), None)
        if bad is not None:
            raise PaddingError(
                source.paths[0],
                f"column {name!r} holds differing values ({bad[1][0]}..{bad[1][1]}) where the lengths say "
                f"padding is, so it is not padded like {spec.reference or spec.mask_column or spec.lengths_column!r}",
                record=bad[0],
                hint=f"pass --sequence-columns without {name!r} to keep it fixed-length",
            )
        out[name] = first[0]
    return out


def _record_cost(encodings: dict[str, ColumnEncoding], balance_by: str) -> tuple[float, float]:
    """(scale, offset): a record of length L costs about ``L * scale + offset`` bytes (or tokens)."""
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


def _column_stats(spec, encodings, lengths, pad_value) -> dict[str, dict]:
    stats = {}
    if spec.method == "none" or len(lengths) == 0:
        return stats
    q = np.percentile(lengths, [50, 90, 99]).tolist()
    hist, edges = np.histogram(lengths, bins=min(16, max(1, spec.max_length)), range=(0, spec.max_length))
    length_stats = {
        "padded_length": spec.max_length, "min": int(lengths.min()), "max": int(lengths.max()),
        "mean": float(lengths.mean()), "p50": q[0], "p90": q[1], "p99": q[2],
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "padding_efficiency_of_source": float(lengths.mean() / spec.max_length) if spec.max_length else 1.0,
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        # every 5th percentile: loaders pick length-bucket boundaries from these
        "quantiles": np.percentile(lengths, np.arange(0, 101, 5), method="higher").astype(int).tolist(),
    }
    for name in spec.sequence_columns:
        if name in encodings:
            stats[name] = {"pad_value": pad_value.get(name), "lengths": length_stats}
    return stats


# ---------------------------------------------------------------------------------------------
# write


def _task_args(task: ShardTask, bounds, order, encodings, lengths, is_left):
    """What one write task needs: its records (a range, or ids when shuffled) and their lengths."""
    lo = bounds[task.split][0]
    if order is None:
        a, b = lo + task.start, lo + task.stop
        return task, (a, b), encodings, lengths[a:b], None if is_left is None else is_left[a:b]
    ids = order[lo + task.start : lo + task.stop]
    return task, ids, encodings, lengths[ids], None if is_left is None else is_left[ids]


def _batches(job: _Job, rows) -> Iterator[tuple[slice, np.ndarray, dict[str, np.ndarray]]]:
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
            data = left_align(steps(data, spec.max_length), lengths, is_left)[:, :longest]
            batch[name] = ColumnBatch(flat_rows(data).astype(storage, copy=False), lengths * enc.inner)
        else:
            batch[name] = ColumnBatch(flat_rows(data).astype(storage, copy=False), None)
    return batch


class _HashingWriter:
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


def _worker_codec(job: _Job) -> deflate.Codec | None:
    """The driver's deflate codec, here; refused if this worker would write other bytes."""
    if not job.deflate:
        return None
    codec = deflate.codec(job.deflate["implementation"])
    if codec.identity() != job.deflate:
        raise ConfigError(f"this worker's {codec.name} deflate ({codec.identity()}) differs from the driver's "
                          f"({job.deflate}); install the same version everywhere, or set DLPIPE_DEFLATE=zlib")
    return codec


def _write_shard_task(args) -> ShardInfo:
    task, rows, encodings, task_lengths, task_left = args
    job = _JOB
    try:
        tokens, offset = 0, 0
        with job.output.shard_files(task.filename) as (raw, index_file):
            hashed = _HashingWriter(raw)
            out = open_compressed_writer(hashed, job.compression, _worker_codec(job))
            for where, ids, chunk in _batches(job, rows):
                lengths = task_lengths[where].astype(np.int64)
                is_left = np.full(len(lengths), job.spec.side == "left") if task_left is None else task_left[where]
                batch = to_batch(chunk, job.spec, encodings, lengths, is_left)
                buf, offsets = shard_formats.encode_batch(job.fmt, batch, encodings, ids)
                out.write(memoryview(buf))
                index_file.write(index_lines(offsets, offset))
                offset += len(buf)
                tokens += int(lengths.sum())
                failpoint("shard-partly-written", task.filename)
            out.write(shard_formats.trailer(job.fmt))
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


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _summary(out: OutputDir, source, tasks, seconds, *, written, reused) -> ReshardSummary:
    sizes = out.location.file_sizes()
    out_bytes = sum(sizes.get(t.filename, 0) for t in tasks)
    return ReshardSummary(str(out), source.num_records, len(tasks), source.num_bytes, out_bytes, seconds,
                          shards_written=written, shards_reused=reused)


__all__ = ["ReshardSummary", "reshard", "DlpipeError"]
