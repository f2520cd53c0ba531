"""Reshard benchmark: dlpipe against the per-record loops people write, on one corpus.

Every contender turns the same padded DeepCAL-like corpus (``corpus.py``: int64 [N,128]
code points + float32 [N,2] labels) into variable-length shards:

- ``tf-loop``  one ``tf.train.Example`` per record, ``tf.io.TFRecordWriter``, one file
- ``wds-loop`` one sample per record, ``webdataset.ShardWriter``, 8 shards
- ``dlpipe``   ``dlpipe.reshard`` to TFRecord (1 and 2 workers) and WebDataset (2 workers,
  plain and gzip; gzip with the fastest deflate installed, ISA-L, and with plain zlib as
  without it: ``DLPIPE_DEFLATE=zlib``), 8 shards

Each run is timed ``--repeat`` times (wall clock around the call, page cache warm) after one
untimed warm-up run (the whole run for dlpipe; the first ``WARMUP_PEER_RECORDS`` records for the
Python loops, whose cost is per record), and reported as median (min-max); the dlpipe configs
take turns (as do the two loops), so their ratios compare runs made under the same conditions. The warm-up faults in
the heap and the code paths a first run pays for once: a fresh VM can fault new memory slowly. Results go to ``bench/results/reshard.json`` and a markdown
rendering of it, ``reshard.md`` (``--render-only`` rebuilds the markdown from the json).

    python bench/reshard_bench.py [--records 200000] [--repeat 3]

This is a benchmark, not a test: targets are reported PASS/FAIL, the exit code is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cpu_load import cpu_scaling_ceiling, machine_busy_seconds, own_cpu_seconds
from reshard_report import compute_ratios, format_bytes, judge_targets, render_markdown
from results_io import dlpipe_checkout, record

from dlpipe.benchmark.corpus import PAD_ID, build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"

# --- the contenders -------------------------------------------------------------------------


def _load(corpus_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    ids = np.load(corpus_dir / "input_ids.npy", mmap_mode="r")
    labels = np.load(corpus_dir / "labels.npy", mmap_mode="r")
    return ids, labels


def tf_loop(corpus_dir: Path, out_dir: Path, limit: int) -> int:
    """The baseline people write: one tf.train.Example per record, one TFRecord file."""
    import tensorflow as tf

    ids, labels = _load(corpus_dir)
    with tf.io.TFRecordWriter(str(out_dir / "data.tfrecord")) as writer:
        for i in range(limit):
            row = ids[i]
            row = row[: np.count_nonzero(row != PAD_ID)]
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=row)),
                        "labels": tf.train.Feature(float_list=tf.train.FloatList(value=labels[i])),
                    }
                )
            )
            writer.write(example.SerializeToString())
    return limit


def wds_loop(corpus_dir: Path, out_dir: Path, limit: int, num_shards: int) -> int:
    """One webdataset sample per record (.npy members), ``num_shards`` tar shards."""
    import webdataset as wds

    ids, labels = _load(corpus_dir)
    per_shard = math.ceil(len(ids) / num_shards)
    pattern = str(out_dir / "shard-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as writer:
        for i in range(limit):
            row = ids[i]
            writer.write(
                {
                    "__key__": f"{i:09d}",
                    "input_ids.npy": np.array(row[: np.count_nonzero(row != PAD_ID)]),
                    "labels.npy": np.array(labels[i]),
                }
            )
    return limit


WARMUP_PEER_RECORDS = 5_000


def import_peers() -> None:
    """Import TensorFlow and webdataset (seconds) and open one writer, outside the timings."""
    import tensorflow as tf
    import webdataset  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp, tf.io.TFRecordWriter(f"{tmp}/warmup.tfrecord") as w:
        w.write(b"")


def dlpipe_reshard(corpus_dir: Path, out_dir: Path, num_shards: int, **options: Any) -> Any:
    """``dlpipe.reshard`` on the two .npy columns; returns its summary."""
    from dlpipe import reshard

    return reshard(
        [f"input_ids={corpus_dir / 'input_ids.npy'}", f"labels={corpus_dir / 'labels.npy'}"],
        str(out_dir),
        num_shards=num_shards,
        pad_id=PAD_ID,
        overwrite=True,
        progress=False,
        **options,
    )


def dlpipe_available() -> str | None:
    """None when ``from dlpipe import reshard`` works, else why not."""
    try:
        from dlpipe import reshard  # noqa: F401
    except Exception as exc:  # any import-time failure means: not ready yet
        hint = "; from a checkout: pip install -e . (or PYTHONPATH=.)"
        return f"{type(exc).__name__}: {exc}{hint}"
    return None


# --- measuring ------------------------------------------------------------------------------


SIDE_FILE_SUFFIXES = (".index", ".idx", ".json")


def dir_size(path: Path) -> tuple[int, int, int]:
    """(shard bytes, side-file bytes, number of files) under ``path``.

    Side files are indexes and metadata (``*.index``, ``*.json``) that a reader may skip;
    shard bytes are the records themselves, which is what the size targets compare.
    """
    files = [p for p in path.rglob("*") if p.is_file()]
    side = sum(p.stat().st_size for p in files if p.name.endswith(SIDE_FILE_SUFFIXES))
    total = sum(p.stat().st_size for p in files)
    return total - side, side, len(files)


def warm_page_cache(paths: list[Path]) -> None:
    """Read the inputs once so every contender starts with them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def timed_run(work: Callable[[Path], Any], out_dir: Path) -> tuple[float, float, float, Any]:
    """``work(out_dir)`` once in a fresh directory: (seconds, own CPU-s, others' CPU-s, summary)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    own0, busy0, t0 = own_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    summary = work(out_dir)
    seconds = time.perf_counter() - t0
    cpu = own_cpu_seconds() - own0
    return seconds, cpu, max(0.0, machine_busy_seconds() - busy0 - cpu), summary


def timed_runs(
    contenders: list[tuple[str, Callable[[Path], Any], Callable[[Path], Any] | None, Path]],
    repeat: int,
) -> dict[str, tuple[list[tuple[float, float, float]], Any]]:
    """Each contender (name, work, warm-up or None for ``work``, out_dir) warmed up once, untimed,
    then timed ``repeat`` times, the contenders taking turns: a ratio of two of them then
    compares runs made under the same conditions, however the machine drifts meanwhile.
    Returns name: ([(seconds, own CPU-s, others' CPU-s)], last summary)."""
    for _, work, warmup, out_dir in contenders:
        timed_run(warmup or work, out_dir)
    runs: dict[str, tuple[list, Any]] = {name: ([], None) for name, *_ in contenders}
    for r in range(repeat):
        for name, work, _, out_dir in contenders:
            seconds, cpu, others, summary = timed_run(work, out_dir)
            runs[name] = (runs[name][0] + [(seconds, cpu, others)], summary)
            print(
                f"  {name} #{r + 1}: {seconds:.3f} s, {cpu:.2f} CPU-s"
                f" (other processes: {others:.2f} CPU-s)",
                flush=True,
            )
    return runs


def result_row(
    name: str,
    samples: list[tuple[float, float, float]],
    summary: Any,
    *,
    out_dir: Path,
    num_records: int,
    timed_records: int,
    info: dict[str, Any],
) -> dict[str, Any]:
    """One result row from a contender's timed runs and the output its last run left."""
    seconds = [s for s, _, _ in samples]
    cpu = [c for _, c, _ in samples]
    others = [o for _, _, o in samples]
    shard_bytes, side_bytes, files = dir_size(out_dir)
    bytes_per_record = shard_bytes / timed_records
    med = statistics.median(seconds)
    row: dict[str, Any] = {
        "name": name,
        **info,
        "num_records": num_records,
        "timed_records": timed_records,
        "extrapolated": timed_records < num_records,
        "seconds": [round(s, 4) for s in seconds],
        "seconds_median": round(med, 4),
        # CPU seconds of this process + its workers, and of everything else on the machine,
        # per repeat: cpu/seconds near the worker count means the workers really ran in
        # parallel; large "other" means something else competed for the cores.
        "cpu_seconds": [round(c, 3) for c in cpu],
        "other_processes_cpu_seconds": [round(o, 3) for o in others],
        "records_per_s": timed_records / med,
        "records_per_s_min": timed_records / max(seconds),
        "records_per_s_max": timed_records / min(seconds),
        "output_files": files,
        "bytes_per_record": bytes_per_record,
        "output_bytes": round(bytes_per_record * num_records),
        "side_file_bytes": round(side_bytes * num_records / timed_records),
        "seconds_full_corpus": med * num_records / timed_records,
    }
    if summary is not None and hasattr(summary, "records_per_s"):
        row["dlpipe_summary"] = {
            key: getattr(summary, key, None)
            for key in ("num_records", "input_bytes", "output_bytes", "seconds", "records_per_s")
        }
    return row


def count_tfrecords(out_dir: Path) -> int:
    """Records in every TFRecord shard under ``out_dir``, read back with tf.data."""
    import tensorflow as tf

    files = sorted(
        str(p)
        for p in out_dir.rglob("*.tfrecord*")
        if p.is_file() and not p.name.endswith(SIDE_FILE_SUFFIXES)
    )
    kind = "GZIP" if files and files[0].endswith(".gz") else ""
    return int(tf.data.TFRecordDataset(files, compression_type=kind).reduce(0, lambda n, _: n + 1))


# --- main -----------------------------------------------------------------------------------


def dlpipe_configs() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """The dlpipe runs (name, reshard options, environment): TFRecord 1 and 2 workers (default
    encoding, and TF-native int64_list), WebDataset with dlpipe's default compression,
    uncompressed, gzip, and gzip with plain zlib's deflate (as without isal installed)."""
    return [
        ("dlpipe-tfrecord-w1", {"format": "tfrecord", "workers": 1}, {}),
        ("dlpipe-tfrecord-w2", {"format": "tfrecord", "workers": 2}, {}),
        (
            "dlpipe-tfrecord-int64list-w2",
            {"format": "tfrecord", "workers": 2, "int_encoding": "int64_list"},
            {},
        ),
        ("dlpipe-webdataset-w2", {"format": "webdataset", "workers": 2}, {}),
        (
            "dlpipe-webdataset-plain-w2",
            {"format": "webdataset", "workers": 2, "compression": "none"},
            {},
        ),
        (
            "dlpipe-webdataset-gzip-w2",
            {"format": "webdataset", "workers": 2, "compression": "gzip"},
            {},
        ),
        (
            "dlpipe-webdataset-zlib-w2",
            {"format": "webdataset", "workers": 2, "compression": "gzip"},
            {"DLPIPE_DEFLATE": "zlib"},
        ),
    ]


def deflate_identity(env: dict[str, str]) -> dict[str, Any] | None:
    """The deflate implementation dlpipe writes gzip/zlib with under ``env`` (None: a dlpipe
    too old to say)."""
    try:
        from dlpipe.formats.deflate import codec
    except ImportError:
        return None
    with environment(env):
        return codec().identity()


def detect_compression(out_dir: Path) -> str:
    """The compression the shards under ``out_dir`` were written with, from their names."""
    names = [
        p.name
        for p in out_dir.rglob("*")
        if p.is_file() and not p.name.endswith(SIDE_FILE_SUFFIXES)
    ]
    for suffix, kind in ((".gz", "gzip"), (".zst", "zstd"), (".zz", "zlib")):
        if any(name.endswith(suffix) for name in names):
            return kind
    return "none"


def run_dlpipe(corpus_dir: Path, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every dlpipe config, the configs taking turns; outputs are kept under ``out`` for
    the read-back check.

    Runs before TensorFlow is imported: with TF loaded dlpipe starts its workers with
    forkserver instead of fork, which is slower to start; a user's plain script gets fork.
    """
    configs = dlpipe_configs()

    def work(options: dict[str, Any], env: dict[str, str]) -> Callable[[Path], Any]:
        def run(d: Path) -> Any:
            with environment(env):
                return dlpipe_reshard(corpus_dir, d, args.num_shards, **options)

        return run

    timed = timed_runs([(name, work(o, e), None, out / name) for name, o, e in configs], args.repeat)
    runs = []
    seen: dict[tuple[str, str, str], str] = {}
    for name, options, env in configs:
        row = result_row(
            name,
            *timed[name],
            out_dir=out / name,
            timed_records=args.records,
            num_records=args.records,
            info={"tool": "dlpipe.reshard", **options, **({"env": env} if env else {})},
        )
        row["compression"] = detect_compression(out / name)
        if row["compression"] != "none":
            row["deflate"] = deflate_identity(env)
        key = (options["format"], row["compression"], repr(sorted(env.items())))
        if "compression" in options and key in seen:
            print(f"  ({name} is the same as {seen[key]}, dlpipe's default; dropped)", flush=True)
            continue
        seen.setdefault(key, name)
        runs.append(row)
    return runs


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """``env`` set in os.environ (inherited by dlpipe's workers) for the duration."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_peers(corpus_dir: Path, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time the two per-record Python loops (on the first ``--peer-records`` if given)."""
    import_peers()
    peer_n = min(args.peer_records or args.records, args.records)
    warm_n = min(WARMUP_PEER_RECORDS, peer_n)
    peers = [
        ("tf-loop", lambda d, k: tf_loop(corpus_dir, d, k),
         {"tool": "tf.io.TFRecordWriter", "format": "tfrecord"}),
        ("wds-loop", lambda d, k: wds_loop(corpus_dir, d, k, args.num_shards),
         {"tool": "webdataset.ShardWriter", "format": "webdataset"}),
    ]
    timed = timed_runs(
        [(name, lambda d, f=f: f(d, peer_n), lambda d, f=f: f(d, warm_n), out / name) for name, f, _ in peers],
        args.repeat,
    )
    return [
        result_row(name, *timed[name], out_dir=out / name, num_records=args.records, timed_records=peer_n,
                   info={**info, "workers": 1, "compression": "none"})
        for name, _, info in peers
    ]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, args.seed)
    how = "reused" if corpus["reused"] else "built"
    print(
        f"corpus: {corpus['num_records']:,} records, {format_bytes(corpus['bytes'])}, {how} in {corpus_dir}",
        flush=True,
    )
    warm_page_cache([corpus_dir / "input_ids.npy", corpus_dir / "labels.npy"])
    out = args.cache_dir / "reshard-out"
    load_before = os.getloadavg()
    ceiling = cpu_scaling_ceiling(2)
    print(f"machine: 2 processes give {ceiling:.2f}x one process on a CPU-bound task", flush=True)

    runs: list[dict[str, Any]] = []
    skipped = None
    why_not = dlpipe_available()
    if why_not is not None:
        skipped = f"dlpipe runs (from dlpipe import reshard failed: {why_not})"
        print(f"skipping dlpipe: {why_not}", flush=True)
    else:
        runs += run_dlpipe(corpus_dir, out, args)
    if not args.skip_peers:
        runs[:0] = run_peers(corpus_dir, out, args)
    if args.verify:
        for run in runs:
            if run["tool"] == "dlpipe.reshard" and run["format"] == "tfrecord":
                run["records_read_back"] = count_tfrecords(out / run["name"])
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)

    ratios = compute_ratios(runs, corpus)
    return {
        "benchmark": "reshard",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": describe(["webdataset"]),
        "dlpipe_measured": dlpipe_checkout(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_scaling_ceiling_2_workers": ceiling,
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {
            "repeat": args.repeat,
            "num_shards": args.num_shards,
            "peer_records": min(args.peer_records or args.records, args.records),
            "warmup_peer_records": min(WARMUP_PEER_RECORDS, args.peer_records or args.records, args.records),
        },
        "runs": runs,
        "skipped": skipped,
        "ratios": ratios,
        "targets": judge_targets(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="corpus size N (default 200k)")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender")
    parser.add_argument("--num-shards", type=int, default=8, help="shards per output")
    parser.add_argument(
        "--peer-records",
        type=int,
        default=None,
        help="time the Python loops on the first K records only and extrapolate",
    )
    parser.add_argument("--skip-peers", action="store_true", help="run only dlpipe")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reading dlpipe's TFRecord output back with tf.data",
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the shards written")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpus and scratch outputs"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=DEFAULT_RESULTS, help="where reshard.json/.md go"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="rebuild reshard.md from reshard.json"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    return record(args.results_dir, "reshard", lambda: run_all(args), render_markdown, render_only=args.render_only)


if __name__ == "__main__":
    raise SystemExit(main())
