"""The TensorFlow measurer of ``dlpipe bench``: stages alone, the whole pipeline, baselines, devices.

The orchestrator calls the four functions of the contract (``dlpipe.benchmark.config``) in a
process pinned to its CPU share; each returns ``FrameworkResult``s. How each number is made:

- **Stages alone**, as tf.data pipelines iterated eagerly (one ``next()`` per batch, as a training
  loop consumes them) over the first ``steps × batch_size`` records of this rank's shard files
  (file i belongs to rank i % world_size); each pipeline is iterated once untimed (page cache,
  ``cache()`` filled) and then ``repeats`` times, the median pass kept. ``read``:
  ``TFRecordDataset`` unparsed (records grouped into batches of serialized strings so Python
  sees one element per batch), or for shuffled uncompressed shards the loader's read through the
  epoch plan (``loaders.tf_plan``); ``parse``: ``tf.io.parse_example`` + decode to ragged columns
  on cached batches of serialized records; ``shuffle``: the plan's permutation and gather of
  serialized records on windows read beforehand (compressed shards: ``shuffle(1000)`` over
  cached serialized records, then grouped into batches); ``batch``: ``padded_batch`` (padding to the batch's
  longest record, the padding rule, with the mask) over cached parsed records; ``h2d``: prepared
  batches copied to the GPU (``tf.identity`` under ``tf.device``, synchronized by reading back a
  scalar), on CPU a ``DeepCopy`` (no transfer exists); ``step``: the model alone on one batch.
- **Pipeline**: ``repeats`` × (``warmup`` + ``steps``) batches of ``to_tf_dataset`` into the model;
  per step the wait in ``next(iterator)`` (plus the copy to the GPU for a stand-in model) and the
  model time, forced to finish with ``.numpy()``. ``wait_s``/``compute_s`` are the last repeat's.
  tf.data exposes no prefetch-buffer occupancy (``StatsOptions`` is gone from TF 2.x), so
  ``pipeline_queue_samples`` is None.
- ``model``: ``none`` (the feed rate), ``sleep:MS`` (the calibrated step, MLPerf-Storage style) or
  ``deepcal`` (``dlpipe.models.deepcal_tf``'s real train step).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.drive import drive, time_units
from dlpipe.benchmark.ledger import StageMeasurement
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.defaults import SHUFFLE_BUFFER
from dlpipe.errors import ConfigError, DlpipeError

__all__ = ["calibrate_step", "measure_baselines", "measure_devices", "measure_dlpipe"]

PURPOSE = "dlpipe bench (TensorFlow)"
FEATURE, LABEL = "input_ids", "labels"
STEP_BUDGET_S = 2.0  # timing a model step alone stops after this long (after >= 3 steps)
HF_MAX_ROWS = 50_000  # the HF baseline converts at most this many padded rows to Arrow
PROFILE_STEPS = 10
STEP_BATCHES = 8  # a model step alone cycles over this many batches, so over their real widths
DEVICES_TIMEOUT_S = 900


def _tf():
    return require("tensorflow", PURPOSE)


def _device(name: str) -> str:
    """The TF device string for ``cfg.device``: '/CPU:0' or '/GPU:i'."""
    key = name.lower()
    if key == "cpu":
        return "/CPU:0"
    if key in ("cuda", "gpu") or key.startswith(("cuda:", "gpu:")):
        index = int(key.split(":", 1)[1]) if ":" in key else 0
        found = len(_tf().config.list_logical_devices("GPU"))
        if index >= found:
            raise ConfigError(
                f"device={name!r}, but TensorFlow sees {found} GPU(s); use device='cpu'"
            )
        return f"/GPU:{index}"
    raise ConfigError(f"device={name!r}; use 'cpu', 'cuda' or 'gpu'")


def _is_gpu(device: str) -> bool:
    return "GPU" in device


def _check(cfg: BenchConfig) -> None:
    for name in ("batch_size", "steps", "repeats", "world_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}; must be >= 1")
    if cfg.warmup < 0:
        raise ConfigError(f"warmup={cfg.warmup!r}; must be >= 0")
    if not 0 <= cfg.rank < cfg.world_size:
        raise ConfigError(f"rank={cfg.rank!r} is outside world_size={cfg.world_size!r}")


def _deepcal():
    return require("dlpipe.models.deepcal_tf", "dlpipe bench --model deepcal (TensorFlow)")


def _sync(tensor) -> None:
    """Wait for the device work that produced ``tensor``: read one element back to the host."""
    tf = _tf()
    with tf.device(tensor.device):
        tf.reduce_sum(tf.reshape(tensor, [-1])[:1]).numpy()


def _to_device(features: dict, device: str) -> dict:
    tf = _tf()
    with tf.device(device):
        out = {k: tf.identity(v) for k, v in features.items()}
    _sync(out[MASK])
    return out


def _on_device(batches: list, device: str) -> list:
    """(features, labels) batches with their features copied to ``device`` when it is a GPU."""
    return [(_to_device(f, device) if _is_gpu(device) else f, y) for f, y in batches]


class _Model:
    """The step a pipeline feeds: DeepCAL's train step, a SleepModel, or nothing."""

    def __init__(self, spec: str, device: str) -> None:
        self.spec = parse_model_spec(spec)
        self.device = device
        self.fn: Callable[[dict, Any], None] | None = None
        if self.spec.kind == "sleep":
            sleep = self.spec.make_sleep_model()
            self.fn = lambda features, labels: sleep()
        elif self.spec.kind == "deepcal":
            tf = _tf()
            mod = _deepcal()
            with tf.device(device):
                self.net = mod.build_tf_model()
                step = mod.tf_train_step(self.net, tf.keras.optimizers.Adam(1e-3))

            def run(features: dict, labels) -> None:
                with tf.device(device):
                    loss = step(features, labels)
                loss.numpy()  # the step's real time, not its launch time

            self.fn = run

    def __call__(self, features: dict, labels) -> None:
        if self.fn is not None:
            self.fn(features, labels)


def _split(element, pad_id: int = 0) -> tuple[dict, Any]:
    """(features with input_ids and attention_mask, labels) from what a loader yields: HF-style
    ``(features, labels)`` where either may be a lone tensor, or one dict holding the labels."""
    tf = _tf()
    if isinstance(element, tuple) and len(element) == 2:
        features, labels = element
    else:
        features = {k: v for k, v in element.items() if k != LABEL}
        labels = element[LABEL]
    if not isinstance(features, dict):
        features = {FEATURE: features}
    if isinstance(labels, dict) and len(labels) == 1:
        labels = next(iter(labels.values()))
    if MASK not in features:  # the padded sources carry no mask; it is the non-pad positions
        features = {**features, MASK: tf.cast(tf.not_equal(features[FEATURE], pad_id), tf.int64)}
    return features, labels


class _Stream:
    """Batches of an iterable (a tf.data or distributed dataset), epoch after epoch, for ever."""

    def __init__(self, dataset) -> None:
        self.dataset, self.it, self.fresh = dataset, None, True

    def __next__(self):
        while True:
            if self.it is None:
                self.it, self.fresh = iter(self.dataset), True
            try:
                element = next(self.it)
            except StopIteration:
                if self.fresh:
                    raise ConfigError(
                        "the dataset yielded no batches; is this rank's share empty?"
                    ) from None
                self.it = None
                continue
            self.fresh = False
            return element


def _drive(
    make_stream: Callable[[], _Stream], model: _Model, cfg: BenchConfig, device: str
) -> dict:
    """``benchmark.drive`` of ``model`` over fresh streams (see there for what is timed)."""
    move = _is_gpu(device) and model.spec.kind != "deepcal"

    def fetch(stream: _Stream):
        features, labels = _split(next(stream))
        mask = features[MASK]
        return ((_to_device(features, device) if move else features), labels), mask

    def count(mask) -> tuple[int, int, int]:
        m = mask.numpy()
        return m.shape[0], int(np.count_nonzero(m)), m.size

    return drive(lambda r: make_stream(), fetch, lambda batch: model(*batch), count,
                 repeats=cfg.repeats, warmup=cfg.warmup, steps=cfg.steps)


def _time_dataset(name: str, dataset, repeats: int) -> StageMeasurement:
    """Iterate ``dataset`` eagerly once untimed, then ``repeats`` times; keep the median pass.

    A pass's time is the sum of its ``next()`` calls (the iterator's creation is not counted);
    items are records (the leading dimension of the first component of each batch)."""
    tf = _tf()

    def one_pass() -> tuple[float, list[float], int]:
        lat, items = [], 0
        it = iter(dataset)
        while True:
            t = time.perf_counter()
            try:
                element = next(it)
            except StopIteration:
                break
            lat.append(time.perf_counter() - t)
            items += int(tf.nest.flatten(element)[0].shape[0])
        return sum(lat), lat, items

    one_pass()
    passes = sorted((one_pass() for _ in range(max(1, repeats))), key=lambda p: p[0])
    total, lat, items = passes[len(passes) // 2]
    if not items:
        raise ConfigError(f"stage {name!r}: the dataset yielded no records")
    return StageMeasurement(name, items, max(total, 1e-9), lat)


def _time_step(name: str, model: _Model, batches: list, cfg: BenchConfig) -> StageMeasurement:
    """The model alone, cycling over ``batches`` (their real widths): each once untimed (a graph
    per shape traced), then up to ``steps`` steps within the budget."""
    for features, labels in batches * (2 if len(batches) == 1 else 1):
        model(features, labels)
    lat: list[float] = []
    records = 0
    start = time.perf_counter()
    while len(lat) < max(cfg.steps, 3) and (
        len(lat) < 3 or time.perf_counter() - start < STEP_BUDGET_S
    ):
        features, labels = batches[len(lat) % len(batches)]
        t = time.perf_counter()
        model(features, labels)
        lat.append(time.perf_counter() - t)
        records += int(features[MASK].shape[0])
    return StageMeasurement(name, records, max(sum(lat), 1e-9), lat)


def _time_h2d(batches: list, device: str, repeats: int, notes: list[str]) -> StageMeasurement:
    """Copies of prepared batches to the device, synchronized; on CPU a deep copy (no transfer)."""
    tf = _tf()
    if _is_gpu(device):
        copy = lambda features: _to_device(features, device)  # noqa: E731
    else:

        def copy(features: dict) -> dict:
            return {k: tf.raw_ops.DeepCopy(x=v) for k, v in features.items()}

        notes.append("h2d: cpu: no transfer; timed as a DeepCopy of each batch (a memcpy)")
    for features, _ in batches:
        copy(features)
    passes = []
    for _ in range(max(1, repeats)):
        lat = []
        for features, _ in batches:
            t = time.perf_counter()
            copy(features)
            lat.append(time.perf_counter() - t)
        passes.append((sum(lat), lat))
    passes.sort(key=lambda p: p[0])
    total, lat = passes[len(passes) // 2]
    records = sum(int(f[MASK].shape[0]) for f, _ in batches)
    return StageMeasurement("h2d", records, max(total, 1e-9), lat)


# ---------------------------------------------------------------------------------------------
# dlpipe's pipeline


def _rank_files(info, cfg: BenchConfig) -> list[str]:
    shards = info.split_shards(cfg.split)
    files = [
        os.path.join(info.root, s.path)
        for i, s in enumerate(shards)
        if i % cfg.world_size == cfg.rank
    ]
    if not files:
        raise ConfigError(f"rank {cfg.rank} of {cfg.world_size} has no shard files in {cfg.data!r} "
                          f"({len(shards)} shards); use world_size <= {len(shards)}")  # fmt: skip
    return files


def _compression(info) -> str:
    return {None: "", "gzip": "GZIP", "zlib": "ZLIB"}.get(info.compression, "")


def _dlpipe_stages(
    cfg: BenchConfig, info, model: _Model, device: str, notes: list[str]
) -> list[StageMeasurement]:
    from dlpipe.loaders.tf_data import BatchDecoder

    tf = _tf()
    auto = tf.data.AUTOTUNE
    files = _rank_files(info, cfg)
    n, reps, bs, comp = cfg.steps * cfg.batch_size, cfg.repeats, cfg.batch_size, _compression(info)
    # read as the loader reads: files interleaved (up to 16 at once) in blocks of serialized
    # records, parallel, in a fixed order, then rebatched to the batch size
    from dlpipe.loaders.tf_data import _BLOCK

    blocks = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=comp).batch(_BLOCK),
        cycle_length=min(len(files), 16), num_parallel_calls=auto, deterministic=True,
    )  # fmt: skip
    records = blocks.unbatch().take(n)  # the later stages start from these records, cached
    shuffled = _planned(cfg)  # the loader's shuffled read (loaders.tf_plan), when it takes that path
    if shuffled is None:
        stages = [_time_dataset("read", blocks.rebatch(bs).take(-(-n // bs)), reps)]
    else:
        stages = [_time_dataset("read", shuffled.take(-(-n // bs)), reps)]
        notes.append("read: shuffled uncompressed shards are read as to_tf_dataset reads them, through the "
                     "epoch plan (dlpipe's reader gathers each batch's serialized records from blocks permuted "
                     "across the split; one generator element per ~8k records, cut with tf.strings.substr), "
                     "which includes the shuffle; shuffle: the plan's permutation and gather alone, on "
                     "windows read beforehand")  # fmt: skip
    plain = _time_dataset(
        "read", tf.data.TFRecordDataset(files, compression_type=comp).take(n).batch(bs), 1
    )
    nbytes = sum(os.path.getsize(f) for f in files)
    notes.append(f"read: {len(files)} shard file(s) of this rank ({nbytes / 1e6:.1f} MB) interleaved as "
                 f"to_tf_dataset does (blocks of {_BLOCK} serialized records, rebatched), one element per "
                 f"batch; one TFRecordDataset reading the files in turn: "
                 f"{plain.capacity:,.0f} records/s")  # fmt: skip

    encodings = {c: info.columns[c] for c in (FEATURE, LABEL)}
    decoder = BatchDecoder(encodings, info.pad_values, pad_to_multiple_of=None, boundaries=None,
                           padding_side="right", return_attention_mask=True)  # fmt: skip
    serialized = records.batch(bs).cache()
    stages.append(
        _time_dataset("parse", serialized.map(decoder.ragged, num_parallel_calls=auto), reps)
    )
    if shuffled is None:
        stages.append(_time_dataset("shuffle", records.cache().shuffle(SHUFFLE_BUFFER, seed=cfg.seed).batch(bs), reps))
    else:
        stages.append(_plan_shuffle_stage(cfg, n, reps))

    pad = info.pad_values.get(FEATURE, 0)

    def padded(rows: dict):
        ids = rows[FEATURE].to_tensor(tf.cast(pad, rows[FEATURE].dtype))  # the longest row's width
        mask = tf.sequence_mask(rows[FEATURE].row_lengths(), tf.shape(ids, out_type=tf.int64)[1])
        return {FEATURE: ids, MASK: tf.cast(mask, tf.int64)}, rows[LABEL]

    batched = serialized.map(decoder.ragged).cache().map(padded, num_parallel_calls=auto)
    stages.append(_time_dataset("batch", batched, reps))
    notes.append(f"parse: the loader's BatchDecoder.ragged (parse_example + decode, no padding) on cached "
                 f"batches of {bs} serialized records; batch: those rows padded to the batch's longest "
                 "with the mask (the loader fuses this into its parse); both num_parallel_calls=AUTOTUNE")  # fmt: skip

    prepared = list(batched)
    widths = [int(f[MASK].shape[1]) for f, _ in prepared]
    notes.append(f"batch: padded to {np.mean(widths):.1f} tokens on average (longest in batch)")
    stages.append(_time_h2d(prepared, device, reps, notes))
    if model.fn is not None:
        stages.append(_time_step("step", model, _on_device(prepared[:STEP_BATCHES], device), cfg))
    return stages


def _plan_shuffle_stage(cfg: BenchConfig, n: int, reps: int) -> StageMeasurement:
    """The shuffled loader's own shuffle work: each window's record permutation and the gather
    of its batches' serialized records (windows read beforehand)."""
    import dlpipe
    from dlpipe.loaders.common import epoch_windows, window_batches
    from dlpipe.loaders.shard_reader import gather_bytes, read_windows

    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    if cfg.world_size > 1:
        ds = _shard_files(ds, cfg.world_size, cfg.rank)
    windows = epoch_windows([s.num_records for s in ds.shards], batch_size=cfg.batch_size, shuffle=True,
                            seed=cfg.seed, window_batches=max(1, -(-ds.buffer_size // cfg.batch_size)),
                            block_records=ds.block_records)  # fmt: skip
    todo, total = [], 0
    for w in windows:
        if total >= n:
            break
        todo.append(w)
        total += w.num_records
    read = list(read_windows(ds.reader(), ds.shards, todo, serialized=True))

    def shuffle(w, buf, starts, ends) -> None:
        for rows in window_batches(w, None, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0, rank=0):
            gather_bytes(buf, starts[rows], ends[rows])

    units = [(functools.partial(shuffle, w, *r), w.num_records, w.num_batches) for w, r in zip(todo, read)]
    return time_units("shuffle", units, reps)


def _planned(cfg: BenchConfig):
    """Serialized batches of this rank's shards as the shuffled loader reads them (the epoch plan,
    ``loaders.tf_plan``), or None where ``to_tf_dataset`` reads files front to back instead."""
    import dlpipe
    from dlpipe.loaders.tf_plan import planned_batches

    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    if ds.block_records is None:
        return None
    if cfg.world_size > 1:
        ds = _shard_files(ds, cfg.world_size, cfg.rank)
    return planned_batches(ds, cfg.batch_size, seed=cfg.seed, drop_remainder=False)


def _dlpipe_dataset(cfg: BenchConfig, *, batch_size: int | None = None, world_size: int | None = None,
                    rank: int | None = None, notes: list[str] | None = None):  # fmt: skip
    """``to_tf_dataset`` over this rank's share; the loader's own rank options when it has them,
    else a dataset restricted to this rank's shard files."""
    import dlpipe
    from dlpipe.loaders.tf_data import to_tf_dataset

    world_size = cfg.world_size if world_size is None else world_size
    rank = cfg.rank if rank is None else rank
    ds = dlpipe.load_dataset(cfg.data, cfg.split)
    params = inspect.signature(to_tf_dataset).parameters
    kw: dict[str, Any] = {"batch_size": batch_size or cfg.batch_size, "columns": [FEATURE, MASK],
                          "label_cols": [LABEL], "shuffle": True, "prefetch": True}  # fmt: skip
    if "seed" in params:
        kw["seed"] = cfg.seed
    how = "single process"
    if world_size > 1 and {"world_size", "rank"} <= set(params):
        kw.update(world_size=world_size, rank=rank)
        how = f"rank {rank} of {world_size} via to_tf_dataset(world_size=, rank=)"
    elif world_size > 1:
        ds = _shard_files(ds, world_size, rank)
        how = f"rank {rank} of {world_size}: shard files i % {world_size} == {rank} ({len(ds.shards)} files)"
    if notes is not None:
        notes.append(
            f"pipeline: to_tf_dataset({', '.join(f'{k}={v!r}' for k, v in kw.items())}); {how}"
        )
    return to_tf_dataset(ds, **kw)


def _shard_files(ds, world_size: int, rank: int):
    import copy

    out = copy.copy(ds)
    out.shards = [s for i, s in enumerate(ds.shards) if i % world_size == rank]
    if not out.shards:
        raise ConfigError(
            f"rank {rank} of {world_size} gets none of the {len(ds.shards)} shard files"
        )
    return out


def _result(loader: str, run: dict, stages, notes: list[str]) -> FrameworkResult:
    return FrameworkResult(
        framework="tf", loader=loader, samples_per_s=run["samples_per_s"], tokens_per_s=run["tokens_per_s"],
        stages=stages, pipeline_queue_samples=None, wait_s=run.get("wait_s", []),
        compute_s=run.get("compute_s", []), notes=notes,
    )  # fmt: skip


def _padding_note(run: dict) -> str:
    share = sum(run["tokens_per_s"]) / max(sum(run["padded_tokens_per_s"]), 1e-9)
    return f"pipeline: real tokens are {share:.0%} of the tokens the model computes"


def calibrate_step(cfg: BenchConfig) -> float:
    """Median seconds of DeepCAL's real train step at ``batch_size`` on ``device``, on a batch of
    the dataset (its real lengths), after warm-up."""
    _check(cfg)
    device = _device(cfg.device)
    batches = [_split(b) for b in _dlpipe_dataset(cfg, world_size=1, rank=0).take(STEP_BATCHES)]
    stage = _time_step("step", _Model("deepcal", device), _on_device(batches, device), cfg)
    return float(statistics.median(stage.batch_latencies_s))


def measure_dlpipe(cfg: BenchConfig) -> FrameworkResult:
    """dlpipe's tf.data loader: its stages alone, then the whole pipeline into the model."""
    from dlpipe.manifest import load_manifest

    _check(cfg)
    tf = _tf()
    device = _device(cfg.device)
    model = _Model(cfg.model, device)
    info = load_manifest(cfg.data)
    threads = tf.config.threading.get_inter_op_parallelism_threads() or len(os.sched_getaffinity(0))
    notes = [f"model {model.spec}" + (f" (stands in for a {cfg.step_s * 1e3:.1f} ms step)" if cfg.step_s else ""),
             f"device {device}, {len(os.sched_getaffinity(0))} CPUs in this process's set, "
             f"inter-op threads {threads}"]  # fmt: skip
    stages = _dlpipe_stages(cfg, info, model, device, notes)
    dataset = _dlpipe_dataset(cfg, notes=notes)
    run = _drive(lambda: _Stream(dataset), model, cfg, device)
    notes.append(_padding_note(run))
    notes.append("queue depth: not sampled (tf.data exposes no prefetch-buffer occupancy in TF 2.x; "
                 "StatsOptions was removed); see --profile for tf.data's own analysis")  # fmt: skip
    if cfg.profile_dir:
        _profile(cfg, dataset, model, device)
        notes.append(
            f"profile: tf.profiler trace in {cfg.profile_dir} (tensorboard --logdir, Profile tab)"
        )
    return _result("dlpipe", run, stages, notes)


def _profile(cfg: BenchConfig, dataset, model: _Model, device: str) -> None:
    """A short pipeline run under the TF profiler (``plugins/profile/<run>/*.xplane.pb``)."""
    tf = _tf()
    prof = tf.profiler.experimental
    stream = _Stream(dataset)
    move = _is_gpu(device) and model.spec.kind != "deepcal"
    prof.start(cfg.profile_dir)
    try:
        for i in range(min(cfg.steps, PROFILE_STEPS) + 2):
            with prof.Trace("train", step_num=i, _r=1):
                with prof.Trace("dlpipe.wait_for_batch"):
                    features, labels = _split(next(stream))
                    features = _to_device(features, device) if move else features
                with prof.Trace("dlpipe.step"):
                    model(features, labels)
    finally:
        prof.stop()


# ---------------------------------------------------------------------------------------------
# the old ways: the padded source


def _padded_source(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not cfg.source:
        raise ConfigError(
            "measure_baselines needs cfg.source, the padded input_ids.npy/labels.npy directory"
        )
    paths = [os.path.join(cfg.source, f"{c}.npy") for c in (FEATURE, LABEL)]
    for p in paths:
        if not os.path.isfile(p):
            raise ConfigError(
                f"source={cfg.source!r} lacks {os.path.basename(p)}; it needs input_ids.npy and labels.npy"
            )
    ids, labels = (np.load(p, mmap_mode="r") for p in paths)
    notes = [f"padded source: {len(ids):,} records, every one padded to {ids.shape[1]}"]
    if cfg.world_size > 1:
        ids, labels = ids[cfg.rank :: cfg.world_size], labels[cfg.rank :: cfg.world_size]
        notes.append(
            f"rank {cfg.rank} of {cfg.world_size}: rows i % {cfg.world_size} == {cfg.rank}"
        )
    return np.ascontiguousarray(ids), np.ascontiguousarray(labels, dtype=np.float32), notes


def _keras_fit(
    cfg: BenchConfig, ids: np.ndarray, labels: np.ndarray, device: str, notes: list[str]
) -> FrameworkResult:
    """``model.fit`` on NumPy arrays; epochs timed by a callback (after a warm-up fit)."""
    tf = _tf()
    keras = tf.keras
    spec = parse_model_spec(cfg.model)
    sleep = spec.make_sleep_model()
    times: dict[str, list[float]] = {
        "epoch": [],
        "batches": [],
        "begin": [],
        "end": [],
        "sleep": [],
    }

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            times["epoch"].append(-time.perf_counter())
            times["batches"].append(0)

        def on_epoch_end(self, epoch, logs=None):
            times["epoch"][-1] += time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            times["begin"].append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            times["end"].append(time.perf_counter())
            times["batches"][-1] += 1
            if sleep is not None:  # the stand-in step, after Keras has fetched the batch
                sleep()
                times["sleep"].append(time.perf_counter() - times["end"][-1])

    with tf.device(device):
        if spec.kind == "deepcal":
            mod = _deepcal()
            net = mod.build_tf_model()
            net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=getattr(mod, "TF_LOSS", "mse"))
        else:
            net = _input_only_model()
    x = {FEATURE: ids, MASK: (ids != 0).astype(np.int64)}
    fit = {
        "x": x,
        "y": labels,
        "batch_size": cfg.batch_size,
        "verbose": 0,
        "shuffle": True,
        "callbacks": [Timer()],
    }
    # one fit call per repeat, one epoch each, at most one pass over the arrays: Keras stops
    # training (with a warning) when arrays run out before steps_per_epoch x epochs batches
    steps = min(cfg.steps, -(-len(ids) // cfg.batch_size))
    t = time.perf_counter()
    net.fit(steps_per_epoch=min(max(cfg.warmup, 1), steps), epochs=1, **fit)
    warm_s = time.perf_counter() - t
    for v in times.values():
        v.clear()
    t = time.perf_counter()
    for _ in range(cfg.repeats):
        net.fit(steps_per_epoch=steps, epochs=1, **fit)
    outside = (time.perf_counter() - t - sum(times["epoch"])) / cfg.repeats
    sps = [min(b * cfg.batch_size, len(ids)) / s for b, s in zip(times["batches"], times["epoch"])]
    real = float((ids != 0).sum()) / len(ids)
    notes += [f"model.fit on NumPy arrays, one fit call of {steps} steps (one epoch) per repeat; the first "
              f"fit ({max(cfg.warmup, 1)} steps: tracing, the arrays' conversion) took {warm_s:.2f} s; "
              f"each later fit spent {outside:.2f} s outside its epoch (converting the arrays again)",
              f"tokens/s: samples/s x the source's mean real length ({real:.1f})"]  # fmt: skip
    run = {"samples_per_s": sps, "tokens_per_s": [s * real for s in sps]}
    if sleep is not None:  # a batch's wait is Keras's fetch + a no-op step; compute is the sleep
        run["wait_s"] = [e - b for b, e in zip(times["begin"], times["end"])][-steps:]
        run["compute_s"] = times["sleep"][-steps:]
    else:
        notes.append(
            "wait/compute: not separable inside model.fit (the fetch runs in the train function)"
        )
    return _result("baseline-keras-numpy", run, [], notes)


def _input_only_model():
    """A Keras model whose train step only touches the batch: ``fit``'s input path alone."""
    tf = _tf()
    keras = tf.keras

    class InputOnly(keras.Model):
        def call(self, inputs):
            return inputs[MASK]

        def train_step(self, data):
            x, _ = data
            return {"tokens": tf.reduce_sum(x[MASK])}

    net = InputOnly()
    net.compile()
    return net


def _baseline_stages(
    cfg: BenchConfig, dataset, model: _Model, device: str, notes: list[str]
) -> list:
    """The baseline's input path alone (``batch``: everything before the model) and, for a real or
    stand-in model, the step on a padded batch."""
    stages = [_time_dataset("batch", dataset.take(cfg.steps), cfg.repeats)]
    if model.fn is not None:
        features, labels = _split(next(iter(dataset)))
        stages.append(_time_step("step", model, _on_device([(features, labels)], device), cfg))
        width = int(features[FEATURE].shape[1])
        notes.append(f"step: at L={width} (padded) {stages[-1].capacity:,.0f} samples/s")
    return stages


def _padded_deepcal_note(cfg: BenchConfig, ids, mask, labels, device: str) -> tuple[str, float | None]:
    """What a shared sleep would hide: the real DeepCAL step on a padded batch (its seconds, which
    the baselines' stand-in then sleeps), against ``cfg.step_s`` (the step at real lengths)."""
    try:
        _deepcal()
    except ImportError:
        return "step: no DeepCAL model to time at the padded width (dlpipe.models.deepcal_tf is missing)", None
    tf = _tf()
    n = cfg.batch_size
    batch = ({FEATURE: tf.constant(ids[:n]), MASK: tf.constant(mask[:n])}, tf.constant(labels[:n]))
    stage = _time_step("step", _Model("deepcal", device), _on_device([batch], device), cfg)
    padded = statistics.median(stage.batch_latencies_s)
    text = f"step: the real DeepCAL step at L={ids.shape[1]} (padded) takes {padded * 1e3:.1f} ms"
    if cfg.step_s:
        text += (f" vs {cfg.step_s * 1e3:.1f} ms at the real lengths ({padded / cfg.step_s:.2f}x); the "
                 "baseline's stand-in sleeps for the padded step")  # fmt: skip
    return text, padded


def measure_baselines(cfg: BenchConfig) -> list[FrameworkResult]:
    """The padded source fed the old ways: ``model.fit`` on NumPy, ``from_tensor_slices``, HF's
    ``Dataset.to_tf_dataset``; each at the same batch size into the same model."""
    _check(cfg)
    tf = _tf()
    device = _device(cfg.device)
    ids, labels, source_notes = _padded_source(cfg)
    model = _Model(cfg.model, device)
    mask = (ids != 0).astype(np.int64)
    if model.spec.kind == "sleep":
        note, padded = _padded_deepcal_note(cfg, ids, mask, labels, device)
        source_notes.append(note)
        if padded is not None:  # the old way pays for its padding in the step
            cfg = dataclasses.replace(cfg, model=f"sleep:{padded * 1e3:.3f}")
            model = _Model(cfg.model, device)
    out = [_keras_fit(cfg, ids, labels, device, list(source_notes))]

    slices = (tf.data.Dataset.from_tensor_slices(({FEATURE: ids, MASK: mask}, labels))
              .shuffle(SHUFFLE_BUFFER, seed=cfg.seed).batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE))  # fmt: skip
    notes = source_notes + [
        f"from_tensor_slices -> shuffle({SHUFFLE_BUFFER}) -> batch -> prefetch(AUTOTUNE)"
    ]
    stages = _baseline_stages(cfg, slices, model, device, notes)
    run = _drive(lambda: _Stream(slices), model, cfg, device)
    out.append(_result("baseline-from-tensor-slices", run, stages, notes + [_padding_note(run)]))

    datasets = require("datasets", "dlpipe bench's HF to_tf_dataset baseline")
    n = min(len(ids), HF_MAX_ROWS)
    t = time.perf_counter()
    hf = datasets.Dataset.from_dict({FEATURE: ids[:n], LABEL: labels[:n]})
    # names, not one-element lists: the same (tensor, tensor) batches without HF's FutureWarning
    hf_tf = hf.to_tf_dataset(
        batch_size=cfg.batch_size, columns=FEATURE, label_cols=LABEL, shuffle=True
    )
    notes = source_notes + [f"HF Dataset.from_dict of the first {n:,} padded rows ({time.perf_counter() - t:.1f} s "
                            "with to_tf_dataset), columns='input_ids', label_cols='labels', shuffle=True; "
                            "attention_mask = input_ids != 0 computed per batch"]  # fmt: skip
    stages = _baseline_stages(cfg, hf_tf, model, device, notes)
    run = _drive(lambda: _Stream(hf_tf), model, cfg, device)
    out.append(_result("baseline-hf-to-tf-dataset", run, stages, notes + [_padding_note(run)]))
    return out


# ---------------------------------------------------------------------------------------------
# data parallel over every device: MirroredStrategy in a fresh process


def measure_devices(cfg: BenchConfig) -> FrameworkResult:
    """``MirroredStrategy`` over the GPUs, else over ``cfg.devices`` logical CPU devices. Logical
    devices must be configured before TensorFlow initializes any, so this runs in a new process."""
    _check(cfg)
    if cfg.devices < 1:
        raise ConfigError(f"devices={cfg.devices!r}; must be >= 1")
    with tempfile.TemporaryDirectory(prefix="dlpipe-tf-devices-") as tmp:
        out = os.path.join(tmp, "result.json")
        code = "import sys; from dlpipe.benchmark.tf_bench import _devices_main; sys.exit(_devices_main(sys.argv[1]))"
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-c", code, out], input=json.dumps(cfg.to_json()), text=True,
                              capture_output=True, env=env, timeout=DEVICES_TIMEOUT_S)  # fmt: skip
        if not os.path.isfile(out):
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise DlpipeError(f"measure_devices' TensorFlow process failed: {tail[0]}")
        with open(out) as f:
            result = json.load(f)
    if "error" in result:
        raise DlpipeError(f"measure_devices' TensorFlow process: {result['error']}")
    return FrameworkResult.from_json(result)


def _devices_main(out_path: str) -> int:
    """The child process of ``measure_devices``: the config as JSON on stdin, the result to a file."""
    try:
        cfg = BenchConfig.from_json(json.load(sys.stdin))
        result = _run_devices(cfg).to_json()
    except DlpipeError as e:
        result = {"error": str(e)}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def _run_devices(cfg: BenchConfig) -> FrameworkResult:
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and cfg.device.lower() != "cpu":
        if cfg.devices > len(gpus):
            raise ConfigError(f"devices={cfg.devices}, but TensorFlow sees {len(gpus)} GPUs")
        names = [f"/GPU:{i}" for i in range(cfg.devices)]
        strategy = tf.distribute.MirroredStrategy(names)
        what = f"{cfg.devices} GPUs"
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.devices
        )
        names = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(
            names, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        what = f"{cfg.devices} logical CPU devices sharing {len(os.sched_getaffinity(0))} CPUs"
    spec = parse_model_spec(cfg.model)
    sleep = spec.make_sleep_model()
    global_batch = cfg.batch_size * strategy.num_replicas_in_sync
    dataset = _dlpipe_dataset(cfg, batch_size=global_batch).map(
        lambda *e: _split(e if len(e) > 1 else e[0])
    )
    dist = strategy.experimental_distribute_dataset(dataset)
    if spec.kind == "deepcal":
        mod = _deepcal()
        with strategy.scope():
            net = mod.build_tf_model()
            train = mod.tf_train_step(net, tf.keras.optimizers.Adam(1e-3))
    else:
        train = None

    def replica(features, labels):
        tokens = tf.reduce_sum(tf.cast(features[MASK], tf.int64))
        loss = train(features, labels) if train is not None else tf.constant(0.0)
        return tf.cast(tf.shape(labels)[0], tf.int64), tokens, loss

    @tf.function(reduce_retracing=True)  # batches vary in width: one graph for all of them
    def step(features, labels):
        per = strategy.run(replica, args=(features, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per]

    out: dict[str, Any] = {"samples_per_s": [], "tokens_per_s": []}
    for _ in range(cfg.repeats):
        stream = _Stream(dist)
        for _ in range(cfg.warmup):
            step(*next(stream))[0].numpy()
        wait, comp, samples, tokens = [], [], 0, 0
        start = time.perf_counter()
        for _ in range(cfg.steps):
            t0 = time.perf_counter()
            batch = next(stream)
            t1 = time.perf_counter()
            n, k, _ = (v.numpy() for v in step(*batch))
            if sleep is not None:
                sleep()
            wait.append(t1 - t0)
            comp.append(time.perf_counter() - t1)
            samples, tokens = samples + int(n), tokens + int(k)
        wall = time.perf_counter() - start
        out["samples_per_s"].append(samples / wall)
        out["tokens_per_s"].append(tokens / wall)
        out.update(wait_s=wait, compute_s=comp)
    notes = [f"MirroredStrategy over {what}, model {spec}; global batch {global_batch} "
             f"({cfg.batch_size} per replica), split by experimental_distribute_dataset",
             "compute: strategy.run of the step on every replica (with no model: a token count per "
             "replica, which still moves each replica's share to its device) and the reduction"]  # fmt: skip
    return _result("dlpipe", out, [], notes)
