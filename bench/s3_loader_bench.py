"""S3 loader benchmark: dlpipe's PyTorch and tf.data loaders on the same shards from local disk,
from a loopback S3 server, and from S3 through a local ``cache_dir``.

The corpus is ``loader_bench.py``'s (``corpus.py``, default 200k DeepCAL-like records), resharded
by ``dlpipe.reshard`` into 8 uncompressed TFRecord shards under ``bench/.cache/s3-loader-shards``
and uploaded to a moto S3 server on 127.0.0.1 (``tests/s3_server.py``, the one the tests use: a
single Python process on this machine, so every request costs CPU here too; real S3 has more
latency per request and no CPU cost on this host). Loaders are built and timed as in
``loader_bench.py`` (batch size 256, shuffled, ``--warmup`` batches untimed, then ``--batches``
timed; ``--repeat`` rounds, every contender once per round; median (min-max)).

Contenders: ``to_torch_dataloader`` with 0 and 2 workers and ``to_tf_dataset``, each reading
``local`` (the shard directory), ``s3`` (range requests with read-ahead; TF through dlpipe's
reader, see ``dlpipe.loaders.tf_remote``) and ``s3-cache`` (shards fetched once into a cache
directory, then read as local files; the fill is timed once, before the rounds).

    python bench/s3_loader_bench.py [--records 200000] [--repeat 3]
    python bench/s3_loader_bench.py --render-only

PyTorch and TF run in separate child processes, as in ``loader_bench.py``. This is a benchmark,
not a test: it exits 0 unless something crashes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from corpus import PAD_ID, build_corpus
from loader_bench import one_run
from machine import machine_info
from results_io import record

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
from s3_server import CREDENTIALS, S3Server  # noqa: E402

DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"
REMOTE = "s3://dlpipe/bench/tfrecord"
SOURCES = ("local", "s3", "s3-cache")
LOADERS = {"torch-w0": "torch", "torch-w2": "torch", "tf": "tf"}


def storage_options(endpoint: str) -> dict[str, Any]:
    return {**CREDENTIALS, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}


# --- loaders -----------------------------------------------------------------------------------


_LAST: dict[str, Any] = {}  # the dataset of the loader built last (its reader's stats)


def make_loader(loader: str, source: str, shards: Path, endpoint: str, cache: str) -> Callable[[], Iterable]:
    import dlpipe

    if source == "local":
        ds = dlpipe.load_dataset(shards)
    else:
        ds = dlpipe.load_dataset(REMOTE, storage_options=storage_options(endpoint),
                                 cache_dir=cache if source == "s3-cache" else None)
    _LAST["ds"] = ds
    if loader == "tf":
        tfds = ds.to_tf_dataset(batch_size=256, columns=["input_ids"], label_cols=["labels"], shuffle=True)
        return lambda: tfds
    workers = int(loader.removeprefix("torch-w"))
    dl = ds.to_torch_dataloader(batch_size=256, shuffle=True, num_workers=workers)
    return lambda: dl


def fill_cache(endpoint: str, cache: str) -> dict[str, float]:
    """Fetch every shard into an empty cache once: seconds and MB/s."""
    import dlpipe

    shutil.rmtree(cache, ignore_errors=True)
    ds = dlpipe.load_dataset(REMOTE, storage_options=storage_options(endpoint), cache_dir=cache)
    t0 = time.perf_counter()
    ds.reader().cache_shards(ds.shards)
    seconds = time.perf_counter() - t0
    size = sum(s.num_bytes for s in ds.shards)
    return {"seconds": round(seconds, 3), "bytes": size, "mb_per_s": round(size / seconds / 1e6, 1)}


def side_main(args: argparse.Namespace) -> int:
    """Child process: time one side's contenders, write rows to ``--side-out``."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    shards = args.cache_dir / "s3-loader-shards" / "tfrecord"
    names = [(lo, src) for lo, side in LOADERS.items() if side == args.side for src in SOURCES]
    with tempfile.TemporaryDirectory(prefix="dlpipe-s3-cache-") as cache:
        fill = fill_cache(args.endpoint, cache)
        print(f"  cache fill: {fill['bytes'] / 1e6:.1f} MB in {fill['seconds']:.2f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {f"{lo}-{src}": [] for lo, src in names}
        failed: dict[str, str] = {}
        for r in range(args.repeat):
            for lo, src in names:
                name = f"{lo}-{src}"
                if name in failed:
                    continue
                try:
                    run = one_run(lambda lo=lo, src=src: make_loader(lo, src, shards, args.endpoint, cache),
                                  args.warmup, args.batches)
                except Exception as exc:  # report it and go on with the others
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    continue
                if src == "s3" and lo != "torch-w2":  # read in this process: its requests
                    run["reader"] = _LAST["ds"].reader().stats
                runs[name].append(run)
                print(f"  {name} #{r + 1}: {run['samples'] / run['seconds']:>10,.0f} samples/s  "
                      f"CPU own {run['own_cpu_per_s']:.2f} others {run['others_cpu_per_s']:.2f}", flush=True)
    rows = [summarize(lo, src, runs[f"{lo}-{src}"]) for lo, src in names
            if runs[f"{lo}-{src}"] and f"{lo}-{src}" not in failed]
    args.side_out.write_text(json.dumps({"rows": rows, "failed": failed, "cache_fill": fill}, indent=2) + "\n")
    return 0


def summarize(loader: str, source: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    name = f"{loader}-{source}"
    sps = [r["samples"] / r["seconds"] for r in runs]
    return {
        "name": name,
        "loader": loader,
        "source": source,
        "samples_per_s": statistics.median(sps),
        "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps),
        "setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
        "own_cpu_per_s": statistics.median(r["own_cpu_per_s"] for r in runs),
        "others_cpu_per_s": statistics.median(r["others_cpu_per_s"] for r in runs),
        "own_cpu_us_per_sample": statistics.median(1e6 * r["own_cpu_per_s"] * r["seconds"] / r["samples"]
                                                   for r in runs),
        "reader": runs[-1].get("reader"),
        "runs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
    }


# --- the parent --------------------------------------------------------------------------------


def write_and_upload(corpus_dir: Path, out: Path, num_shards: int, server: S3Server) -> dict[str, Any]:
    import dlpipe
    from dlpipe.manifest import load_manifest
    from dlpipe.storage import Location

    sources = [f"input_ids={corpus_dir / 'input_ids.npy'}", f"labels={corpus_dir / 'labels.npy'}"]
    dlpipe.reshard(sources, str(out), format="tfrecord", num_shards=num_shards, pad_id=PAD_ID, overwrite=True,
                   progress=False)
    t0 = time.perf_counter()
    for name in os.listdir(out):
        target = Location(REMOTE, server.storage_options).join(name)
        target.fs.put_file(str(out / name), target.fs_path)
    info = load_manifest(out)
    return {"num_shards": len(info.shards), "shard_bytes": sum(s.num_bytes for s in info.shards),
            "compression": info.compression, "upload_seconds": round(time.perf_counter() - t0, 2)}


def run_side_process(side: str, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, __file__, "--side", side, "--side-out", str(out), "--endpoint", endpoint,
               "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--batches", str(args.batches),
               "--cache-dir", str(args.cache_dir)]
        rc = subprocess.run(cmd, check=False).returncode
        if out.is_file():
            return json.loads(out.read_text())
    return {"rows": [], "failed": {side: f"the {side} process exited with {rc} before writing results"},
            "cache_fill": None}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["loader"], r["source"]): r["samples_per_s"] for r in rows}
    out = []
    for loader in LOADERS:
        base = by.get((loader, "local"))
        for source in ("s3", "s3-cache"):
            value = by.get((loader, source))
            out.append({"loader": loader, "source": source,
                        "ratio": None if not base or value is None else value / base})
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, args.seed)
    server = S3Server(tempfile.mkdtemp(prefix="dlpipe-moto-"))
    server.start()
    try:
        server.make_bucket("dlpipe")
        shards = write_and_upload(corpus_dir, args.cache_dir / "s3-loader-shards" / "tfrecord", args.num_shards,
                                  server)
        print(f"shards: {shards}", flush=True)
        load_before = os.getloadavg()
        rows, failed, fills = [], {}, {}
        for side in ("torch", "tf"):
            print(f"{side} side:", flush=True)
            got = run_side_process(side, server.endpoint, args)
            rows += got["rows"]
            failed |= got["failed"]
            fills[side] = got["cache_fill"]
    finally:
        server.stop()
    return {
        "benchmark": "s3_loaders",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {**machine_info(), **_versions()},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"batch_size": 256, "warmup_batches": args.warmup, "timed_batches": args.batches,
                     "repeat": args.repeat, "server": "moto (python -m moto.server) on 127.0.0.1"},
        "shards": shards,
        "cache_fill": fills,
        "runs": rows,
        "ratios": ratios(rows),
        "failed": failed,
    }


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "s3fs", "fsspec", "moto"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


# --- report ------------------------------------------------------------------------------------

NOTES = [
    "`s3`: uncompressed shards read with HTTP range requests located by the `.index` files: a"
    " window's records (about 1000, the shuffle buffer), or the adjacent windows one process reads"
    " back to back, up to `request_bytes` (4 MiB) per request; fetched on background threads within"
    " `prefetch_bytes` (32 MiB) while the current window is decoded; record CRCs checked. The"
    " requests column counts one run (warm-up included) of the loaders that read in this process.",
    "`torch-w2-s3`: each worker reads every second window, so its windows are never adjacent and"
    " each is a request of its own (about 85 KB here, ~200 per epoch); moto spends CPU on every"
    " request on the same 2 cores (*others*), which is most of the gap to local.",
    "`tf-s3`: per shard file, a `from_generator` over the same reader yields chunks of a multiple"
    " of 64 records (one range request each); one `tf.strings.substr` cuts a chunk into records,"
    " shaped [k, 64] and unbatched into the blocks `TFRecordDataset(f).batch(64)` gives, and the"
    " rest of the graph is the local one. It beats `tf-local` because TFRecordDataset yields records"
    " one at a time into `batch(64)`, while this path makes 64-record blocks in one op per chunk.",
    "`s3-cache`: `cache_dir` given; shards were fetched (SHA-256 verified) into the cache once"
    " before the rounds (the *cache fill* line), so the timed runs read local files (TF through"
    " TFRecordDataset, exactly the local pipeline); its ratio is the steady state of every epoch"
    " after the first.",
    "The S3 server is moto in one Python process on the same 2 cores: its CPU shows as *others*."
    " Real S3 answers each request later (tens of ms) but costs this host no CPU; read-ahead"
    " (several requests in flight) is what hides that latency, and it is not exercised here.",
]


def render_markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        "# S3 loader benchmark",
        "",
        f"{res['created']}, `{res['command']}`. Corpus: {res['corpus']['num_records']:,} DeepCAL-like records;"
        f" {res['shards']['num_shards']} uncompressed TFRecord shards"
        f" ({res['shards']['shard_bytes'] / 1e6:.1f} MB); batch size {s['batch_size']}, shuffled;"
        f" {s['warmup_batches']} batches untimed, then {s['timed_batches']} timed; {s['repeat']} rounds,"
        " median (min–max). Server: " + s["server"] + ".",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, {m.get('memory_gib')} GiB;"
        f" Python {m.get('python')}, TF {m.get('tensorflow')}, torch {m.get('torch')}, s3fs {m.get('s3fs')},"
        f" moto {m.get('moto')}; dlpipe {m.get('dlpipe')} (commit {m.get('git_commit')} plus uncommitted work).",
        "",
        "| run | samples/s | CPU own / others | CPU µs/ sample | setup s | S3 requests, MB, peak read-ahead MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        st = r.get("reader")
        reads = "" if not st else (f"{st['requests']}, {st['bytes_fetched'] / 1e6:.1f},"
                                   f" {st['peak_buffered_bytes'] / 1e6:.1f}")
        lines.append(f"| `{r['name']}` | {_k(r['samples_per_s'])} ({_k(r['samples_per_s_min'])}–"
                     f"{_k(r['samples_per_s_max'])}) | {r['own_cpu_per_s']:.2f} / {r['others_cpu_per_s']:.2f}"
                     f" | {r['own_cpu_us_per_sample']:.1f} | {r['setup_seconds']:.2f} | {reads} |")
    lines += ["", "## S3 ÷ local (median samples/s)", "", "| loader | s3 ÷ local | s3-cache ÷ local |", "|---|---|---|"]
    for loader in LOADERS:
        got = {r["source"]: r["ratio"] for r in res["ratios"] if r["loader"] == loader}
        lines.append(f"| {loader} | {_ratio(got.get('s3'))} | {_ratio(got.get('s3-cache'))} |")
    lines.append("")
    for side, fill in res["cache_fill"].items():
        if fill:
            lines.append(f"Cache fill ({side} process): {fill['bytes'] / 1e6:.1f} MB in {fill['seconds']:.2f} s"
                         f" ({fill['mb_per_s']:.0f} MB/s).")
    lines.append("")
    if res.get("failed"):
        lines += ["## Failed", ""] + [f"- `{n}`: {why}" for n, why in res["failed"].items()] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def _k(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="corpus size N (default 200k)")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each contender once per round)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches per run")
    parser.add_argument("--batches", type=int, default=600, help="timed batches per run")
    parser.add_argument("--num-shards", type=int, default=8, help="shards")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpus and shards")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="s3_loaders.json/.md")
    parser.add_argument("--render-only", action="store_true", help="rebuild s3_loaders.md from the .json")
    parser.add_argument("--side", choices=("torch", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return side_main(args)
    return record(args.results_dir, "s3_loaders", lambda: run_all(args), render_markdown, render_only=args.render_only)


if __name__ == "__main__":
    raise SystemExit(main())
