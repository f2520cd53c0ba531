"""The PyTorch measurer of ``dlpipe bench``: stages alone, the whole pipeline, baselines, devices.

The orchestrator calls the four functions of the contract (``dlpipe.benchmark.config``) in a
process pinned to its CPU share; each returns ``FrameworkResult``s. How each number is made:

- **Stages alone**, on the windows this rank reads first (enough for ``steps`` batches), each
  timed ``repeats`` times after one untimed pass (warm page cache), the median pass kept:
  ``read`` copies the windows' byte ranges out of the page cache (``np.fromfile``); ``parse`` is
  ``ShardReader.read`` (index, CRC, decode); ``shuffle`` the window permutation + ``take_rows``;
  ``batch`` the padding rule (``collate``); ``h2d`` the copy of finished batches to the device
  from pinned memory (pageable too, in a note; on CPU a ``clone()``: no transfer exists);
  ``step`` the model alone on the first batches. Latencies are per batch (a window's time is
  spread over its batches).
- **Pipeline**: ``repeats`` × (``warmup`` + ``steps``) batches from ``to_torch_dataloader`` into
  the model; per step the wait for the batch (its copy to the device included) and the model
  time. ``wait_s``/``compute_s`` are from the last repeat; ``pipeline_queue_samples`` counts the
  batches waiting in the DataLoader's result queue before each step (the "batch" stage's
  ``queue_capacity`` is ``num_workers × prefetch_factor``); none with ``num_workers=0``.
- ``model``: ``none`` (step 0: the feed rate), ``sleep:MS`` (the calibrated step, MLPerf-Storage
  style) or ``deepcal`` (the real train step, synchronized on CUDA so its time is real).
- **Baselines**: the padded source, one record per ``__getitem__`` (``PaddedRows``) through a
  ``DataLoader`` with default collate; every batch is the full padded width, and so is the step.
- **Devices**: one process per device (``torch.multiprocessing.spawn``), NCCL on GPUs or gloo on
  CPU, rank ``r`` of ``devices`` reading its own share (``cfg.world_size``/``rank`` are not used).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import drive, time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError

__all__ = ["PaddedRows", "calibrate_step", "measure_baselines", "measure_devices", "measure_dlpipe"]

PURPOSE = "dlpipe bench (PyTorch)"
PREFETCH_FACTOR = 2  # the DataLoader's default: batches in flight per worker
STEP_BUDGET_S = 2.0  # timing a model step alone stops after this long (after >= 3 steps)
EPOCH_CHECK_BATCHES = 4000  # measure_devices counts a whole epoch per rank up to this many batches


def _torch():
    return require("torch", PURPOSE)


def _device(name: str):
    torch = _torch()
    key = name.lower()
    if key == "cpu":
        return torch.device("cpu")
    if key in ("cuda", "gpu") or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}, but PyTorch sees no CUDA device; use device='cpu'")
        return torch.device("cuda" if key == "gpu" else key)
    raise ConfigError(f"device={name!r}; use 'cpu', 'cuda' or 'gpu'")


def _deepcal():
    _torch()
    try:
        return importlib.import_module("dlpipe.models.deepcal_torch")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("dlpipe.models"):
            raise
        raise ConfigError(
            "model='deepcal' needs dlpipe.models.deepcal_torch, which this dlpipe "
            "lacks; use model='sleep:MS' or 'none'"
        ) from None


def _sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Model:
    """The step a pipeline feeds: DeepCAL's train step, a SleepModel, or nothing."""

    def __init__(
        self, spec: str, device, *, ddp: bool = False, after_step: Callable[[], None] | None = None
    ) -> None:
        self.spec = parse_model_spec(spec)
        self.device = device
        self.after_step = after_step
        self.fn: Callable[[dict], None] | None = None
        if self.spec.kind == "sleep":
            sleep = self.spec.make_sleep_model()
            self.fn = lambda batch: sleep()
        elif self.spec.kind == "deepcal":
            torch = _torch()
            mod = _deepcal()
            net = mod.DeepCalTorch().to(device)
            if ddp:
                ids = [device.index] if device.type == "cuda" else None
                net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)

            def step(batch: dict) -> None:
                mod.torch_train_step(net, opt, batch, device)
                _sync(device)  # the step's real time, not its launch time

            self.fn = step

    @property
    def moves_batches(self) -> bool:
        """Whether the step copies batches to the device itself (DeepCAL's train step does)."""
        return self.spec.kind == "deepcal"

    def __call__(self, batch: dict) -> None:
        if self.fn is not None:
            self.fn(batch)
        if self.after_step is not None:
            self.after_step()


class _Stream:
    """Batches of a loader, epoch after epoch (``set_epoch`` then a fresh iterator), for ever."""

    def __init__(self, loader, epoch: int) -> None:
        self.loader, self.epoch, self.it = loader, epoch, None

    def __next__(self) -> Any:
        while True:
            if self.it is None:
                target = self.loader if hasattr(self.loader, "set_epoch") else self.loader.sampler
                if hasattr(target, "set_epoch"):
                    target.set_epoch(self.epoch)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def ready(self) -> int | None:
        """Batches finished by workers and not yet taken (None without workers). Reads private
        DataLoader state (``_data_queue``, ``_task_info``); None if that ever changes."""
        inner = getattr(self.it, "_inner", self.it)
        try:
            queued = inner._data_queue.qsize()
            stored = sum(len(v) == 2 for v in inner._task_info.values())
        except (AttributeError, NotImplementedError):
            return None
        return int(queued + stored)


def _drive(make_stream: Callable[[int], _Stream], model: _Model, cfg: BenchConfig, device) -> dict:
    """``benchmark.drive`` of ``model`` over fresh streams (see there for what is timed)."""
    move = device.type == "cuda" and not model.moves_batches

    def fetch(stream: _Stream):
        host = next(stream)
        return (_to(host, device) if move else host), host[MASK]

    def count(mask) -> tuple[int, int, int]:
        return len(mask), int(mask.sum()), mask.numel()

    return drive(make_stream, fetch, model, count, repeats=cfg.repeats, warmup=cfg.warmup, steps=cfg.steps,
                 depth=_Stream.ready)


def _time_step(
    model: _Model, batches: Sequence[dict], steps: int, *, widths: int = 8
) -> StageMeasurement:
    """The model alone on up to ``widths`` finished batches taken in turn (their widths as the
    data has them): each once untimed for DeepCAL (new shapes pick kernels, grow allocators),
    then up to ``steps`` steps, stopping after ``STEP_BUDGET_S`` (at least 3)."""
    batches = batches[:widths]
    for batch in batches if model.spec.kind == "deepcal" else batches[:1]:
        model(batch)
    lat: list[float] = []
    items = 0
    start = time.perf_counter()
    while len(lat) < max(steps, 3) and (
        len(lat) < 3 or time.perf_counter() - start < STEP_BUDGET_S
    ):
        batch = batches[len(lat) % len(batches)]
        t = time.perf_counter()
        model(batch)
        lat.append(time.perf_counter() - t)
        items += len(batch[MASK])
    return StageMeasurement("step", items, max(sum(lat), 1e-9), lat)


def _time_h2d(batches: list[dict], device, repeats: int, notes: list[str]) -> StageMeasurement:
    """Host-to-device copies of finished batches: pinned (the stage), pageable (a note)."""
    records = [(len(b[MASK]), 1) for b in batches]
    if device.type != "cuda":
        units = [
            (functools.partial(lambda b: {k: v.clone() for k, v in b.items()}, b), n, k)
            for b, (n, k) in zip(batches, records)
        ]
        notes.append("h2d: cpu: no transfer; timed as a clone() of each batch (a memcpy)")
        return time_units("h2d", units, repeats)

    def copy(b: dict) -> None:
        _to(b, device)
        _sync(device)

    pinned = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    stage = time_units(
        "h2d", [(functools.partial(copy, b), n, k) for b, (n, k) in zip(pinned, records)], repeats
    )
    pageable = time_units(
        "h2d", [(functools.partial(copy, b), n, k) for b, (n, k) in zip(batches, records)], repeats
    )
    notes.append(
        f"h2d: pinned {stage.capacity:,.0f} samples/s, pageable {pageable.capacity:,.0f} samples/s"
    )
    return stage


def _first_windows(loader_ds, cfg: BenchConfig) -> list:
    """This rank's first windows of epoch 0, enough for ``steps`` batches (all if fewer)."""
    windows = loader_ds.windows(0)
    need, got, out = max(cfg.steps, 1) * cfg.batch_size, 0, []
    for w in windows:
        out.append(w)
        got += w.num_records
        if got >= need:
            break
    if not out:
        raise ConfigError(f"rank {cfg.rank} of {cfg.world_size} has no records in {cfg.data!r}")
    return out


def _dlpipe_stages(
    cfg: BenchConfig, loader, model: _Model, device, notes: list[str]
) -> list[StageMeasurement]:
    from dlpipe.dataset import read_window
    from dlpipe.loaders.common import ShardReader, collate, take_rows, window_batches
    from dlpipe.loaders.torch_state import numpy_to_tensors

    ds = loader.dataset  # the ShardIterableDataset: the loader's own plan and settings
    info, shards, enc = ds.source.info, ds.source.shards, ds.encodings
    windows = _first_windows(ds, cfg)
    reader = ShardReader(info, ds.source.columns)
    reps = cfg.repeats

    # read: the bytes of the windows' records, copied out of the page cache
    spans, total_bytes = [], 0
    for w in windows:
        parts = []
        for s, a, b in w.ranges:
            path = os.path.join(info.root, shards[s].path)
            if info.compression is None:
                idx = reader.index(shards[s])
                off, end = int(idx[a, 0]), int(idx[b - 1, 0] + idx[b - 1, 1])
            else:  # a compressed shard is read whole and decompressed
                off, end = 0, os.path.getsize(path)
            parts.append((path, off, end - off))
            total_bytes += end - off
        spans.append(parts)

    def read(parts) -> None:
        for path, off, count in parts:
            np.fromfile(path, dtype=np.uint8, count=count, offset=off)

    stages = [
        time_units(
            "read",
            [
                (functools.partial(read, p), w.num_records, w.num_batches)
                for p, w in zip(spans, windows)
            ],
            reps,
        )
    ]
    records = sum(w.num_records for w in windows)
    notes.append(
        f"read: {total_bytes / stages[0].seconds / 1e6:,.0f} MB/s from the page cache, "
        f"{total_bytes / records:.0f} bytes per record"
    )

    stages.append(
        time_units(
            "parse",
            [
                (functools.partial(read_window, reader, shards, w), w.num_records, w.num_batches)
                for w in windows
            ],
            reps,
        )
    )
    cols = [read_window(reader, shards, w) for w in windows]
    plan = functools.partial(
        window_batches, batch_size=cfg.batch_size, shuffle=True, seed=ds.seed, epoch=0, rank=ds.rank
    )

    def shuffle(w, c) -> None:
        for rows in plan(w, None):
            for n in enc:
                take_rows(c[n], rows)

    stages.append(
        time_units(
            "shuffle",
            [
                (functools.partial(shuffle, w, c), w.num_records, w.num_batches)
                for w, c in zip(windows, cols)
            ],
            reps,
        )
    )
    taken = [
        (rows, {n: take_rows(c[n], rows) for n in enc})
        for w, c in zip(windows, cols)
        for rows in plan(w, None)
    ]
    pad = info.pad_values
    stages.append(
        time_units(
            "batch",
            [(functools.partial(collate, p, enc, pad), len(rows), 1) for rows, p in taken],
            reps,
        )
    )
    if cfg.num_workers:
        stages[-1].queue_capacity = cfg.num_workers * PREFETCH_FACTOR
    batches = [numpy_to_tensors(collate(p, enc, pad)) for _, p in taken]
    widths = [b[MASK].shape[1] for b in batches]
    notes.append(f"batch: padded to {np.mean(widths):.1f} tokens on average (longest in batch)")
    stages.append(_time_h2d(batches, device, reps, notes))
    if model.fn is not None:
        stages.append(_time_step(model, batches, cfg.steps))
    return stages


def _dlpipe_loader(cfg: BenchConfig, device, world_size: int, rank: int):
    import dlpipe

    return dlpipe.load_dataset(cfg.data, cfg.split).to_torch_dataloader(
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        world_size=world_size,
        rank=rank,
        pin_memory=device.type == "cuda",
    )


def _check(cfg: BenchConfig) -> None:
    for name in ("batch_size", "steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}; must be >= 1")
    if cfg.warmup < 0 or cfg.num_workers < 0:
        raise ConfigError(f"warmup={cfg.warmup!r} and num_workers={cfg.num_workers!r} must be >= 0")


def _pipeline_notes(run: dict, stages: list[StageMeasurement], notes: list[str]) -> None:
    """Token efficiency and the prefetch queue; the queue's samples go on the "batch" stage,
    the buffer they describe, so the ledger reports its depth."""
    notes.append(
        f"pipeline: real tokens are {sum(run['tokens_per_s']) / sum(run['padded_tokens_per_s']):.0%} "
        "of the tokens the model computes"
    )
    if run["queue"] is None:
        notes.append("queue depth: none (num_workers=0 makes each batch on demand in this process)")
        return
    for s in stages:
        if s.name == "batch":
            s.queue_depth_samples = list(run["queue"])
    notes.append(
        f"queue depth: {np.mean(run['queue']):.2f} batches ready on average before a step "
        "(DataLoader result queue)"
    )


def _result(loader: str, run: dict, stages, notes: list[str]) -> FrameworkResult:
    return FrameworkResult(
        framework="torch",
        loader=loader,
        samples_per_s=run["samples_per_s"],
        tokens_per_s=run["tokens_per_s"],
        stages=stages,
        pipeline_queue_samples=run.get("queue"),
        wait_s=run["wait_s"],
        compute_s=run["compute_s"],
        notes=notes,
    )


def calibrate_step(cfg: BenchConfig) -> float:
    """Median seconds of DeepCAL's real train step at ``batch_size`` on ``device``, on a batch
    of the dataset (its real lengths), after warm-up."""
    _check(cfg)
    device = _device(cfg.device)
    loader = _dlpipe_loader(BenchConfig(**{**cfg.to_json(), "num_workers": 0}), device, 1, 0)
    batches = [b for _, b in zip(range(8), loader)]
    stage = _time_step(_Model("deepcal", device), batches, cfg.steps)
    return float(statistics.median(stage.batch_latencies_s))


def measure_dlpipe(cfg: BenchConfig) -> FrameworkResult:
    """dlpipe's PyTorch loader: its stages alone, then the whole pipeline into the model."""
    _check(cfg)
    torch = _torch()
    device = _device(cfg.device)
    model = _Model(cfg.model, device)
    loader = _dlpipe_loader(cfg, device, cfg.world_size, cfg.rank)
    stands_in = model.spec.kind == "sleep" and cfg.step_s
    notes = [
        f"model {model.spec}"
        + (f" (stands in for a {cfg.step_s * 1e3:.1f} ms step)" if stands_in else ""),
        f"rank {cfg.rank} of {cfg.world_size}: {len(loader)} batches per epoch, "
        f"num_workers={cfg.num_workers}, torch threads {torch.get_num_threads()}",
    ]
    stages = _dlpipe_stages(cfg, loader, model, device, notes)
    run = _drive(lambda r: _Stream(loader, r), model, cfg, device)
    _pipeline_notes(run, stages, notes)
    if cfg.num_workers == 0:
        serial = 1 / sum(1 / s.capacity for s in stages if s.name in ("parse", "shuffle", "batch"))
        notes.append(
            f"num_workers=0: parse, shuffle and batch run one after another in this process, "
            f"so the feed is at most 1/sum(1/capacity) = {serial:,.0f} samples/s, not the "
            "constraint's capacity; read happens inside parse (memory-mapped shards)"
        )
    if cfg.profile_dir:
        _profile(cfg, loader, model, device)
        notes.append(f"profile: torch.profiler trace in {cfg.profile_dir} (tensorboard --logdir)")
    return _result("dlpipe", run, stages, notes)


def _profile(cfg: BenchConfig, loader, model: _Model, device) -> None:
    """A short pipeline run under torch.profiler, written for TensorBoard's profile plugin."""
    prof = _torch().profiler
    acts = [prof.ProfilerActivity.CPU] + (
        [prof.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    active = min(cfg.steps, 10)
    move = device.type == "cuda" and not model.moves_batches
    stream = _Stream(loader, cfg.repeats)
    with prof.profile(
        activities=acts,
        schedule=prof.schedule(wait=1, warmup=1, active=active, repeat=1),
        on_trace_ready=prof.tensorboard_trace_handler(cfg.profile_dir),
    ) as p:
        for _ in range(active + 2):
            with prof.record_function("dlpipe.wait_for_batch"):
                batch = next(stream)
                batch = _to(batch, device) if move else batch
            with prof.record_function("dlpipe.step"):
                model(batch)
            p.step()


# ---------------------------------------------------------------------------------------------
# the old way


class PaddedRows:
    """The old way: a map-style dataset of padded records (``input_ids.npy`` [N, L] memory-mapped,
    ``labels.npy``), one record per ``__getitem__``, the mask from ``input_ids != pad_id``."""

    def __init__(self, source: str, pad_id: int = 0) -> None:
        self.paths = [os.path.join(source, f"{c}.npy") for c in ("input_ids", "labels")]
        for p in self.paths:
            if not os.path.isfile(p):
                raise ConfigError(
                    f"source={source!r} lacks {os.path.basename(p)}; it needs input_ids.npy and labels.npy"
                )
        self.pad_id = pad_id
        self._cols: tuple[np.ndarray, np.ndarray] | None = None
        self.width = int(self._columns()[0].shape[1])

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cols is None:  # opened per process: a pickled memmap would copy all its data
            self._cols = tuple(np.load(p, mmap_mode="r") for p in self.paths)
        return self._cols

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cols": None}

    def __len__(self) -> int:
        return len(self._columns()[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, labels = self._columns()
        row = np.array(ids[i])
        return {
            "input_ids": row,
            MASK: (row != self.pad_id).astype(np.int64),
            "labels": np.array(labels[i], dtype=np.float32),
        }


def _padded_step(
    cfg: BenchConfig, batches: list[dict], device, notes: list[str], width: int
) -> float | None:
    """Where a sleep stands in for DeepCAL, the real step's seconds at the padded width: the old
    way pays for its padding in the step, so its stand-in sleeps that long."""
    if parse_model_spec(cfg.model).kind != "sleep" or not cfg.step_s:
        return None
    try:
        model = _Model("deepcal", device)
    except ConfigError:
        notes.append("step: DeepCAL not available; the padded step was not timed")
        return None
    padded = statistics.median(_time_step(model, batches, 3, widths=1).batch_latencies_s)
    notes.append(
        f"step: the real DeepCAL step at L={width} (padded) takes {padded * 1e3:.1f} ms, "
        f"{padded / cfg.step_s:.2f}x the {cfg.step_s * 1e3:.1f} ms on dlpipe's batches; "
        "the baseline's stand-in sleeps that long"
    )
    return padded


def measure_baselines(cfg: BenchConfig) -> list[FrameworkResult]:
    """The padded source through a map-style Dataset and ``DataLoader`` with default collate."""
    _check(cfg)
    if not cfg.source:
        raise ConfigError(
            "measure_baselines needs cfg.source, the padded input_ids.npy/labels.npy directory"
        )
    torch = _torch()
    from torch.utils.data import DataLoader, DistributedSampler, default_collate

    device = _device(cfg.device)
    model = _Model(cfg.model, device)
    data = PaddedRows(cfg.source)
    if cfg.world_size > 1:
        sampler = DistributedSampler(
            data, num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True, seed=cfg.seed
        )
        kw: dict[str, Any] = {"sampler": sampler}
    else:
        kw = {"shuffle": True, "generator": torch.Generator().manual_seed(cfg.seed)}
    loader = DataLoader(
        data,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        **kw,
    )
    notes = [
        f"model {model.spec}; every record padded to {data.width}",
        f"rank {cfg.rank} of {cfg.world_size}: {len(loader)} batches per epoch, num_workers={cfg.num_workers}",
    ]

    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.steps, max(1, len(data) // cfg.batch_size))
    index = [rng.choice(len(data), cfg.batch_size, replace=False) for _ in range(n)]
    stages = [
        time_units(
            "read",
            [
                (functools.partial(lambda ix: [data[int(i)] for i in ix], ix), len(ix), 1)
                for ix in index
            ],
            cfg.repeats,
        )
    ]
    rows = [[data[int(i)] for i in ix] for ix in index]
    stages.append(
        time_units(
            "batch", [(functools.partial(default_collate, r), len(r), 1) for r in rows], cfg.repeats
        )
    )
    if cfg.num_workers:
        stages[-1].queue_capacity = cfg.num_workers * PREFETCH_FACTOR
    batches = [default_collate(r) for r in rows]
    stages.append(_time_h2d(batches, device, cfg.repeats, notes))
    padded = _padded_step(cfg, batches, device, notes, data.width)
    if padded is not None:
        model = _Model(f"sleep:{padded * 1e3:.3f}", device)
        notes[0] = f"model {model.spec} (the real step at the padded width); every record padded to {data.width}"
    if model.fn is not None:
        stages.append(_time_step(model, batches, cfg.steps))
        if model.spec.kind == "deepcal":
            notes.append(f"step: at L={data.width} (padded) {stages[-1].capacity:,.0f} samples/s")
    run = _drive(lambda r: _Stream(loader, r), model, cfg, device)
    _pipeline_notes(run, stages, notes)
    return [_result("baseline-map-style", run, stages, notes)]


# ---------------------------------------------------------------------------------------------
# data parallel over every device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device_rank(rank: int, cfg_json: dict, port: int, out_dir: str, backend: str) -> None:
    torch = _torch()
    dist = torch.distributed
    cfg = BenchConfig.from_json(cfg_json)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:  # the ranks share this process's CPUs
        device = torch.device("cpu")
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // cfg.devices))
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
