"""Devices and the model adapter of the PyTorch measurer."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dlpipe._deps import require
from dlpipe.benchmark.utilization import parse_model_spec
from dlpipe.errors import ConfigError

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
            opt = mod.make_optimizer(net)  # Adam, fused where the device has it

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
