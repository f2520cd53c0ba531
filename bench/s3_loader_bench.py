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

Transient faults: each loader also reads whole epochs through two HTTP proxies in front of the
same server (``fault_proxy.py``, run by the parent process): one that only forwards (*clean*) and
one that answers a seeded ``--fault-rate`` of the requests (default 1%, half 503 SlowDown, half
connections reset mid-body) with a fault (*faults*), which dlpipe's storage layer retries with
its default policy. One range request per shuffle window (``request_bytes=0``), so that an epoch
makes a few hundred requests; ``--fault-epochs`` epochs per run, each counted (records) and
hashed (every batch, in order): nothing lost or repeated means every epoch of the *faults* runs
has the same count and digest as the same epoch of the *clean* runs. ``--fault-latency-ms``
(default ``0,25``): the proxies also hold every request that long, as a far endpoint would (a
loopback server answers in about a millisecond, which makes any retry pause look large).

    python bench/s3_loader_bench.py [--records 200000] [--repeat 3] [--fault-rate 0.01]
    python bench/s3_loader_bench.py --render-only

PyTorch and TF run in separate child processes, as in ``loader_bench.py``. This is a benchmark,
not a test: it exits 0 unless something crashes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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

import numpy as np
from cpu_load import tree_cpu_seconds
from fault_proxy import FaultProxy
from fault_proxy import stats as proxy_stats
from loader_measure import one_run
from results_io import checkout_text, dlpipe_checkout, memory_gib, record, versions_of

from dlpipe.benchmark.corpus import PAD_ID, build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
from s3_server import CREDENTIALS, S3Server  # noqa: E402

DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"
REMOTE = "s3://dlpipe/bench/tfrecord"
SOURCES = ("local", "s3", "s3-cache")
LOADERS = {"torch-w0": "torch", "torch-w2": "torch", "tf": "tf",
           "torch-w0-map10us": "torch", "torch-w2-map10us": "torch"}
# a ~10 µs Python map per record (loader_contenders.busy_10us): read from local disk and S3 only,
# and left out of the fault runs (it would only slow their epochs down)
MAPPED = ("torch-w0-map10us", "torch-w2-map10us")
VERSIONS = ("s3fs", "fsspec", "moto")  # beside describe()'s


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
    if loader in MAPPED:
        from loader_contenders import busy_10us

        ds = ds.map(busy_10us)
    dl = ds.to_torch_dataloader(batch_size=256, shuffle=True, num_workers=workers_of(loader))
    return lambda: dl


def workers_of(loader: str) -> int:
    """The DataLoader workers of a torch loader's name (``torch-w2``, ``torch-w0-map10us``)."""
    return int(loader.removeprefix("torch-w").split("-")[0])


def sources_of(loader: str) -> tuple[str, ...]:
    return ("local", "s3") if loader in MAPPED else SOURCES


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


def _arrays(obj: Any) -> Iterable[np.ndarray]:
    """The arrays of a batch, in a fixed order (dicts, tuples, torch and TF tensors, ragged)."""
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _arrays(obj[k])
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _arrays(v)
    elif hasattr(obj, "flat_values"):  # tf.RaggedTensor
        yield from _arrays(obj.flat_values)
        yield from _arrays(obj.row_splits)
    else:
        yield obj.numpy() if hasattr(obj, "numpy") else np.asarray(obj)


def fault_epochs(loader: str, endpoint: str, epochs: int) -> dict[str, Any]:
    """``epochs`` full epochs of a fresh loader reading through ``endpoint``: samples, seconds,
    and per epoch the record count and a digest of every batch in order."""
    import dlpipe

    t0 = time.perf_counter()
    ds = dlpipe.load_dataset(REMOTE, storage_options=storage_options(endpoint), request_bytes=0)
    if loader == "tf":
        made = ds.to_tf_dataset(batch_size=256, columns=["input_ids"], label_cols=["labels"], shuffle=True, seed=0)
    else:
        made = ds.to_torch_dataloader(batch_size=256, shuffle=True, seed=0, num_workers=workers_of(loader))
    setup = time.perf_counter() - t0
    seconds, counts, digests = 0.0, [], []
    cpu0 = tree_cpu_seconds()
    for epoch in range(epochs):
        if hasattr(made, "set_epoch"):
            made.set_epoch(epoch)
        h, n = hashlib.sha1(), 0
        t = time.perf_counter()
        for batch in made:
            arrays = list(_arrays(batch))
            n += len(arrays[0])
            for a in arrays:
                h.update(np.ascontiguousarray(a).data)
        seconds += time.perf_counter() - t
        counts.append(n)
        digests.append(h.hexdigest())
    return {"samples": sum(counts), "seconds": seconds, "setup_seconds": setup, "epoch_records": counts,
            "epoch_digests": digests, "own_cpu_per_s": (tree_cpu_seconds() - cpu0) / seconds}


def fault_runs(args: argparse.Namespace, side: str) -> dict[str, list[dict[str, Any]]]:
    """For each added latency and each of this side's loaders, ``--repeat`` rounds of: a clean
    run, a run through the faults (``--fault-epochs`` epochs each), with the proxy's counters."""
    runs: dict[str, list[dict[str, Any]]] = {}
    loaders = [lo for lo, s in LOADERS.items() if s == side and lo not in MAPPED]
    pairs = zip(args.fault_latency_ms, args.clean_endpoint.split(","), args.fault_endpoint.split(","))
    for latency, clean, faulty in pairs:
        for r in range(args.repeat):
            for lo in loaders:
                for kind, endpoint in (("clean", clean), ("faults", faulty)):
                    before = proxy_stats(endpoint)
                    run = fault_epochs(lo, endpoint, args.fault_epochs)
                    after = proxy_stats(endpoint)
                    run["proxy"] = {k: after[k] - before[k] for k in after}
                    runs.setdefault(f"{latency}|{lo}|{kind}", []).append(run)
                    print(f"  +{latency} ms {lo} {kind} #{r + 1}: {run['samples'] / run['seconds']:>10,.0f} samples/s"
                          f"  {run['proxy']['requests']} requests, {run['proxy']['slowdown']} 503s, "
                          f"{run['proxy']['reset']} resets; records per epoch {run['epoch_records']}", flush=True)
    return runs


def side_main(args: argparse.Namespace) -> int:
    """Child process: time one side's contenders, write rows to ``--side-out``."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    shards = args.cache_dir / "s3-loader-shards" / "tfrecord"
    names = [(lo, src) for lo, side in LOADERS.items() if side == args.side for src in sources_of(lo)]
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
                if src == "s3" and (lo == "tf" or workers_of(lo) == 0):  # read in this process: its requests
                    run["reader"] = _LAST["ds"].reader().stats
                runs[name].append(run)
                print(f"  {name} #{r + 1}: {run['samples'] / run['seconds']:>10,.0f} samples/s  "
                      f"CPU own {run['own_cpu_per_s']:.2f} others {run['others_cpu_per_s']:.2f}", flush=True)
    rows = [summarize(lo, src, runs[f"{lo}-{src}"]) for lo, src in names
            if runs[f"{lo}-{src}"] and f"{lo}-{src}" not in failed]
    faults: dict[str, list[dict[str, Any]]] = {}
    if args.fault_endpoint:
        print(f"  transient faults ({args.fault_rate:.1%} of requests), {args.fault_epochs} epochs per run:",
              flush=True)
        try:
            faults = fault_runs(args, args.side)
        except Exception as exc:  # report it and go on
            failed[f"faults-{args.side}"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    args.side_out.write_text(json.dumps({"rows": rows, "failed": failed, "cache_fill": fill, "faults": faults},
                                        indent=2) + "\n")
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


def run_side_process(side: str, endpoint: str, args: argparse.Namespace,
                     proxies: list[tuple[FaultProxy, FaultProxy]] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, __file__, "--side", side, "--side-out", str(out), "--endpoint", endpoint,
               "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--batches", str(args.batches),
               "--cache-dir", str(args.cache_dir), "--fault-epochs", str(args.fault_epochs),
               "--fault-rate", str(args.fault_rate),
               "--fault-latency-ms", ",".join(str(ms) for ms in args.fault_latency_ms)]
        if proxies:
            cmd += ["--clean-endpoint", ",".join(c.endpoint for c, _ in proxies),
                    "--fault-endpoint", ",".join(f.endpoint for _, f in proxies)]
        rc = subprocess.run(cmd, check=False).returncode
        if out.is_file():
            return json.loads(out.read_text())
    return {"rows": [], "failed": {side: f"the {side} process exited with {rc} before writing results"},
            "cache_fill": None, "faults": {}}


def fault_summary(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per loader: clean and faulty samples/s (median of the rounds), their ratio, the faults
    met, and whether every faulty epoch matched the clean epoch (count and digest)."""
    out = []
    for latency, loader in sorted({(int(k.split("|")[0]), k.split("|")[1]) for k in runs},
                                  key=lambda x: (x[0], list(LOADERS).index(x[1]))):
        clean, faulty = runs.get(f"{latency}|{loader}|clean"), runs.get(f"{latency}|{loader}|faults")
        if not clean or not faulty:
            continue
        rate = {k: [r["samples"] / r["seconds"] for r in v] for k, v in (("clean", clean), ("faults", faulty))}
        want = (clean[0]["epoch_records"], clean[0]["epoch_digests"])
        exact = all((r["epoch_records"], r["epoch_digests"]) == want for r in clean + faulty)
        met = {k: sum(r["proxy"][k] for r in faulty) for k in ("requests", "slowdown", "reset")}
        out.append({
            "latency_ms": latency,
            "loader": loader,
            "clean_samples_per_s": statistics.median(rate["clean"]),
            "clean_min_max": [min(rate["clean"]), max(rate["clean"])],
            "faults_samples_per_s": statistics.median(rate["faults"]),
            "faults_min_max": [min(rate["faults"]), max(rate["faults"])],
            # each round's faulty run over its clean run (run back to back), median over rounds:
            # less sensitive to the machine's load drifting between rounds than a ratio of medians
            "ratio": statistics.median(f / c for f, c in zip(rate["faults"], rate["clean"])),
            "requests_per_run": statistics.median(r["proxy"]["requests"] for r in faulty),
            "faults_met": met,
            "records_per_epoch": sorted({n for r in clean + faulty for n in r["epoch_records"]}),
            "nothing_lost_or_repeated": exact,
            "runs": {"clean": clean, "faults": faulty},
        })
    return out


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


# issue 11: DataLoader workers that help, with and without a per-record transform
WORKER_GOALS = {"": 1.0, "-map10us": 1.5}


def worker_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``num_workers=2`` ÷ ``num_workers=0`` (median samples/s) per source, without and with the
    ~10 µs map, against the goals."""
    by = {(r["loader"], r["source"]): r["samples_per_s"] for r in rows}
    out = []
    for suffix, goal in WORKER_GOALS.items():
        for source in ("local", "s3"):
            w0, w2 = by.get((f"torch-w0{suffix}", source)), by.get((f"torch-w2{suffix}", source))
            ratio = w2 / w0 if w0 and w2 else None
            out.append({"transform": "map10us" if suffix else None, "source": source, "ratio": ratio, "goal": goal,
                        "pass": None if ratio is None else ratio >= goal})
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, args.seed)
    server = S3Server(tempfile.mkdtemp(prefix="dlpipe-moto-"))
    server.start()
    proxies = []
    try:
        server.make_bucket("dlpipe")
        shards = write_and_upload(corpus_dir, args.cache_dir / "s3-loader-shards" / "tfrecord", args.num_shards,
                                  server)
        print(f"shards: {shards}", flush=True)
        if args.fault_rate > 0:
            rates = {"slowdown": args.fault_rate / 2, "reset": args.fault_rate / 2}
            proxies = [(FaultProxy(server.port, delay=ms / 1000), FaultProxy(server.port, rates, seed=args.seed,
                                                                             delay=ms / 1000))
                       for ms in args.fault_latency_ms]
        load_before = os.getloadavg()
        rows, failed, fills, fault_rows = [], {}, {}, {}
        for side in ("torch", "tf"):
            print(f"{side} side:", flush=True)
            got = run_side_process(side, server.endpoint, args, proxies)
            rows += got["rows"]
            failed |= got["failed"]
            fills[side] = got["cache_fill"]
            fault_rows |= got.get("faults") or {}
    finally:
        for pair in proxies:
            for proxy in pair:
                proxy.stop()
        server.stop()
    return {
        "benchmark": "s3_loaders",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": describe(VERSIONS),
        "dlpipe_measured": dlpipe_checkout(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"batch_size": 256, "warmup_batches": args.warmup, "timed_batches": args.batches,
                     "repeat": args.repeat, "server": "moto (python -m moto.server) on 127.0.0.1"},
        "shards": shards,
        "cache_fill": fills,
        "runs": rows,
        "ratios": ratios(rows),
        "workers": worker_ratios(rows),
        "faults": {"rate": args.fault_rate, "kinds": {"slowdown": args.fault_rate / 2, "reset": args.fault_rate / 2},
                   "epochs_per_run": args.fault_epochs, "request_bytes": 0, "retry_policy": _retry_policy(),
                   "latency_ms": args.fault_latency_ms,
                   "loaders": fault_summary(fault_rows)},
        "failed": failed,
    }


def _retry_policy() -> dict[str, Any]:
    import dataclasses

    from dlpipe.storage import RetryPolicy

    return dataclasses.asdict(RetryPolicy.resolve(None))


# --- report ------------------------------------------------------------------------------------

NOTES = [
    "`s3`: uncompressed shards read with HTTP range requests located by the `.index` files: a"
    " window's records (about 1000, the shuffle buffer), or the adjacent windows one process reads"
    " back to back, up to `request_bytes` (4 MiB) per request; fetched on background threads within"
    " `prefetch_bytes` (32 MiB) while the current window is decoded; record CRCs checked. The"
    " requests column counts one run (warm-up included) of the loaders that read in this process.",
    "`torch-w2-s3`: the workers take the windows in runs of neighbours (the windows of about one"
    " shuffle block, which over S3 holds >= 1 MiB: 11 windows here), so each worker reads its"
    " windows back to back in a few large requests, as `torch-w0` does, rather than one ~85 KB"
    " request per window; moto spends CPU on every request on the same 2 cores (*others*). A"
    " worker's S3 client reuses the service descriptions its parent parsed (~0.2 s of CPU each).",
    "`tf-s3`: per shard file, a `from_generator` over the same reader yields chunks of a multiple"
    " of 64 records (one range request each); one `tf.strings.substr` cuts a chunk into records,"
    " shaped [k, 64] and unbatched into the blocks `TFRecordDataset(f).batch(64)` gives, and the"
    " rest of the graph is the local one. It beats `tf-local` because TFRecordDataset yields records"
    " one at a time into `batch(64)`, while this path makes 64-record blocks in one op per chunk.",
    "`s3-cache`: `cache_dir` given; shards were fetched (SHA-256 verified) into the cache once"
    " before the rounds (the *cache fill* line), so the timed runs read local files (TF through"
    " TFRecordDataset, exactly the local pipeline); its ratio is the steady state of every epoch"
    " after the first.",
    "`*-map10us`: `ds.map(f)` with f a ~10 µs per-record Python function (a tokenize/augment"
    " stand-in from `loader_contenders.busy_10us`: it busy-waits 10 µs and adds a column); with"
    " workers the map runs in them. Read from local disk and S3 only, and not in the fault runs.",
    "The S3 server is moto in one Python process on the same 2 cores: its CPU shows as *others*."
    " Real S3 answers each request later (tens of ms) but costs this host no CPU; read-ahead"
    " (several requests in flight) is what hides that latency, and it is not exercised here.",
]


def render_markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    v = versions_of(m)
    lines = [
        "# S3 loader benchmark",
        "",
        f"{res['created']}, `{res['command']}`. Corpus: {res['corpus']['num_records']:,} DeepCAL-like records;"
        f" {res['shards']['num_shards']} uncompressed TFRecord shards"
        f" ({res['shards']['shard_bytes'] / 1e6:.1f} MB); batch size {s['batch_size']}, shuffled;"
        f" {s['warmup_batches']} batches untimed, then {s['timed_batches']} timed; {s['repeat']} rounds,"
        " median (min–max). Server: " + s["server"] + ".",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, {memory_gib(m)} GiB;"
        f" Python {m.get('python')}, TF {v.get('tensorflow')}, torch {v.get('torch')}, s3fs {v.get('s3fs')},"
        f" moto {v.get('moto')}; {checkout_text(res)}.",
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
    if res.get("workers"):
        lines += ["## PyTorch num_workers=2 ÷ num_workers=0 (median samples/s)", "",
                  "| per record | source | w2 ÷ w0 | goal | |", "|---|---|---:|---:|---|"]
        for w in res["workers"]:
            verdict = "–" if w["pass"] is None else "PASS" if w["pass"] else "FAIL"
            lines.append(f"| {'a ~10 µs map' if w['transform'] else 'no transform'} | {w['source']} |"
                         f" {_ratio(w['ratio'])} | ≥ {w['goal']} | {verdict} |")
        lines.append("")
    for side, fill in res["cache_fill"].items():
        if fill:
            lines.append(f"Cache fill ({side} process): {fill['bytes'] / 1e6:.1f} MB in {fill['seconds']:.2f} s"
                         f" ({fill['mb_per_s']:.0f} MB/s).")
    lines.append("")
    lines += render_faults(res.get("faults"))
    if res.get("failed"):
        lines += ["## Failed", ""] + [f"- `{n}`: {why}" for n, why in res["failed"].items()] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def render_faults(faults: dict[str, Any] | None) -> list[str]:
    if not faults or not faults.get("loaders"):
        return []
    p = faults["retry_policy"]
    lines = [
        f"## Transient faults: {faults['rate']:.1%} of requests", "",
        f"Each loader reads {faults['epochs_per_run']} whole epochs per run (fresh loader, shuffled, one range"
        " request per window: `request_bytes=0`) through an HTTP proxy in front of the same server: *clean*"
        " only forwards; *faults* answers a seeded fraction of the requests with 503 SlowDown or resets the"
        " connection halfway through the body (half each). dlpipe retries with its default policy"
        f" (attempts {p['attempts']}, base delay {p['base_delay']} s, max delay {p['max_delay']} s, timeout"
        f" {p['timeout']} s). *Added latency*: both proxies also hold every request that long, as a far"
        " endpoint would. Median (min–max) of the rounds; *faults ÷ clean*: the median over rounds of each"
        " faulty run's rate over the clean run just before it; *faults met* sums the faulty runs.", "",
        "| added latency | loader | clean samples/s | faults samples/s | faults ÷ clean | requests per run |"
        " faults met (503s, resets) | records per epoch | nothing lost or repeated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in faults["loaders"]:
        c, f, met = r["clean_min_max"], r["faults_min_max"], r["faults_met"]
        lines.append(
            f"| {r.get('latency_ms', 0)} ms | {r['loader']} | {_k(r['clean_samples_per_s'])} ({_k(c[0])}–{_k(c[1])}) |"
            f" {_k(r['faults_samples_per_s'])}"
            f" ({_k(f[0])}–{_k(f[1])}) | {r['ratio']:.2f} | {r['requests_per_run']:.0f} |"
            f" {met['slowdown'] + met['reset']} of {met['requests']} ({met['slowdown']}, {met['reset']}) |"
            f" {', '.join(f'{n:,}' for n in r['records_per_epoch'])} | {'yes' if r['nothing_lost_or_repeated'] else 'NO'} |")
    lines += ["", "*Nothing lost or repeated*: every epoch of every run, clean or faulty, has the same record count"
              " and the same digest of its batches (in order) as the first clean run's same epoch.",
              "",
              "What a fault costs: the failed request, s3fs's fixed pause after a failed request (0.1 s; 0.2 s"
              " after a timeout; s3fs sleeps even when told to try once), dlpipe's backoff (at most"
              f" {p['base_delay']} s before a first retry, half that on average) and the retried request. The"
              " other read-ahead threads keep fetching the next windows meanwhile; the loader waits only"
              " once it reaches the window being retried.", ""]
    return lines


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
    parser.add_argument("--fault-rate", type=float, default=0.01,
                        help="fraction of requests given a transient fault in the faults runs (0: none)")
    parser.add_argument("--fault-epochs", type=int, default=3, help="whole epochs per clean/faults run")
    parser.add_argument("--fault-latency-ms", type=lambda v: [int(x) for x in v.split(",")], default=[0, 25],
                        help="latencies the fault proxies add to every request (comma-separated ms)")
    parser.add_argument("--render-only", action="store_true", help="rebuild s3_loaders.md from the .json")
    parser.add_argument("--side", choices=("torch", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--clean-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--fault-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return side_main(args)
    return record(args.results_dir, "s3_loaders", lambda: run_all(args), render_markdown, render_only=args.render_only)


if __name__ == "__main__":
    raise SystemExit(main())
