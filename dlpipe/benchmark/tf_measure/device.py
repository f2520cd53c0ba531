"""Devices, the model adapter and batch helpers of the TensorFlow measurer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dlpipe._deps import require
from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError

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
    _sync(out[MASK] if MASK in out else out[FEATURE])
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
    ``(features, labels)`` where either may be a lone tensor, or one dict holding the labels.
    Packed batches (``segment_ids``) keep their keys and get no mask."""
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
    if MASK not in features and "segment_ids" not in features:  # padded sources carry no mask
        features = {**features, MASK: tf.cast(tf.not_equal(features[FEATURE], pad_id), tf.int64)}
    return features, labels
