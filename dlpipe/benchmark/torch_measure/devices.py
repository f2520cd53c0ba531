"""Data-parallel PyTorch over several devices (DDP, gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
from typing import Any

from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.machine import cpu_sets, keep_freed_memory, pin
from dlpipe.benchmark.torch_measure.device import (
    EPOCH_CHECK_BATCHES,
    _device,
    _Model,
    _sync,
    _torch,
)
from dlpipe.benchmark.torch_measure.stages import _check, _dlpipe_loader
from dlpipe.benchmark.torch_measure.timing import _drive, _Stream
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device_rank(rank: int, cfg_json: dict, port: int, out_dir: str, backend: str) -> None:
    keep_freed_memory()  # a spawned process: as the bench's own measuring processes
    torch = _torch()
    dist = torch.distributed
    cfg = BenchConfig.from_json(cfg_json)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        share = len(os.sched_getaffinity(0)) // cfg.devices
        if share:  # each rank on its own CPUs, as each GPU rank has its own cores: unpinned,
            pin(cpu_sets(cfg.devices)[rank])  # the ranks' threads migrate and halve throughput
        torch.set_num_threads(max(1, share))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.devices
    )
    try:
        loader = _dlpipe_loader(cfg, device, cfg.devices, rank)
        token = torch.zeros(1, device=device)

        # without gradients to all-reduce, a tiny all-reduce keeps the ranks in step as DDP does
        def in_step() -> None:
            dist.all_reduce(token)
            _sync(device)

        deepcal = parse_model_spec(cfg.model).kind == "deepcal"
        model = _Model(cfg.model, device, ddp=True, after_step=None if deepcal else in_step)
        run = _drive(lambda r: _Stream(loader, r), model, cfg, device)
        planned = len(loader)
        counted = sum(1 for _ in loader) if planned <= EPOCH_CHECK_BATCHES else None
        mine = {"rank": rank, "planned": planned, "counted": counted, "run": run}
        everyone: list[Any] = [None] * cfg.devices
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            with open(os.path.join(out_dir, "ranks.json"), "w") as f:
                json.dump(everyone, f)
    finally:
        dist.destroy_process_group()


def measure_devices(cfg: BenchConfig) -> FrameworkResult:
    """Data parallel over ``cfg.devices``: NCCL over GPUs (one process each) when the device is
    CUDA, else gloo over that many CPU processes; each rank its own dlpipe loader share."""
    _check(cfg)
    torch = _torch()
    if cfg.devices < 1:
        raise ConfigError(f"devices={cfg.devices!r}; must be >= 1")
    cuda = _device(cfg.device).type == "cuda"
    if cuda and cfg.devices > torch.cuda.device_count():
        raise ConfigError(
            f"devices={cfg.devices}, but {torch.cuda.device_count()} CUDA devices are visible"
        )
    backend = "nccl" if cuda else "gloo"
    with tempfile.TemporaryDirectory(prefix="dlpipe-ddp-") as tmp:
        torch.multiprocessing.spawn(
            _device_rank,
            args=(cfg.to_json(), _free_port(), tmp, backend),
            nprocs=cfg.devices,
            join=True,
        )
        with open(os.path.join(tmp, "ranks.json")) as f:
            ranks = json.load(f)
    runs = [r["run"] for r in ranks]
    # per repeat: all ranks' samples over the slowest rank's wall time
    walls = [max(r["wall"][i] for r in runs) for i in range(cfg.repeats)]
    sps = [sum(r["samples"][i] for r in runs) / walls[i] for i in range(cfg.repeats)]
    tps = [sum(r["tokens"][i] for r in runs) / walls[i] for i in range(cfg.repeats)]
    planned = [r["planned"] for r in ranks]
    counted = [r["counted"] for r in ranks]
    equal = len(set(planned)) == 1 and (None in counted or len(set(counted)) == 1)
    what = (
        "counted over a whole epoch" if None not in counted else "planned (epoch too long to count)"
    )
    spec = parse_model_spec(cfg.model)
    sync = "DDP-wrapped" if spec.kind == "deepcal" else "ranks kept in step by an all-reduce"
    if not cuda and len(os.sched_getaffinity(0)) >= cfg.devices:
        sync += f"; each rank pinned to its own CPU set of {len(os.sched_getaffinity(0)) // cfg.devices}"
    notes = [
        f"{backend} over {cfg.devices} {'GPUs' if cuda else 'CPU processes'}, model {spec}, {sync}",
        f"batches per rank per epoch ({what}): {counted if None not in counted else planned} -> "
        + ("equal on every rank" if equal else "NOT EQUAL: DDP would hang at the epoch's end"),
        f"per-rank samples/s (median): {[round(statistics.median(r['samples_per_s'])) for r in runs]}",
    ]
    return FrameworkResult(
        framework="torch",
        loader="dlpipe",
        samples_per_s=sps,
        tokens_per_s=tps,
        wait_s=runs[0]["wait_s"],
        compute_s=runs[0]["compute_s"],
        notes=notes,
        pipeline_queue_samples=runs[0]["queue"],
    )
