"""The TensorFlow baselines: the padded source fed the slow ways users feed it."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np

from dlpipe._deps import require
from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.tf_measure.device import (
    FEATURE,
    HF_MAX_ROWS,
    LABEL,
    _check,
    _deepcal,
    _device,
    _Model,
    _on_device,
    _split,
    _tf,
)
from dlpipe.benchmark.tf_measure.pipeline import _padding_note, _result
from dlpipe.benchmark.tf_measure.timing import _drive, _Stream, _time_dataset, _time_step
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.defaults import SHUFFLE_BUFFER
from dlpipe.errors import ConfigError


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
