"""``dlpipe.reshard``: scan, shard plan, shard writes on an executor, manifest last; and its summary."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dlpipe._units import format_bytes, parse_size
from dlpipe._version import __version__
from dlpipe.columns import column_stats
from dlpipe.defaults import MASK_COLUMN
from dlpipe.errors import ConfigError, OutputError
from dlpipe.formats import deflate, get_format
from dlpipe.manifest import build_manifest, record_cost
from dlpipe.padding import resolve_padding
from dlpipe.progress import Progress
from dlpipe.reshard.executors import LocalPool, RayExecutor, connect
from dlpipe.reshard.job import Job, init_worker
from dlpipe.reshard.output_dir import OutputDir
from dlpipe.reshard.plan import parse_splits, plan_shards, record_order, split_bounds
from dlpipe.reshard.scan import check_pad_values, choose_encodings, scan
from dlpipe.reshard.write import task_args, write_shard_task
from dlpipe.sources import open_source


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
    mask_column: str | None = MASK_COLUMN,
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
    shard_format = get_format(format)
    compression = shard_format.resolve_compression(compression)
    shard_format.check_compression(compression)
    if num_shards is not None and shard_size is not None:
        raise ConfigError("pass num_shards or shard_size, not both")
    shard_bytes = parse_size(shard_size, name="shard_size") if shard_size is not None else None
    if num_shards is None and shard_bytes is None:
        shard_bytes = 256 * 10**6
    if balance_by not in ("bytes", "tokens"):
        raise ConfigError(f"balance_by={balance_by!r}; use 'bytes' or 'tokens'")
    if engine not in ("local", "ray"):
        raise ConfigError(f"engine={engine!r}; use 'local' (processes on this machine) or 'ray'")
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
        workers = connect(ray_address)  # the cluster's CPUs decide how finely the scan is cut
    # the deflate implementation decides a compressed shard's bytes: chosen once, recorded in the
    # plan (a rerun with another install is a different plan), and checked in every worker
    codec = deflate.codec() if compression else None
    job = Job(source, spec, shard_format, compression, out, chunk_rows, workers, codec.identity() if codec else None)
    if engine == "ray":
        pool = RayExecutor(initializer=init_worker, initargs=(job,), address=ray_address)
    else:  # its helper processes start now, while this process takes the lock and scans
        pool = LocalPool(workers, initializer=init_worker, initargs=(job,))
    lock = None
    try:
        # one run per output: a second one is refused (OutputLockedError) before it scans
        lock = out.lock()
        found = scan(job, pool, show)
        lengths = found.lengths
        pad_value = check_pad_values(spec, found, source)
        encodings = choose_encodings(source, spec, out_names, found, int_encoding, pad_value)

        order = record_order(n, shuffle=shuffle, seed=seed)
        ordered_lengths = lengths if order is None else lengths[order]
        scale, offset = record_cost(encodings, balance_by)
        bounds = split_bounds(n, fractions)
        tasks = plan_shards(ordered_lengths, bounds, suffix=shard_format.suffix(compression),
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
        infos = dict(done)
        with Progress(n, "write", enabled=show) as bar:
            bar.update(sum(s.num_records for s in done.values()))
            args = [task_args(t, bounds, order, encodings, lengths, found.is_left) for t in todo]
            # a pool takes every task now, its last map (closed: helpers exit as they run out of tasks);
            # the manifest's parts are made while its workers write
            written = pool.map(write_shard_task, args)
            pool.close()
            source_info = {
                "kind": source.kind, "paths": source.origins or source.paths, "fingerprint": source.fingerprint(),
                "num_records": n, "num_bytes": source.num_bytes,
                "columns": {k: {"dtype": c.dtype.name, "shape": list(c.shape)} for k, c in source.columns.items()},
            }
            # the stats are order-free; percentiles of sorted lengths partition faster (same values)
            stats = column_stats(spec, encodings, np.sort(lengths, kind="stable"), pad_value)
            for task, info in zip(todo, written):
                infos[task.filename] = info
                bar.update(task.num_records)

        shard_infos = [infos[t.filename] for t in tasks]
        manifest = build_manifest(fmt=format, compression=compression, columns=encodings, shards=shard_infos,
                                  column_stats=stats,
                                  source=source_info, plan=plan, version=__version__)
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
        init_worker(None)  # this process ran tasks too: its installed job must not outlive the call
        if lock is not None:
            lock.release()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _summary(out: OutputDir, source, tasks, seconds, *, written, reused) -> ReshardSummary:
    sizes = out.location.file_sizes()
    out_bytes = sum(sizes.get(t.filename, 0) for t in tasks)
    return ReshardSummary(str(out), source.num_records, len(tasks), source.num_bytes, out_bytes, seconds,
                          shards_written=written, shards_reused=reused)
