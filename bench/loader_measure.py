"""The loader benchmark's measuring: one timed run of a loader, the rounds of one side, their
summaries, and the child process each side runs in (``loader_bench.py --side``).

A run builds a fresh loader, takes ``warmup_batches`` untimed (worker start-up, shuffle
buffers), then times ``timed_batches``; every batch's ``input_ids`` go through numpy to count
real tokens (non-pad ids; 0 never occurs in the text). Samples are records: a packed batch's
real segments (``segment_mask``), else its rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from cpu_load import machine_busy_seconds, tree_cpu_seconds
from loader_contenders import CONTENDERS, side_makers

from dlpipe.benchmark.corpus import PAD_ID

LOADER_BENCH = Path(__file__).resolve().with_name("loader_bench.py")
Maker = Callable[[], Callable[[], Iterable]]  # builds a loader; the loader makes an epoch


def input_ids_of(batch: Any) -> np.ndarray:
    """The ``input_ids`` of a batch as numpy: dicts, ``(features, labels)`` tuples, tensors."""
    if isinstance(batch, tuple):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch["input_ids"]
    return batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)


def labels_of(batch: Any) -> np.ndarray:
    value = batch[1] if isinstance(batch, tuple) else batch["labels"]
    if isinstance(value, dict):
        value = value["labels"]
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def samples_of(batch: Any, ids: np.ndarray) -> int:
    """Records in a batch: a packed batch's real segments (``segment_mask``), else its rows."""
    features = batch[0] if isinstance(batch, tuple) else batch
    if isinstance(features, dict) and "segment_mask" in features:
        mask = features["segment_mask"]
        return int(np.count_nonzero(mask.numpy() if hasattr(mask, "numpy") else mask))
    return int(ids.shape[0])


def batches(make_epoch: Callable[[], Iterable], count: int) -> Iterator[Any]:
    """``count`` batches, iterating the loader again (a new epoch) when one runs out."""
    done = 0
    while done < count:
        before = done
        for batch in make_epoch():
            yield batch
            done += 1
            if done == count:
                return
        if done == before:
            raise RuntimeError("the loader yielded no batches")


def one_run(make: Maker, warmup_batches: int, timed_batches: int) -> dict[str, Any]:
    """Build a loader, take ``warmup_batches``, then time ``timed_batches`` batches."""
    t0 = time.perf_counter()
    it = batches(make(), warmup_batches + timed_batches)
    first = next(it)
    ids, labels = input_ids_of(first), labels_of(first)
    if ids.ndim != 2 or labels.shape[0] != ids.shape[0] or labels.shape[-1] != 2:  # packed: [B, S, 2]
        raise RuntimeError(f"unexpected batch: input_ids {ids.shape}, labels {labels.shape}")
    for _ in range(warmup_batches - 1):
        next(it)
    setup = time.perf_counter() - t0
    samples = real = padded = lengths = 0
    own0, busy0, t1 = tree_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    for _ in range(timed_batches):
        batch = next(it)
        ids = input_ids_of(batch)
        samples += samples_of(batch, ids)
        padded += ids.size
        lengths += ids.shape[1]
        real += int(np.count_nonzero(ids != PAD_ID))
    # stop the clock at the last batch, before the generator ends and shuts the loader down
    seconds = time.perf_counter() - t1
    busy = machine_busy_seconds() - busy0
    own = tree_cpu_seconds() - own0
    it.close()
    return {
        "seconds": seconds,
        "setup_seconds": setup,
        "samples": samples,
        "real_tokens": real,
        "padded_tokens": padded,
        "mean_padded_length": lengths / timed_batches,
        "machine_cpu_per_s": busy / seconds,
        "own_cpu_per_s": own / seconds,
        "others_cpu_per_s": max(0.0, busy - own) / seconds,
    }


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    side, what = CONTENDERS[name]
    sps = [r["samples"] / r["seconds"] for r in runs]
    tps = [r["real_tokens"] / r["seconds"] for r in runs]
    last = runs[-1]
    return {
        "name": name,
        "side": side,
        "what": what,
        "samples_per_s": statistics.median(sps),
        "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps),
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_min": min(tps),
        "tokens_per_s_max": max(tps),
        "tokens_per_sample": last["real_tokens"] / last["samples"],
        "padding_efficiency": statistics.median(
            r["real_tokens"] / r["padded_tokens"] for r in runs
        ),
        "mean_padded_length": statistics.median(r["mean_padded_length"] for r in runs),
        "setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
        "machine_cpu_per_s": statistics.median(r["machine_cpu_per_s"] for r in runs),
        "own_cpu_per_s": statistics.median(r["own_cpu_per_s"] for r in runs),
        "others_cpu_per_s": statistics.median(r["others_cpu_per_s"] for r in runs),
        "own_cpu_us_per_sample": statistics.median(
            1e6 * r["own_cpu_per_s"] * r["seconds"] / r["samples"] for r in runs
        ),
        "runs": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs
        ],
    }


def run_side(
    makers: dict[str, Maker], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``--repeat`` rounds, each contender once per round (so load drift hits all alike)."""
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in makers}
    failed: dict[str, str] = {}
    for r in range(args.repeat):
        for name, make in makers.items():
            if name in failed:
                continue
            try:
                run = one_run(make, args.warmup, args.batches)
            except Exception as exc:  # report it and go on with the others
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"  {name}: FAILED {failed[name]}", flush=True)
                traceback.print_exc()
                continue
            results[name].append(run)
            print(
                f"  {name} #{r + 1}: {run['samples'] / run['seconds']:>10,.0f} samples/s "
                f"{run['real_tokens'] / run['seconds']:>12,.0f} tokens/s  "
                f"pad-eff {run['real_tokens'] / run['padded_tokens']:.3f}  "
                f"setup {run['setup_seconds']:.2f} s  CPU own {run['own_cpu_per_s']:.2f} "
                f"others {run['others_cpu_per_s']:.2f}",
                flush=True,
            )
    return [summarize(n, rs) for n, rs in results.items() if rs and n not in failed], failed


def side_main(args: argparse.Namespace) -> int:
    """Child process: time one side's contenders, write rows/failures to ``--side-out``."""
    names = args.only.split(",")
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    makers, skipped = side_makers(args.side, names, args.cache_dir / "loader-shards", corpus_dir)
    rows, failed = run_side(makers, args)
    for name, why in skipped.items():
        print(f"  {name}: skipped, {why}", flush=True)
    out = {"rows": rows, "failed": failed, "skipped": skipped}
    args.side_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def run_side_process(side: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One side in a fresh interpreter: TF and torch never share a process (the ``tfrecord``
    package registers TF's protos, so TF cannot be imported after it; a forked DataLoader
    worker would inherit TF's threads)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [
            sys.executable, str(LOADER_BENCH), "--side", side, "--side-out", str(out),
            "--only", ",".join(names), "--records", str(args.records), "--seed", str(args.seed),
            "--repeat", str(args.repeat), "--warmup", str(args.warmup),
            "--batches", str(args.batches), "--cache-dir", str(args.cache_dir),
        ]  # fmt: skip
        rc = subprocess.run(cmd, check=False).returncode
        if out.is_file():
            return json.loads(out.read_text())
    why = f"the {side} process exited with {rc} before writing results"
    return {"rows": [], "failed": dict.fromkeys(names, why), "skipped": {}}
