"""The shuffle benchmark's measuring: one epoch of a fresh loader (its order, seconds, CPU),
the order's quality, a contender's warm-up plus timed epochs, and the child process each group
runs in (``shuffle_bench.py --group``)."""

from __future__ import annotations

import argparse
import json
import math
import os
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
from cpu_load import machine_busy_seconds, tree_cpu_seconds
from shuffle_contenders import CONTENDERS, SEED, Maker, group_makers

SHUFFLE_BENCH = Path(__file__).resolve().with_name("shuffle_bench.py")


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
            sys.executable, str(SHUFFLE_BENCH), "--group", group, "--group-out", str(out),
            "--names", ",".join(names), "--shards", str(shards), "--corpus", str(corpus_dir),
            "--records", str(args.records), "--peer-records", str(args.peer_records),
            "--repeat", str(args.repeat), "--cache-dir", str(args.cache_dir),
        ]  # fmt: skip
        rc = subprocess.run(cmd, check=False, env=child_env(args.dlpipe_src)).returncode
        if out.is_file():
            return json.loads(out.read_text())
    why = f"the {group} process exited with {rc} before writing results"
    return {"rows": [], "failed": dict.fromkeys(names, why), "convert": {}}


def uniform_reference(n: int) -> dict[str, Any]:
    """What a uniform random permutation scores (numpy, seed 0): the target for a shuffle."""
    q = shuffle_quality(np.random.default_rng(SEED).permutation(n).astype(np.int64), n)
    return {"name": "uniform-permutation", "group": "reference", "records": n,
            "what": "`np.random.default_rng(0).permutation(N)`: reference, no loader", **q}  # fmt: skip
