"""Scale-out benchmark: the Ray engine beside the local process pool, and reshard into a
loopback S3 server beside local disk, on one corpus in one run.

Runs (``corpus.py``'s DeepCAL-like corpus, shuffled, 16 TFRecord shards):

- ``local-w1`` / ``local-w2``  the process pool with 1 and 2 workers, output on local disk
- ``ray``                      ``engine="ray"`` on a local Ray instance with 2 CPUs; Ray's start-up
                               is timed apart and left out of records/s
- ``local-w2 -> s3``           the process pool writing to a moto S3 server on 127.0.0.1
- ``ray -> s3``                the Ray engine writing to the same server

``--repeat`` rounds, each run once per round (fresh output), median (min-max). Every output,
manifest included, is checked byte-identical to ``local-w1``'s. Results:
``bench/results/ray_engine.json`` and ``.md``.

    python bench/ray_bench.py [--records 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cpu_load import machine_busy_seconds, tree_cpu_seconds
from results_io import dlpipe_checkout, provenance, record

from dlpipe.benchmark.corpus import build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # the test suite's S3 server starter

import dlpipe  # noqa: E402
from dlpipe.storage import Location  # noqa: E402


def _fmt(x: float) -> str:
    return f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:,.0f}"


def _files(loc: Location) -> dict[str, bytes]:
    """Shards, indexes and the manifest, by name."""
    return {n: loc.join(n).read_bytes() for n in loc.listdir()}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from s3_server import S3Server

    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, 0)
    sources = [f"input_ids={corpus_dir}/input_ids.npy", f"labels={corpus_dir}/labels.npy"]
    opts = dict(pad_id=0, num_shards=args.num_shards, shuffle=True, seed=0, progress=False)
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    server = S3Server(str(work))
    server.start()
    server.make_bucket("dlpipe")

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    ray_start = time.perf_counter() - t

    configs = [
        ("local-w1", "local disk", dict(workers=1)),
        ("local-w2", "local disk", dict(workers=2)),
        ("ray", "local disk", dict(engine="ray")),
        ("local-w2 -> s3", "loopback S3", dict(workers=2, storage_options=server.storage_options)),
        ("ray -> s3", "loopback S3", dict(engine="ray", storage_options=server.storage_options)),
    ]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    busy: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    reference, load_before = None, os.getloadavg()
    try:
        for i in range(args.repeat):  # rounds, every run once per round: drift hits all alike
            for name, target, kw in configs:
                out = f"s3://dlpipe/{name.replace(' ', '')}-{i}" if "s3" in target else str(work / f"{name}-{i}")
                t, c, b = time.perf_counter(), tree_cpu_seconds(), machine_busy_seconds()
                summary = dlpipe.reshard(sources, out, **opts, **kw)
                seconds[name].append(time.perf_counter() - t)
                cpu[name].append(tree_cpu_seconds() - c)
                busy[name].append(machine_busy_seconds() - b)
                files = _files(Location(out, kw.get("storage_options")))
                reference = reference or files
                if files != reference:
                    raise SystemExit(f"{name}: output differs from local-w1's")
                if "s3" not in target:
                    shutil.rmtree(out)
            print(f"round {i + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n, _, _ in configs), flush=True)
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    runs = []
    for name, target, kw in configs:
        rates = [summary.num_records / s for s in seconds[name]]
        runs.append({"name": name, "output": target, "engine": kw.get("engine", "local"),
                     "workers": kw.get("workers", 2), "seconds": seconds[name],
                     "cpu_s": cpu[name], "others_cpu_s": [max(0.0, b - c) for b, c in zip(busy[name], cpu[name])],
                     "records_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
                     "byte_identical_to_local_w1": True})

    med = {r["name"]: r["records_per_s"]["median"] for r in runs}
    return {
        "benchmark": "ray_engine",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["ray_bench.py", *sys.argv[1:]]),
        "machine": describe(["ray", "moto"]),
        "dlpipe_measured": dlpipe_checkout(),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"repeat": args.repeat, "num_shards": args.num_shards, "ray_num_cpus": 2},
        "ray_startup_seconds": ray_start,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "runs": runs,
        "ratios": {
            "ray / local-w2": med["ray"] / med["local-w2"],
            "ray / local-w1": med["ray"] / med["local-w1"],
            "local-w2 -> s3 / local-w2": med["local-w2 -> s3"] / med["local-w2"],
            "ray -> s3 / ray": med["ray -> s3"] / med["ray"],
        },
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Ray engine and S3 output benchmark", "",
        provenance(result), "",
        f"Corpus: {result['corpus']['num_records']:,} records (DeepCAL-like, padded to 128), shuffled into "
        f"{result['settings']['num_shards']} TFRecord shards. Ray: a local instance with 2 CPUs; its start-up "
        f"({result['ray_startup_seconds']:.1f} s) is not in the rates. S3: moto on 127.0.0.1. "
        f"{result['settings']['repeat']} rounds, every run once per round, median (min-max); every output "
        "(shards, indexes, manifest) byte-identical to local-w1's.", "",
        "| run | output | records/s | seconds | CPU-s (others) |", "|---|---|---:|---:|---:|",
    ]
    for r in result["runs"]:
        rps = r["records_per_s"]
        lines.append(f"| {r['name']} | {r['output']} | {_fmt(rps['median'])} ({_fmt(rps['min'])}-{_fmt(rps['max'])}) "
                     f"| {statistics.median(r['seconds']):.2f} | {statistics.median(r['cpu_s']):.2f} "
                     f"({statistics.median(r['others_cpu_s']):.2f}) |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    load = result["load_average"]
    lines += ["", "seconds and CPU-s are medians. CPU-s: this benchmark's processes during the run (the caller, "
              "pool workers, Ray's daemons and workers, the S3 server); others: every other process on the "
              "machine meanwhile (`/proc/stat`), which competed for the same 2 CPUs. Load average (1 min) "
              f"before/after: {load['before'][0]:.2f}/{load['after'][0]:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--num-shards", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--render-only", action="store_true", help="rebuild ray_engine.md from the .json")
    args = p.parse_args(argv)
    return record(args.results_dir, "ray_engine", lambda: run_all(args), render, render_only=args.render_only)


if __name__ == "__main__":
    sys.exit(main())
