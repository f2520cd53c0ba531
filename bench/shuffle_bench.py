"""Shuffle benchmark: how well, and how fast, dlpipe's loaders and their peers shuffle (issue 16).

Every record of the DeepCAL-like corpus (``corpus.py``, default 144,563 records) gets a third
column ``record_id`` = its position in the source, so each record a loader yields says where it
came from. The corpus is resharded with dlpipe's default options (``pad_id=0``, no shuffle, no
split: one shard) into ``bench/.cache/shuffle/``. Each contender then reads ONE epoch with
shuffling on (seed 0), and the ``record_id`` sequence in yield order gives:

- **rank correlation r**: Spearman's r between yield position and ``record_id`` (numpy: the
  Pearson correlation of ranks, ties averaged). 1.00 = source order; ~0 for a good shuffle.
- **mean displacement**: mean |yield position - record_id| as a share of N; a uniform random
  permutation gives ~1/3, source order 0.
- **next = prev + 1**: share of consecutive yields that are consecutive source records (runs
  of a block shuffle show up here; a uniform permutation gives ~1/N).
- **exactly once**: every record_id 0..N-1 came exactly once.
- **samples/s** of the timed epoch(s), after one untimed epoch (a fresh VM faults memory in
  slowly). Each epoch is a fresh loader (so epoch 0 with seed 0 each time); ``--repeat``
  timed epochs, median (min-max); "same order" says whether all of them (and the warm-up)
  yielded the same order.

Contenders run in child processes, one per framework/peer (TensorFlow and torch never share a
process, as in ``loader_bench.py``): dlpipe's PyTorch loader (0 and 2 workers), its
``to_tf_dataset``, its framework-free per-record iterator, and the peers, each converted from
the same source arrays with its own writer: litdata (``optimize`` + ``StreamingDataset``) and
grain (a numpy-backed random-access source, ``MapDataset.shuffle`` and ``IndexSampler``), each
with its default shuffle settings. mosaicml-streaming is left out (see ``LEFT_OUT``).

    python bench/shuffle_bench.py [--records 144563] [--repeat 3] [--only dlpipe,grain]
    python bench/shuffle_bench.py --dlpipe-src /tmp/dlpipe-base --tag baseline --only dlpipe
    python bench/shuffle_bench.py --render-only [--tag baseline]

``--dlpipe-src PATH`` imports dlpipe from another checkout (PATH is put first on sys.path here
and on PYTHONPATH of the child processes), e.g. a ``git worktree`` of the unfixed code.
``--tag T`` writes ``results/shuffle_T.json/.md`` instead of ``results/shuffle.json/.md``.
This is a benchmark, not a test: it always exits 0 unless something crashes.

Modules: ``shuffle_contenders.py`` (the loaders and the data they read), ``shuffle_measure.py``
(epochs, shuffle quality, the group processes), ``shuffle_report.py`` (markdown); this file is
the CLI. None of them imports dlpipe at import time (``--dlpipe-src`` must come first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

from results_io import dlpipe_checkout, record
from shuffle_contenders import (
    BATCH_SIZE,
    BUFFER_SIZE,
    CONTENDERS,
    GROUP_ORDER,
    LEFT_OUT,
    PEER_DISTS,
    SEED,
    build_source,
    reshard,
)
from shuffle_measure import group_main, run_group, uniform_reference
from shuffle_report import render_markdown

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache" / "shuffle"
DEFAULT_RESULTS = BENCH_DIR / "results"
DEFAULT_RECORDS = 144_563


def selected(only: str | None) -> list[str]:
    """Contenders named by ``--only``: full names, or a prefix such as ``dlpipe``/``grain``."""
    if not only:
        return list(CONTENDERS)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if not any(n == k or n.startswith(k + "-") for n in CONTENDERS)]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    return [n for n in CONTENDERS if any(n == k or n.startswith(k + "-") for k in keys)]


def run_all(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    names = selected(args.only)
    tag = args.tag or "current"
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    t0 = time.perf_counter()
    corpus = build_source(corpus_dir, args.records, args.seed)
    print(f"corpus: {corpus['num_records']:,} records + record_id.npy in {corpus_dir}", flush=True)
    shards = args.cache_dir / f"shards-{args.records}-{tag}"
    resharded = reshard(corpus_dir, shards)
    print(f"reshard: {resharded['num_shards']} shard(s), {resharded['format']}, "
          f"{resharded['seconds']} s → {shards}", flush=True)  # fmt: skip
    state = dlpipe_checkout()
    print(f"dlpipe: {state['path']} at {state['commit']}, uncommitted in dlpipe/: "
          f"{len(state['uncommitted'])} file(s)", flush=True)  # fmt: skip
    load_before = os.getloadavg()

    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    convert: dict[str, Any] = {}
    for group in GROUP_ORDER:
        members = [n for n in names if CONTENDERS[n][0] == group]
        if members:
            print(f"{group}:", flush=True)
            got = run_group(group, members, args, shards, corpus_dir)
            rows += got["rows"]
            failed |= got["failed"]
            convert |= got["convert"]
    rows.sort(key=lambda r: list(CONTENDERS).index(r["name"]))
    peers_asked = any(not n.startswith("dlpipe-") for n in names)
    return {
        "benchmark": "shuffle",
        "tag": tag,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO_DIR), *sys.argv[1:]]),
        "machine": machine,
        "dlpipe_measured": state,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"records": args.records, "peer_records": args.peer_records,
                     "batch_size": BATCH_SIZE, "seed": SEED, "buffer_size": BUFFER_SIZE,
                     "repeat": args.repeat, "warmup": "one full untimed epoch per contender"},
        "reshard": resharded,
        "peer_conversion": convert,
        "reference": uniform_reference(args.records),
        "runs": rows,
        "failed": failed,
        "left_out": LEFT_OUT if peers_asked else {},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS,
                        help=f"corpus size N (default {DEFAULT_RECORDS:,})")  # fmt: skip
    parser.add_argument("--peer-records", type=int, default=None,
                        help="records the peers read (the first ones of the corpus; default N)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (the loaders use 0)")
    parser.add_argument("--repeat", type=int, default=3, help="timed epochs per contender")
    parser.add_argument("--only", default=None,
                        help="comma-separated names or prefixes (dlpipe, grain, ...)")  # fmt: skip
    parser.add_argument("--dlpipe-src", type=Path, default=None,
                        help="import dlpipe from this checkout (e.g. a git worktree)")  # fmt: skip
    parser.add_argument("--tag", default=None, help="results/shuffle_TAG.json/.md")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpus, shards")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild the .md from the .json")  # fmt: skip
    for hidden in ("--group", "--group-out", "--names", "--shards", "--corpus"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.records < 2 or args.repeat < 1:
        parser.error("--records must be >= 2 and --repeat >= 1")
    args.peer_records = min(args.peer_records or args.records, args.records)
    if args.dlpipe_src is not None:
        args.dlpipe_src = args.dlpipe_src.resolve()
        if not (args.dlpipe_src / "dlpipe" / "__init__.py").is_file():
            parser.error(f"--dlpipe-src {args.dlpipe_src}: no dlpipe/__init__.py there")
    machine = None
    if not args.group and not args.render_only:
        # described by this checkout's dlpipe, before --dlpipe-src's (which may predate it)
        from dlpipe.benchmark.machine import describe

        machine = describe(PEER_DISTS)
    if args.dlpipe_src is not None:
        sys.path.insert(0, str(args.dlpipe_src))
        for name in [m for m in sys.modules if m == "dlpipe" or m.startswith("dlpipe.")]:
            del sys.modules[name]  # so that the next ``import dlpipe`` finds --dlpipe-src's
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

    if args.group:
        return group_main(args)
    name = "shuffle" + (f"_{args.tag}" if args.tag else "")
    return record(args.results_dir, name, lambda: run_all(args, machine), render_markdown,
                  render_only=args.render_only)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
