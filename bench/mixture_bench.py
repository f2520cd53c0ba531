"""Mixtures and resume, measured: what ``interleave_datasets`` costs against reading one dataset,
in both frameworks, and how long a resumed loader takes to its first batch against restarting
the epoch and skipping what was already trained on.

    python bench/mixture_bench.py            # -> bench/results/mixtures.json and .md

**Mixing.** The DeepCAL-like corpus (``dlpipe.benchmark.corpus``, N records) is resharded three
times: all of it, its first 70% ("main") and its last 30% ("domain"). Each framework reads, with
``shuffle=True, seed=0`` and batches of 256: the whole dataset, and the mixture of main and
domain with ``probabilities=[0.7, 0.3]`` (``first_exhausted``: about N records). A warm-up epoch,
then ``--repeat`` alternating rounds of one timed epoch each; the median is reported, and mixture / one per framework
(goal >= 0.9).

**Resume.** A dataset of ``--resume-records`` records (default 1M; the corpus again), the PyTorch
loader with 2 workers. Its state is taken halfway through the epoch. Timed from a fresh
loader to its first batch:
- ``load_state_dict`` on the same topology;
- ``load_state_dict`` of a state saved at world size 2 (the elastic path: the remainder is
  recomputed from the plan);
- a mixture of the two halves, elastic;
- the yardstick: a fresh loader restarting the epoch and skipping the batches already trained.
Goal: < 1 s to the first batch for 1M records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from results_io import dlpipe_checkout, record

import dlpipe
from dlpipe.benchmark.corpus import build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
BATCH = 256
MIX_GOAL = 0.9
RESUME_GOAL_S = 1.0


def reshard_parts(corpus_dir: Path, out: Path, parts: dict[str, tuple[float, float]]) -> dict[str, Path]:
    """Reshard row ranges (fractions of the corpus) of the corpus, each its own dataset."""
    ids = np.load(corpus_dir / "input_ids.npy", mmap_mode="r")
    labels = np.load(corpus_dir / "labels.npy", mmap_mode="r")
    n = len(ids)
    made = {}
    for name, (a, b) in parts.items():
        part = out / name
        if not (part / "out" / "dataset_info.json").exists():
            part.mkdir(parents=True, exist_ok=True)
            lo, hi = int(a * n), int(b * n)
            np.save(part / "input_ids.npy", np.asarray(ids[lo:hi]))
            np.save(part / "labels.npy", np.asarray(labels[lo:hi]))
            dlpipe.reshard([f"input_ids={part / 'input_ids.npy'}", f"labels={part / 'labels.npy'}"], str(part / "out"),
                           pad_id=0, num_shards=8, int_encoding="int64_list", overwrite=True, progress=False)
            for f in ("input_ids.npy", "labels.npy"):
                (part / f).unlink()
        made[name] = part / "out"
    return made


def epoch_samples(make) -> tuple[int, float]:
    """(samples, seconds) of one whole epoch."""
    t0, n = time.perf_counter(), 0
    for batch in make():
        n += len(batch["labels"])
    return n, time.perf_counter() - t0


def mixing(paths: dict[str, Path], repeat: int) -> list[dict[str, Any]]:
    """Per framework, one dataset and the mixture, each warmed by an epoch, then timed in
    alternating rounds (so a change in the machine's load hits both alike)."""
    one = dlpipe.load_dataset(paths["all"])
    mix = dlpipe.interleave_datasets([dlpipe.load_dataset(paths["main"]), dlpipe.load_dataset(paths["domain"])],
                                     probabilities=[0.7, 0.3], seed=0)
    rows = []
    for framework in ("torch", "tf"):
        makers = {}
        for name, ds in (("one dataset", one), ("mixture 0.7/0.3", mix)):
            if framework == "torch":
                makers[name] = lambda ds=ds: ds.to_torch_dataloader(batch_size=BATCH, shuffle=True, seed=0)
            else:
                tf_ds = ds.to_tf_dataset(batch_size=BATCH, shuffle=True, seed=0, columns=["input_ids", "labels"])
                makers[name] = lambda tf_ds=tf_ds: iter(tf_ds)
        runs: dict[str, list[tuple[int, float]]] = {name: [] for name in makers}
        for make in makers.values():
            epoch_samples(make)
        for _ in range(repeat):
            for name, make in makers.items():
                runs[name].append(epoch_samples(make))
        for name, got in runs.items():
            rates = [n / s for n, s in got]
            rate = statistics.median(rates)
            print(f"  {framework:5} {name:16} {rate:>10,.0f} samples/s", flush=True)
            rows.append({"framework": framework, "reading": name, "samples": got[0][0], "samples_per_s": rate,
                         "runs": [round(r) for r in rates]})
    return rows


def first_batch_s(loader_fn, state=None, skip: int = 0) -> float:
    """Seconds from a fresh loader (loading ``state``, or skipping ``skip`` batches) to the next
    batch."""
    t0 = time.perf_counter()
    loader = loader_fn()
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    next(it)
    seconds = time.perf_counter() - t0
    del it
    return seconds


def halfway_state(loader_fn, batches: int) -> dict[str, Any]:
    loader = loader_fn()
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    del it
    return state


def resume(paths: dict[str, Path], repeat: int) -> dict[str, Any]:
    ds = dlpipe.load_dataset(paths["resume"])
    mix = dlpipe.interleave_datasets([dlpipe.load_dataset(paths["resume-main"]),
                                      dlpipe.load_dataset(paths["resume-domain"])], probabilities=[0.7, 0.3], seed=0)

    def loader(d, world=1, rank=0):
        return lambda: d.to_torch_dataloader(batch_size=BATCH, shuffle=True, seed=0, num_workers=2,
                                             world_size=world, rank=rank)

    batches = len(loader(ds)()) // 2
    state = halfway_state(loader(ds), batches)
    world2 = halfway_state(loader(ds, 2), batches // 2)
    mix_state = halfway_state(loader(mix, 2), len(loader(mix, 2)()) // 2)
    cases = {
        "load_state_dict, same topology": lambda: first_batch_s(loader(ds), state),
        "load_state_dict, saved at world_size=2 (elastic)": lambda: first_batch_s(loader(ds), world2),
        "mixture, saved at world_size=2 (elastic)": lambda: first_batch_s(loader(mix), mix_state),
        "restart the epoch and skip (yardstick)": lambda: first_batch_s(loader(ds), skip=batches),
    }
    rows = []
    for name, fn in cases.items():
        fn()  # warm: page cache, index files
        times = [fn() for _ in range(repeat)]
        print(f"  {name:48} {statistics.median(times):7.3f} s", flush=True)
        rows.append({"case": name, "seconds": statistics.median(times), "runs": [round(t, 3) for t in times]})
    return {"records": ds.num_rows, "batches_skipped": batches, "rows": rows,
            "state_bytes": len(repr(world2))}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, 0)
    paths = reshard_parts(corpus_dir, args.cache_dir / f"mix-{args.records}",
                          {"all": (0, 1), "main": (0, 0.7), "domain": (0.7, 1)})
    big_dir = args.cache_dir / f"corpus-{args.resume_records}"
    build_corpus(big_dir, args.resume_records, 0)
    big = reshard_parts(big_dir, args.cache_dir / f"mix-{args.resume_records}",
                        {"resume": (0, 1), "resume-main": (0, 0.7), "resume-domain": (0.7, 1)})
    print("mixing:", flush=True)
    mix_rows = mixing(paths, args.repeat)
    print("resume:", flush=True)
    resumed = resume(big, args.repeat)
    ratios = {}
    for fw in ("torch", "tf"):
        one, mixed = (next(r for r in mix_rows if r["framework"] == fw and r["reading"] == k)
                      for k in ("one dataset", "mixture 0.7/0.3"))
        ratios[fw] = mixed["samples_per_s"] / one["samples_per_s"]
    return {
        "benchmark": "mixtures",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": describe(["numpy", "torch", "tensorflow"]),
        "dlpipe_measured": dlpipe_checkout(),
        "load_average": list(os.getloadavg()),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"batch_size": BATCH, "repeat": args.repeat, "records": args.records,
                     "resume_records": args.resume_records},
        "mixing": mix_rows,
        "mixing_ratio": ratios,
        "resume": resumed,
        "targets": {
            **{f"{fw}: mixture / one dataset >= {MIX_GOAL}": r >= MIX_GOAL for fw, r in ratios.items()},
            **{f"{r['case']}: < {RESUME_GOAL_S} s": r["seconds"] < RESUME_GOAL_S
               for r in resumed["rows"] if "yardstick" not in r["case"]},
        },
    }


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Mixtures and resume",
        "",
        f"`{result['command']}` on {result['created']}; dlpipe {result['dlpipe_measured'].get('commit')}; "
        f"batch {s['batch_size']}, median of {s['repeat']} epochs after a warm-up epoch.",
        "",
        f"## Mixing two datasets vs reading one ({s['records']:,} records, shuffled)",
        "",
        "| framework | reading | samples/s |",
        "|---|---|---:|",
    ]
    for r in result["mixing"]:
        lines.append(f"| {r['framework']} | {r['reading']} | {r['samples_per_s']:,.0f} |")
    lines += ["", "| framework | mixture / one dataset | goal |", "|---|---:|---|"]
    for fw, ratio in result["mixing_ratio"].items():
        lines.append(f"| {fw} | {ratio:.2f} | >= {MIX_GOAL} {'PASS' if ratio >= MIX_GOAL else 'FAIL'} |")
    res = result["resume"]
    lines += ["", f"## Resume: fresh loader to its first batch ({res['records']:,} records, PyTorch, 2 workers, "
              f"halfway: {res['batches_skipped']:,} batches in)", "", "| case | seconds |", "|---|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['case']} | {r['seconds']:.3f} |")
    lines += ["", f"Loader state size (repr of an elastic state): {res['state_bytes']} bytes.", "", "Targets:", ""]
    lines += [f"- {k}: {'PASS' if ok else 'FAIL'}" for k, ok in result["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="mixing corpus size (default 200k)")
    parser.add_argument("--resume-records", type=int, default=1_000_000, help="resume dataset size (default 1M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return record(args.results_dir, "mixtures", lambda: run_all(args), render, render_only=args.render_only)


if __name__ == "__main__":
    raise SystemExit(main())
