"""Loader benchmark: dlpipe's tf.data and PyTorch loaders against the pipelines people write.

All contenders read the same DeepCAL-like corpus (``corpus.py``, default 200k records), in one
run on one machine, batch size 256, shuffled, and are iterated in eager Python the way a
training loop does (``for batch in loader``). The shards are written once per run by
``dlpipe.reshard`` into ``bench/.cache/loader-shards/`` (TFRecord and WebDataset, 8 shards).

TF side: ``dlpipe-tf`` (``ShardDataset.to_tf_dataset``; ``-bucket`` with
``bucket_boundaries="auto"``, ``-packed`` with ``packing=True``), ``tfdata-handwritten`` (TensorFlow's
performance guide over the same TFRecord shards, decoding the encodings in the manifest) and
``hf-tf`` (HF ``datasets`` over the padded arrays, ``Dataset.to_tf_dataset``).
PyTorch side: ``dlpipe-torch`` with 0 and 2 workers (and at 0 workers with buckets and with
packing: rows of the longest record rounded up to 8 tokens, about 256 records per batch, the rule
of ``dlpipe bench``'s padding modes, ``dlpipe.benchmark.modes``), the ``tfrecord`` package's
``MultiTFRecordDataset``, ``webdataset.WebDataset`` over dlpipe's ``.tar.gz`` shards, and HF
``with_format("torch")`` with batched (``__getitems__``) access; the peers at 0 and 2 workers.

Each run builds a fresh loader, takes ``--warmup`` batches untimed (worker start-up, shuffle
buffers), then times ``--batches`` batches; ``--repeat`` rounds, every contender once per
round, reported as median (min-max). Every batch's ``input_ids`` go through numpy to count real
tokens (non-pad ids; 0 never occurs in the text), so tokens/s counts real tokens and padding
efficiency = real tokens / tokens in the padded (or packed) batches; samples are records (a
packed batch's real segments). Judged: packing >= 0.8x the same loader without it, TF with
buckets >= 0.9x TF without.

    python bench/loader_bench.py [--records 200000] [--repeat 3] [--only dlpipe-torch-w0,...]
    python bench/loader_bench.py --render-only

PyTorch and TF contenders run in two child processes (a forked DataLoader worker then does not
inherit TF's threads). This is a benchmark, not a test: targets print PASS/FAIL, exit code 0.

Modules: ``loader_contenders.py`` (the loaders), ``loader_measure.py`` (timing, rounds, the
side processes), ``loader_report.py`` (ratios, targets, markdown); this file is the CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from cpu_load import uptime
from loader_contenders import CONTENDERS, SHUFFLE_BUFFER, VERSIONS, write_shards
from loader_measure import run_side_process, side_main
from loader_report import judge, render_markdown
from results_io import dlpipe_checkout, record

from dlpipe.benchmark.corpus import build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(",")) if args.only else None
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, args.seed)
    print(f"corpus: {corpus['num_records']:,} records in {corpus_dir}", flush=True)
    chosen = write_shards(corpus_dir, args.cache_dir / "loader-shards", args.num_shards)
    for fmt, c in chosen.items():
        encs = ", ".join(
            f"{n}: {v['encoding']} {v['storage_dtype']}" for n, v in c["columns"].items()
        )
        print(f"shards: {fmt} ({c['compression'] or 'no'} compression): {encs}", flush=True)
    load_before, uptime_before = os.getloadavg(), uptime()
    print(f"before: {uptime_before}", flush=True)

    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for side, title in (("torch", "PyTorch"), ("tf", "TF")):
        names = [n for n, (s, _) in CONTENDERS.items() if s == side and (only is None or n in only)]
        if names:
            print(f"{title} side:", flush=True)
            got = run_side_process(side, names, args)
            rows += got["rows"]
            failed |= got["failed"]
            skipped |= got["skipped"]

    return {
        "benchmark": "loaders",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": describe(VERSIONS),
        "dlpipe_measured": dlpipe_checkout(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "uptime_before": uptime_before,
        "uptime_after": uptime(),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {
            "batch_size": 256,
            "warmup_batches": args.warmup,
            "timed_batches": args.batches,
            "repeat": args.repeat,
            "num_shards": args.num_shards,
            "peer_shuffle_buffer": SHUFFLE_BUFFER,
        },
        "shards": chosen,
        "runs": rows,
        "failed": failed,
        "skipped": skipped,
        "targets": judge(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="corpus size N (default 200k)")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds (each contender once per round)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches per run")
    parser.add_argument("--batches", type=int, default=600, help="timed batches per run")
    parser.add_argument("--num-shards", type=int, default=8, help="shards per format")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpus and shards")
    parser.add_argument(
        "--results-dir", type=Path, default=DEFAULT_RESULTS, help="loaders.json/.md"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="rebuild loaders.md from loaders.json"
    )
    parser.add_argument("--side", choices=("torch", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.warmup < 1 or args.batches < 1:
        parser.error("--warmup and --batches must be >= 1")

    if args.side:
        return side_main(args)
    return record(args.results_dir, "loaders", lambda: run_all(args), render_markdown, render_only=args.render_only)


if __name__ == "__main__":
    raise SystemExit(main())
