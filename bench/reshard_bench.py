"""Reshard benchmark: dlpipe against the per-record loops people write, on one corpus.

Every contender turns the same padded DeepCAL-like corpus (``corpus.py``: int64 [N,128]
code points + float32 [N,2] labels) into variable-length shards:

- ``tf-loop``  one ``tf.train.Example`` per record, ``tf.io.TFRecordWriter``, one file
- ``wds-loop`` one sample per record, ``webdataset.ShardWriter``, 8 shards
- ``dlpipe``   ``dlpipe.reshard`` to TFRecord (1 and 2 workers) and WebDataset (2 workers,
  plain and gzip), 8 shards

Each run is timed ``--repeat`` times (wall clock around the call, page cache warm) and
reported as median (min-max). Results go to ``bench/results/reshard.json`` and a markdown
rendering of it, ``reshard.md`` (``--render-only`` rebuilds the markdown from the json).

    python bench/reshard_bench.py [--records 200000] [--repeat 3]

This is a benchmark, not a test: targets are reported PASS/FAIL, the exit code is 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from corpus import PAD_ID, build_corpus

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"

# (name, description, ratio key, comparison, threshold)
TARGETS: list[tuple[str, str, str, str, float]] = [
    (
        "speed vs TF loop",
        "dlpipe TFRecord (1 worker) records/s / TF loop records/s",
        "speedup_tfrecord_w1_vs_tf_loop",
        ">=",
        10.0,
    ),
    (
        "2-worker scaling",
        "dlpipe TFRecord 2 workers / 1 worker records/s",
        "scaling_tfrecord_w2_vs_w1",
        ">=",
        1.7,
    ),
    (
        "size vs TF loop",
        "dlpipe TFRecord bytes/record / TF loop bytes/record",
        "size_tfrecord_vs_tf_loop",
        "<=",
        1.0,
    ),
    (
        "shrink vs padded",
        "padded source bytes / dlpipe TFRecord bytes",
        "shrink_source_vs_tfrecord",
        ">=",
        10.0,
    ),
    (
        "WebDataset overhead",
        "dlpipe WebDataset bytes / dlpipe TFRecord bytes",
        "size_webdataset_vs_tfrecord",
        "<=",
        2.0,
    ),
]


# --- machine -------------------------------------------------------------------------------


def _version(dist: str, *alternatives: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (dist, *alternatives):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _dlpipe_origin() -> dict[str, str | None]:
    """Which dlpipe gets benchmarked: its version and where it was imported from."""
    try:
        import dlpipe
    except ImportError:
        return {"dlpipe": None, "dlpipe_path": None}
    version = _version("dlpipe") or getattr(dlpipe, "__version__", None)
    return {"dlpipe": version, "dlpipe_path": str(Path(dlpipe.__path__[0]))}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": _version("tensorflow-cpu", "tensorflow"),
        "webdataset": _version("webdataset"),
        **_dlpipe_origin(),
        "git_commit": _git_commit(),
    }


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


def dir_size(path: Path) -> tuple[int, int]:
    """(total bytes, number of files) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def warm_page_cache(paths: list[Path]) -> None:
    """Read the inputs once so every contender starts with them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def timed_runs(
    name: str,
    work: Callable[[Path], Any],
    *,
    out_dir: Path,
    repeat: int,
    num_records: int,
    timed_records: int,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Run ``work(out_dir)`` ``repeat`` times in a fresh directory; one result row."""
    seconds: list[float] = []
    summary = None
    for r in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        summary = work(out_dir)
        seconds.append(time.perf_counter() - t0)
        print(f"  {name} #{r + 1}: {seconds[-1]:.3f} s", flush=True)
    measured_bytes, files = dir_size(out_dir)
    bytes_per_record = measured_bytes / timed_records
    med = statistics.median(seconds)
    row: dict[str, Any] = {
        "name": name,
        **info,
        "num_records": num_records,
        "timed_records": timed_records,
        "extrapolated": timed_records < num_records,
        "seconds": [round(s, 4) for s in seconds],
        "seconds_median": round(med, 4),
        "records_per_s": timed_records / med,
        "records_per_s_min": timed_records / max(seconds),
        "records_per_s_max": timed_records / min(seconds),
        "output_files": files,
        "bytes_per_record": bytes_per_record,
        "output_bytes": round(bytes_per_record * num_records),
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

    files = sorted(str(p) for p in out_dir.rglob("*.tfrecord*") if p.is_file())
    kind = "GZIP" if files and files[0].endswith(".gz") else ""
    return int(tf.data.TFRecordDataset(files, compression_type=kind).reduce(0, lambda n, _: n + 1))


# --- ratios and report ----------------------------------------------------------------------


def compute_ratios(runs: list[dict[str, Any]], corpus: dict[str, Any]) -> dict[str, float | None]:
    """The headline ratios; None where a run needed for one is missing."""
    by = {run["name"]: run for run in runs}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def get(name: str, key: str) -> float | None:
        return by[name][key] if name in by else None

    return {
        "speedup_tfrecord_w1_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-w1", "records_per_s"), get("tf-loop", "records_per_s")
        ),
        "speedup_tfrecord_w2_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-w2", "records_per_s"), get("tf-loop", "records_per_s")
        ),
        "speedup_webdataset_w2_vs_wds_loop": ratio(
            get("dlpipe-webdataset-w2", "records_per_s"), get("wds-loop", "records_per_s")
        ),
        "scaling_tfrecord_w2_vs_w1": ratio(
            get("dlpipe-tfrecord-w2", "records_per_s"), get("dlpipe-tfrecord-w1", "records_per_s")
        ),
        "size_tfrecord_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-w2", "bytes_per_record"), get("tf-loop", "bytes_per_record")
        ),
        "shrink_source_vs_tfrecord": ratio(
            corpus["bytes"], get("dlpipe-tfrecord-w2", "output_bytes")
        ),
        "size_webdataset_vs_tfrecord": ratio(
            get("dlpipe-webdataset-w2", "output_bytes"), get("dlpipe-tfrecord-w2", "output_bytes")
        ),
        "size_webdataset_gzip_vs_tfrecord": ratio(
            get("dlpipe-webdataset-gzip-w2", "output_bytes"),
            get("dlpipe-tfrecord-w2", "output_bytes"),
        ),
    }


def judge_targets(ratios: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row per target: value, threshold, PASS/FAIL (or n/a when not measured)."""
    rows = []
    for name, description, key, op, threshold in TARGETS:
        value = ratios.get(key)
        if value is None:
            verdict = "n/a"
        else:
            ok = value >= threshold if op == ">=" else value <= threshold
            verdict = "PASS" if ok else "FAIL"
        rows.append(
            {
                "name": name,
                "description": description,
                "ratio": key,
                "value": value,
                "target": f"{op} {threshold:g}",
                "verdict": verdict,
            }
        )
    return rows


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one ``reshard.json``."""
    m, c = result["machine"], result["corpus"]
    lines = [
        "# Reshard benchmark",
        "",
        f"{result['created']} · {m['cpu_model']} · {m['cpus_usable']} usable CPUs ({m['cpu_count']} total) · "
        f"{m['memory_gib']} GiB · Python {m['python']} · numpy {m['numpy']} · TF {m['tensorflow']} · "
        f"webdataset {m['webdataset']} · dlpipe {m['dlpipe']}",
        "",
        f"Corpus: {c['num_records']:,} records ({c['source']}), {c['encoding']}; mean length "
        f"{c['mean_length']:.1f}, max {c['max_length']}, {c['truncated_records']} truncated; "
        f"input {_bytes(c['bytes'])} (`input_ids.npy` + `labels.npy`).",
        "",
        f"Each run {result['settings']['repeat']}x, wall clock, median (min–max).",
        "",
        "| run | records/s | seconds | bytes/record | output | input/output |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        note = " ¹" if run["extrapolated"] else ""
        lines.append(
            f"| {run['name']}{note} | {_si(run['records_per_s'])} ({_si(run['records_per_s_min'])}–"
            f"{_si(run['records_per_s_max'])}) | {run['seconds_full_corpus']:.2f} | "
            f"{run['bytes_per_record']:.1f} | {_bytes(run['output_bytes'])} | "
            f"{c['bytes'] / run['output_bytes']:.1f}x |"
        )
    if any(run["extrapolated"] for run in result["runs"]):
        lines += [
            "",
            "¹ timed on the first records only; seconds and output size extrapolated to the full corpus.",
        ]
    if result.get("skipped"):
        lines += ["", f"Not run: {result['skipped']}"]
    lines += ["", "| target | value | goal | |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['description']} | {value} | {t['target']} | {t['verdict']} |")
    r = result["ratios"]
    extra = [
        (
            "dlpipe TFRecord (2 workers) / TF loop records/s",
            r.get("speedup_tfrecord_w2_vs_tf_loop"),
        ),
        (
            "dlpipe WebDataset (2 workers) / webdataset loop records/s",
            r.get("speedup_webdataset_w2_vs_wds_loop"),
        ),
        (
            "dlpipe WebDataset gzip bytes / dlpipe TFRecord bytes",
            r.get("size_webdataset_gzip_vs_tfrecord"),
        ),
    ]
    for label, value in extra:
        if value is not None:
            lines.append(f"| {label} | {value:.2f} | | info |")
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, args.seed)
    print(
        f"corpus: {corpus['num_records']:,} records, {_bytes(corpus['bytes'])}, "
        f"{'reused' if corpus['reused'] else 'built'} in {corpus_dir}",
        flush=True,
    )
    warm_page_cache([corpus_dir / "input_ids.npy", corpus_dir / "labels.npy"])
    if not args.skip_peers:
        import_peers()

    n = args.records
    peer_n = min(args.peer_records or n, n)
    out = args.cache_dir / "reshard-out"
    common = {"repeat": args.repeat, "num_records": n}
    runs: list[dict[str, Any]] = []
    skipped = None

    if not args.skip_peers:
        runs.append(
            timed_runs(
                "tf-loop",
                lambda d: tf_loop(corpus_dir, d, peer_n),
                out_dir=out / "tf-loop",
                timed_records=peer_n,
                info={"tool": "tf.io.TFRecordWriter", "format": "tfrecord", "workers": 1},
                **common,
            )
        )
        runs.append(
            timed_runs(
                "wds-loop",
                lambda d: wds_loop(corpus_dir, d, peer_n, args.num_shards),
                out_dir=out / "wds-loop",
                timed_records=peer_n,
                info={"tool": "webdataset.ShardWriter", "format": "webdataset", "workers": 1},
                **common,
            )
        )

    why_not = dlpipe_available()
    if why_not is not None:
        skipped = f"dlpipe runs (from dlpipe import reshard failed: {why_not})"
        print(f"skipping dlpipe: {why_not}", flush=True)
    else:
        configs = [
            ("dlpipe-tfrecord-w1", {"format": "tfrecord", "workers": 1}),
            ("dlpipe-tfrecord-w2", {"format": "tfrecord", "workers": 2}),
            ("dlpipe-webdataset-w2", {"format": "webdataset", "workers": 2}),
            (
                "dlpipe-webdataset-gzip-w2",
                {"format": "webdataset", "workers": 2, "compression": "gzip"},
            ),
        ]
        for name, options in configs:
            row = timed_runs(
                name,
                lambda d, o=options: dlpipe_reshard(corpus_dir, d, args.num_shards, **o),
                out_dir=out / name,
                timed_records=n,
                info={"tool": "dlpipe.reshard", "compression": None, **options},
                **common,
            )
            if name.startswith("dlpipe-tfrecord") and args.verify:
                row["records_read_back"] = count_tfrecords(out / name)
            runs.append(row)

    ratios = compute_ratios(runs, corpus)
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "benchmark": "reshard",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"repeat": args.repeat, "num_shards": args.num_shards, "peer_records": peer_n},
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

    json_path, md_path = args.results_dir / "reshard.json", args.results_dir / "reshard.md"
    if args.render_only:
        result = json.loads(json_path.read_text())
    else:
        result = run_all(args)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    md_path.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
