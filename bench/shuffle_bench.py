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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_busy_seconds, machine_info
from results_io import provenance, record

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache" / "shuffle"
DEFAULT_RESULTS = BENCH_DIR / "results"
DEFAULT_RECORDS = 144_563
BATCH_SIZE = 256
SEED = 0
BUFFER_SIZE = 1000  # dlpipe's default ShardDataset buffer_size
PAD_ID = 0  # the corpus pads input_ids with 0; 0 never occurs in the text
LITDATA_CHUNK_BYTES = "64MB"  # litdata's own default chunk size (optimize requires one)
GROUP_ORDER = ("torch", "tf", "iter", "litdata", "grain")

# name -> (child process group, what); the order is the order of the table
CONTENDERS: dict[str, tuple[str, str]] = {
    "dlpipe-torch-w0": (
        "torch",
        "`load_dataset(out).shuffle(seed=0, buffer_size=1000).to_torch_dataloader(batch_size=256,"
        " num_workers=0)`",
    ),
    "dlpipe-torch-w2": ("torch", "the same, `num_workers=2`"),
    "dlpipe-tf": (
        "tf",
        "`load_dataset(out).shuffle(seed=0).to_tf_dataset(batch_size=256,"
        ' columns=["input_ids", "record_id"], label_cols=["labels"])`',
    ),
    "dlpipe-iter": (
        "iter",
        "`for rec in load_dataset(out).shuffle(seed=0)`: one dict of numpy arrays per record",
    ),
    "litdata": (
        "litdata",
        f'`litdata.optimize(..., chunk_bytes="{LITDATA_CHUNK_BYTES}")` (one sample dict per'
        " record, padding stripped) → `StreamingDataset(shuffle=True, seed=0)` in"
        " `StreamingDataLoader(batch_size=256, collate_fn=padding collate)`, 0 workers",
    ),
    "grain-map": (
        "grain",
        "numpy-backed `RandomAccessDataSource` (padding stripped into one flat array + offsets)"
        " → `grain.MapDataset.source(src).shuffle(seed=0).batch(256, batch_fn=padding collate)`",
    ),
    "grain-dataloader": (
        "grain",
        "the same source in `grain.DataLoader(sampler=IndexSampler(N, shuffle=True, seed=0,"
        " num_epochs=1), operations=[Batch(256, batch_fn=padding collate)], worker_count=0)`",
    ),
    "grain-dataloader-threads0": (
        "grain",
        "the same with `read_options=ReadOptions(num_threads=0)` (grain's default reads with 16"
        " threads, which on 2 cores cost more than they give), for information",
    ),
}

# peers asked for but not run, and why (no fake rows)
LEFT_OUT: dict[str, str] = {
    "mosaicml-streaming": (
        "not installable beside this venv's pinned numpy 2.4.6 / torch 2.13.0 without changing"
        " other packages: 0.11.0-0.13.0 (0.13.0 is the newest) require numpy<2.2; the newest"
        " release pip can pair with numpy 2.4.6, 0.10.0, requires transformers<5, which would"
        " downgrade huggingface_hub 2.3.0 → 0.36.2 (a dependency of `datasets`) and xxhash"
        " 4.1 → 3.8 in the shared environment."
    ),
}

PEER_DISTS = ("litdata", "grain", "mosaicml-streaming")


# --- data --------------------------------------------------------------------------------------


def build_source(corpus_dir: Path, records: int, seed: int) -> dict[str, Any]:
    """The padded corpus plus ``record_id.npy`` (int64 [N], 0..N-1)."""
    from corpus import build_corpus

    stats = build_corpus(corpus_dir, records, seed)
    path = corpus_dir / "record_id.npy"
    if not path.is_file() or np.load(path, mmap_mode="r").shape != (records,):
        np.save(path, np.arange(records, dtype=np.int64))
    return stats


def reshard(corpus_dir: Path, out: Path) -> dict[str, Any]:
    """dlpipe's default reshard (only ``pad_id=0`` given); what it chose."""
    import dlpipe
    from dlpipe.manifest import load_manifest

    sources = [f"{c}={corpus_dir / f'{c}.npy'}" for c in ("input_ids", "labels", "record_id")]
    t0 = time.perf_counter()
    dlpipe.reshard(sources, str(out), pad_id=PAD_ID, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    info = load_manifest(out)
    return {
        "seconds": round(seconds, 2),
        "format": info.format,
        "compression": info.compression,
        "num_shards": len(info.shards),
        "splits": sorted({s.split for s in info.shards}),
        "shard_bytes": sum(s.num_bytes for s in info.shards),
        "columns": {n: c.to_json() for n, c in info.columns.items()},
        "call": f"dlpipe.reshard([{', '.join(repr(s.split('=')[0] + '=...') for s in sources)}],"
        " out, pad_id=0)",
    }


def unpadded_rows(corpus_dir: Path, start: int, stop: int) -> Iterable[dict[str, Any]]:
    """Records ``start:stop`` of the source arrays as sample dicts, padding stripped."""
    ids = np.load(corpus_dir / "input_ids.npy", mmap_mode="r")
    labels = np.load(corpus_dir / "labels.npy", mmap_mode="r")
    rid = np.load(corpus_dir / "record_id.npy", mmap_mode="r")
    block = np.asarray(ids[start:stop])
    lengths = np.count_nonzero(block != PAD_ID, axis=1)
    lab = np.asarray(labels[start:stop])
    rids = np.asarray(rid[start:stop])
    for j in range(stop - start):
        yield {
            "input_ids": block[j, : lengths[j]].copy(),
            "labels": lab[j].copy(),
            "record_id": int(rids[j]),
        }


def pad_collate(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-record samples → padded numpy batch: ``input_ids`` padded to the batch's longest,
    ``attention_mask``, stacked ``labels``, ``record_id`` [B]."""
    lengths = np.fromiter((len(s["input_ids"]) for s in samples), np.int64, len(samples))
    ids = np.full((len(samples), max(int(lengths.max()), 1)), PAD_ID, np.int64)
    for j, s in enumerate(samples):
        ids[j, : lengths[j]] = s["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64),
        "labels": np.stack([np.asarray(s["labels"]) for s in samples]),
        "record_id": np.fromiter((int(s["record_id"]) for s in samples), np.int64, len(samples)),
    }


# --- contenders: each returns (make a fresh epoch's iterable, ids of one yielded item) ---------

Maker = tuple[Callable[[], Iterable[Any]], Callable[[Any], Any]]


def _np(x: Any) -> np.ndarray:
    return (x.numpy() if hasattr(x, "numpy") else np.asarray(x)).reshape(-1)


def dlpipe_torch(shards: Path, workers: int) -> Maker:
    import dlpipe

    ds = dlpipe.load_dataset(shards, split="train").shuffle(seed=SEED, buffer_size=BUFFER_SIZE)

    def make() -> Iterable[Any]:
        return ds.to_torch_dataloader(batch_size=BATCH_SIZE, num_workers=workers)

    return make, lambda batch: _np(batch["record_id"])


def dlpipe_tf(shards: Path) -> Maker:
    import dlpipe

    ds = dlpipe.load_dataset(shards, split="train").shuffle(seed=SEED)

    def make() -> Iterable[Any]:
        return ds.to_tf_dataset(
            batch_size=BATCH_SIZE, columns=["input_ids", "record_id"], label_cols=["labels"]
        )

    return make, lambda batch: _np(batch[0]["record_id"])


def dlpipe_iter(shards: Path) -> Maker:
    import dlpipe

    ds = dlpipe.load_dataset(shards, split="train").shuffle(seed=SEED)
    return lambda: ds, lambda rec: int(rec["record_id"])


def _litdata_write(item: tuple[str, int, int]) -> Iterable[dict[str, Any]]:
    """litdata ``optimize`` fn: one input = a span of source records, yields one sample each."""
    corpus_dir, start, stop = item
    yield from unpadded_rows(Path(corpus_dir), start, stop)


def litdata_peer(corpus_dir: Path, n: int, work: Path, convert: dict[str, Any]) -> Maker:
    import litdata

    out = work / f"litdata-{n}"
    spans = [(str(corpus_dir), s, min(s + 8192, n)) for s in range(0, n, 8192)]
    t0 = time.perf_counter()
    litdata.optimize(
        fn=_litdata_write, inputs=spans, output_dir=str(out), chunk_bytes=LITDATA_CHUNK_BYTES,
        mode="overwrite", verbose=False,
    )  # fmt: skip
    convert["litdata"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "files": sum(1 for f in out.rglob("*") if f.is_file()),
    }

    def make() -> Iterable[Any]:
        ds = litdata.StreamingDataset(str(out), shuffle=True, seed=SEED)
        return litdata.StreamingDataLoader(
            ds, batch_size=BATCH_SIZE, num_workers=0, collate_fn=pad_collate
        )

    return make, lambda batch: _np(batch["record_id"])


class ArraySource:
    """A grain ``RandomAccessDataSource``: the source arrays with padding stripped into one
    flat int64 array plus offsets, labels and record ids; one sample dict per index."""

    def __init__(self, corpus_dir: Path, n: int) -> None:
        parts, lengths, labels, rids = [], [], [], []
        for start in range(0, n, 65_536):
            rows = list(unpadded_rows(corpus_dir, start, min(start + 65_536, n)))
            parts += [r["input_ids"] for r in rows]
            lengths += [len(r["input_ids"]) for r in rows]
            labels += [r["labels"] for r in rows]
            rids += [r["record_id"] for r in rows]
        self.values = np.concatenate(parts)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.labels = np.stack(labels)
        self.record_id = np.asarray(rids, np.int64)

    def __len__(self) -> int:
        return len(self.record_id)

    def __getitem__(self, i: Any) -> dict[str, Any]:
        i = int(i)
        return {
            "input_ids": self.values[self.offsets[i] : self.offsets[i + 1]],
            "labels": self.labels[i],
            "record_id": self.record_id[i],
        }

    def __repr__(self) -> str:
        return f"ArraySource(num_records={len(self)})"


def grain_peers(corpus_dir: Path, n: int, convert: dict[str, Any]) -> dict[str, Maker]:
    import grain
    import grain.python as gp

    t0 = time.perf_counter()
    src = ArraySource(corpus_dir, n)
    convert["grain"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": int(src.values.nbytes + src.offsets.nbytes + src.labels.nbytes
                     + src.record_id.nbytes),
        "files": 0,
    }  # fmt: skip

    def make_map() -> Iterable[Any]:
        return grain.MapDataset.source(src).shuffle(seed=SEED).batch(BATCH_SIZE, batch_fn=pad_collate)

    def make_loader(threads: int | None = None) -> Iterable[Any]:
        sampler = gp.IndexSampler(len(src), shuffle=True, seed=SEED, num_epochs=1)
        extra = {} if threads is None else {"read_options": gp.ReadOptions(num_threads=threads)}
        return gp.DataLoader(
            data_source=src, sampler=sampler,
            operations=[gp.Batch(BATCH_SIZE, batch_fn=pad_collate)], worker_count=0, **extra,
        )  # fmt: skip

    ids = lambda batch: _np(batch["record_id"])  # noqa: E731
    return {
        "grain-map": (make_map, ids),
        "grain-dataloader": (make_loader, ids),
        "grain-dataloader-threads0": (lambda: make_loader(0), ids),
    }


# --- measuring ---------------------------------------------------------------------------------


def tree_cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its children, reaped or live."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def one_epoch(make: Callable[[], Iterable[Any]], ids_of: Callable[[Any], Any]) -> dict[str, Any]:
    """A fresh loader, one full epoch: the record ids in yield order, seconds, CPU use.

    The clock runs from ``iter()`` (workers start, the epoch's order is drawn) to the last item,
    not through building the loader object; ``setup_seconds`` is that part."""
    t0 = time.perf_counter()
    loader = make()
    own0, busy0, t1 = tree_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    parts = [ids_of(item) for item in loader]
    seconds = time.perf_counter() - t1
    busy, own = machine_busy_seconds() - busy0, tree_cpu_seconds() - own0
    order = (
        np.asarray(parts, np.int64)
        if parts and np.isscalar(parts[0])
        else np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in parts] or [[]])
    ).astype(np.int64)
    return {
        "order": order,
        "seconds": seconds,
        "setup_seconds": t1 - t0,
        "own_cpu_per_s": own / seconds,
        "others_cpu_per_s": max(0.0, busy - own) / seconds,
    }


def shuffle_quality(order: np.ndarray, n: int) -> dict[str, Any]:
    """Spearman r (yield position vs record_id), mean displacement / N, runs, exactly-once.

    The same figures as ``dlpipe.loaders.shuffle_quality.order_quality``, computed here on
    purpose: the yardstick must not come from the code it measures (``--dlpipe-src`` runs
    checkouts that lack it)."""
    m = len(order)
    in_range = bool(m == 0 or (order.min() >= 0 and order.max() < n))
    counts = np.bincount(order, minlength=n) if in_range and m else np.zeros(n, np.int64)
    pos = np.arange(m, dtype=np.float64)
    # average ranks of record_id (ties get the mean of the ranks they span)
    uniq, inverse, cnt = np.unique(order, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(cnt)[:-1]]).astype(np.float64)
    ranks = (first + (cnt - 1) / 2.0)[inverse]
    r = float(np.corrcoef(pos, ranks)[0, 1]) if m > 1 and len(uniq) > 1 else math.nan
    return {
        "yielded": int(m),
        "rank_correlation": r,
        "mean_displacement": float(np.mean(np.abs(pos - order))) / n if m else math.nan,
        "next_is_prev_plus_1": float(np.mean(np.diff(order) == 1)) if m > 1 else math.nan,
        "exactly_once": bool(in_range and m == n and (counts == 1).all()),
        "missing": int((counts == 0).sum()) if in_range else None,
        "repeated": int((counts > 1).sum()) if in_range else None,
        "out_of_range": not in_range,
        "head": order[:12].tolist(),
    }


def measure(name: str, maker: Maker, n: int, repeat: int) -> dict[str, Any]:
    make, ids_of = maker
    warm = one_epoch(make, ids_of)  # untimed: faults memory in, fills caches
    print(f"  {name}: warm-up epoch {len(warm['order']) / warm['seconds']:,.0f} samples/s", flush=True)
    runs = []
    for k in range(repeat):
        run = one_epoch(make, ids_of)
        runs.append(run)
        print(f"  {name} #{k + 1}: {len(run['order']) / run['seconds']:>10,.0f} samples/s  "
              f"setup {run['setup_seconds']:.2f} s  CPU own {run['own_cpu_per_s']:.2f} "
              f"others {run['others_cpu_per_s']:.2f}", flush=True)  # fmt: skip
    q = shuffle_quality(runs[0]["order"], n)
    sps = [len(r["order"]) / r["seconds"] for r in runs]
    same = all(np.array_equal(r["order"], warm["order"]) for r in runs)
    print(f"  {name}: r={q['rank_correlation']:+.4f} displacement={q['mean_displacement']:.4f}"
          f" next=prev+1 {q['next_is_prev_plus_1']:.4f} exactly-once={q['exactly_once']}"
          f" same-order={same}", flush=True)  # fmt: skip
    group, what = CONTENDERS[name]
    return {
        "name": name,
        "group": group,
        "what": what,
        "records": n,
        "samples_per_s": statistics.median(sps),
        "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps),
        "setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
        "own_cpu_per_s": statistics.median(r["own_cpu_per_s"] for r in runs),
        "others_cpu_per_s": statistics.median(r["others_cpu_per_s"] for r in runs),
        "same_order_every_epoch": same,
        **q,
        "epochs": [
            {"seconds": round(r["seconds"], 4), "setup_seconds": round(r["setup_seconds"], 4),
             "own_cpu_per_s": round(r["own_cpu_per_s"], 3),
             "others_cpu_per_s": round(r["others_cpu_per_s"], 3)}
            for r in runs
        ],  # fmt: skip
    }


# --- child processes ---------------------------------------------------------------------------


def group_makers(group: str, names: list[str], args: argparse.Namespace,
                 convert: dict[str, Any]) -> dict[str, Callable[[], Maker]]:  # fmt: skip
    """Lazy makers of one group's contenders (a peer's conversion happens when first asked)."""
    shards, corpus_dir = Path(args.shards), Path(args.corpus)
    peer_n, work = args.peer_records, Path(args.cache_dir)
    if group == "torch":
        return {"dlpipe-torch-w0": lambda: dlpipe_torch(shards, 0),
                "dlpipe-torch-w2": lambda: dlpipe_torch(shards, 2)}  # fmt: skip
    if group == "tf":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        return {"dlpipe-tf": lambda: dlpipe_tf(shards)}
    if group == "iter":
        return {"dlpipe-iter": lambda: dlpipe_iter(shards)}
    if group == "litdata":
        return {"litdata": lambda: litdata_peer(corpus_dir, peer_n, work, convert)}
    if group == "grain":
        cache: dict[str, dict[str, Maker]] = {}

        def get(name: str) -> Maker:
            if "all" not in cache:
                cache["all"] = grain_peers(corpus_dir, peer_n, convert)
            return cache["all"][name]

        return {n: (lambda n=n: get(n)) for n in names}
    raise ValueError(group)


def group_main(args: argparse.Namespace) -> int:
    """Child process: measure one group's contenders, write rows/failures to ``--group-out``."""
    names = args.names.split(",")
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    convert: dict[str, Any] = {}
    try:
        makers = group_makers(args.group, names, args, convert)
    except Exception as exc:
        traceback.print_exc()
        makers, failed = {}, dict.fromkeys(names, f"{type(exc).__name__}: {exc}")
    for name in names:
        if name not in makers:
            continue
        n = args.peer_records if not name.startswith("dlpipe-") else args.records
        try:
            rows.append(measure(name, makers[name](), n, args.repeat))
        except Exception as exc:  # report it and go on with the others
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"  {name}: FAILED {failed[name]}", flush=True)
            traceback.print_exc()
    out = {"rows": rows, "failed": failed, "convert": convert}
    Path(args.group_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def child_env(dlpipe_src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request from litdata
    if dlpipe_src is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(dlpipe_src), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env


def run_group(group: str, names: list[str], args: argparse.Namespace, shards: Path,
              corpus_dir: Path) -> dict[str, Any]:  # fmt: skip
    """One group in a fresh interpreter (same python): TF never shares a process with torch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "group.json"
        cmd = [
            sys.executable, __file__, "--group", group, "--group-out", str(out),
            "--names", ",".join(names), "--shards", str(shards), "--corpus", str(corpus_dir),
            "--records", str(args.records), "--peer-records", str(args.peer_records),
            "--repeat", str(args.repeat), "--cache-dir", str(args.cache_dir),
        ]  # fmt: skip
        rc = subprocess.run(cmd, check=False, env=child_env(args.dlpipe_src)).returncode
        if out.is_file():
            return json.loads(out.read_text())
    why = f"the {group} process exited with {rc} before writing results"
    return {"rows": [], "failed": dict.fromkeys(names, why), "convert": {}}


def selected(only: str | None) -> list[str]:
    """Contenders named by ``--only``: full names, or a prefix such as ``dlpipe``/``grain``."""
    if not only:
        return list(CONTENDERS)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if not any(n == k or n.startswith(k + "-") for n in CONTENDERS)]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    return [n for n in CONTENDERS if any(n == k or n.startswith(k + "-") for k in keys)]


# --- main --------------------------------------------------------------------------------------


def _git(path: Path, *cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), *cmd], capture_output=True, text=True,
                             check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def dlpipe_state() -> dict[str, Any]:
    """Which dlpipe was measured: its path, commit and uncommitted files under dlpipe/."""
    import dlpipe

    pkg = Path(dlpipe.__path__[0]).resolve()
    root = pkg.parent
    status = _git(root, "status", "--short", "--", "dlpipe/")
    return {
        "path": str(pkg),
        "commit": _git(root, "rev-parse", "--short", "HEAD"),
        "commit_subject": _git(root, "log", "-1", "--format=%s"),
        "uncommitted": status.splitlines() if status else [],
    }


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "torchdata", *PEER_DISTS):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def uniform_reference(n: int) -> dict[str, Any]:
    """What a uniform random permutation scores (numpy, seed 0): the target for a shuffle."""
    q = shuffle_quality(np.random.default_rng(SEED).permutation(n).astype(np.int64), n)
    return {"name": "uniform-permutation", "group": "reference", "records": n,
            "what": "`np.random.default_rng(0).permutation(N)`: reference, no loader", **q}  # fmt: skip


def run_all(args: argparse.Namespace) -> dict[str, Any]:
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
    state = dlpipe_state()
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
        "machine": {**machine_info(), **library_versions()},
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


# --- markdown ----------------------------------------------------------------------------------


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


PEER_NOTE = (
    "Peers are converted from the same source arrays with their own writers (padding stripped,"
    " so every contender pads each batch to its longest record) and run with their default"
    " shuffle settings; seed 0 is passed where the API takes one. Conversion time is listed"
    " apart and not in samples/s. litdata's `optimize` ran with its default 2 workers (one per"
    " core), each writing its own chunk(s); its shuffle permutes chunks, then blocks of 256"
    " items within a chunk, then the items of a block."
)

NOTES = [
    "rank corr. r: Spearman's r between yield position and source position (`record_id`);"
    " 1.00 = source order, ~0 = no trace of it. mean displacement: mean |yield position -"
    " source position| / N; a uniform random permutation gives ~1/3. next = prev + 1: share of"
    " consecutive yields that are consecutive source records (runs left by a block or window"
    " shuffle); ~1/N for a uniform permutation.",
    "exactly once: the epoch yielded every record_id 0..N-1 once (no pads, drops or repeats)."
    " same order: the warm-up epoch and every timed epoch (each a fresh loader, epoch 0,"
    " seed 0) yielded the same order.",
    "samples/s: records in the epoch ÷ seconds from `iter(loader)` to the last item (worker"
    " start-up and drawing the epoch's order included; building the loader object is setup s),"
    " after one untimed warm-up epoch; median (min–max) of the timed epochs. CPU own / others:"
    " CPU-s per second of this benchmark's process tree and of the rest of the machine; a"
    " large *others* means something else competed for the 2 cores.",
    "The dlpipe rows read one shard written with dlpipe's default reshard options (no"
    " `--shuffle`), so the source order is the shard order: only the loader's shuffle can"
    " move records. Shuffle quality does not depend on the corpus content.",
    "Each group runs in its own child process with the same Python (TensorFlow and torch never"
    " share one).",
]


def render_markdown(res: dict[str, Any]) -> str:
    m, s, st, rs = res["machine"], res["settings"], res["dlpipe_measured"], res["reshard"]
    dirty = st["uncommitted"]
    lines = [
        "# Shuffle benchmark" + (f" ({res['tag']})" if res.get("tag") not in (None, "current") else ""),
        "",
        provenance(res),
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, {m.get('memory_gib')}"
        f" GiB; {m.get('platform')}; Python {m.get('python')}, numpy {m.get('numpy')}, torch"
        f" {m.get('torch')}, TF {m.get('tensorflow')}, litdata {m.get('litdata')}, grain"
        f" {m.get('grain')}. Load average (1/5/15 min) before"
        f" {' / '.join(f'{x:.2f}' for x in res['load_average']['before'])}, after"
        f" {' / '.join(f'{x:.2f}' for x in res['load_average']['after'])}; whole run"
        f" {res['total_seconds']:.0f} s.",
        "",
        f"dlpipe measured: `{st['path']}` at commit {st['commit']} ({st['commit_subject']})"
        + (f", with uncommitted changes in {len(dirty)} file(s) under dlpipe/"
           f" ({', '.join('`' + d.split()[-1] + '`' for d in dirty)})" if dirty
           else ", no uncommitted changes under dlpipe/")
        + ".",
        "",
        f"Corpus: {res['corpus']['num_records']:,} DeepCAL-like records (`corpus.py`, seed"
        f" {res['corpus']['seed']}) plus `record_id` = 0..N-1; resharded with `{rs['call']}`"
        f" (dlpipe's defaults: {rs['num_shards']} shard(s), {rs['format']},"
        f" {rs['compression'] or 'uncompressed'}, split {', '.join(rs['splits'])}). Batch size"
        f" {s['batch_size']}, seed {s['seed']}; {s['warmup']}, then {s['repeat']} timed"
        " epochs, each a fresh loader.",
        "",
        "| run | records | samples/s | rank corr. r | mean displacement (share of N) |"
        " next = prev + 1 | exactly once | same order | setup s | CPU own / others | what |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|",
    ]
    for r in [*res["runs"], res["reference"]]:
        speed = (f"{_k(r['samples_per_s'])} ({_k(r['samples_per_s_min'])}–"
                 f"{_k(r['samples_per_s_max'])})" if "samples_per_s" in r else "—")  # fmt: skip
        once = "yes" if r["exactly_once"] else (
            f"no ({r['yielded']:,} yielded, {r['missing']} missing, {r['repeated']} repeated)"
            if r.get("missing") is not None else f"no ({r['yielded']:,} yielded, ids out of range)"
        )  # fmt: skip
        same = {True: "yes", False: "no", None: "—"}[r.get("same_order_every_epoch")]
        cpu = (f"{r['own_cpu_per_s']:.2f} / {r['others_cpu_per_s']:.2f}"
               if "own_cpu_per_s" in r else "—")  # fmt: skip
        setup = _f(r.get("setup_seconds"), ".2f")
        lines.append(
            f"| `{r['name']}` | {r['records']:,} | {speed} | {_f(r['rank_correlation'], '+.4f')}"
            f" | {_f(r['mean_displacement'], '.4f')} | {_f(r['next_is_prev_plus_1'], '.4f')}"
            f" | {once} | {same} | {setup} | {cpu} | {r['what']} |"
        )
    lines.append("")
    if res.get("peer_conversion"):
        lines += ["Peer conversions (not in samples/s):", ""]
        for peer, c in res["peer_conversion"].items():
            where = f"{c['files']} file(s), {c['bytes'] / 1e6:.1f} MB" if c["files"] else (
                f"in memory, {c['bytes'] / 1e6:.1f} MB")  # fmt: skip
            lines.append(f"- {peer}: {c['seconds']:.1f} s, {where}")
        lines.append("")
    for key, title in (("failed", "Failed"), ("left_out", "Left out")):
        if res.get(key):
            lines += [f"## {title}", ""] + [f"- `{n}`: {why}" for n, why in res[key].items()] + [""]
    peers = any(not r["name"].startswith("dlpipe-") for r in res["runs"])
    notes = [*NOTES, PEER_NOTE] if peers else NOTES
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


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
        sys.path.insert(0, str(args.dlpipe_src))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

    if args.group:
        return group_main(args)
    name = "shuffle" + (f"_{args.tag}" if args.tag else "")
    return record(args.results_dir, name, lambda: run_all(args), render_markdown,
                  render_only=args.render_only)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
