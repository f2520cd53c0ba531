"""The PyTorch loaders' wiring: which process group a loader serves (``resolve_world``), the
DataLoader's own arguments (checked by ``check_worker_args``) and which loader class carries a
``ShardIterableDataset`` (``make_loader``: ``DlpipeDataLoader``, or torchdata's
``StatefulDataLoader`` with ``stateful=True``; see ``dlpipe.loaders.torch_state``)."""

from __future__ import annotations

import os
from typing import Any

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.loaders.options import LoaderOptions

torch = require("torch", "dlpipe's PyTorch loader")

from dlpipe.loaders.torch_state import DlpipeDataLoader, stateful_loader_class  # noqa: E402

__all__ = ["check_worker_args", "make_loader", "resolve_world"]


def resolve_world(world_size: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world_size, rank): explicit arguments, else torch.distributed, else RANK/WORLD_SIZE, else (1, 0)."""
    LoaderOptions(world_size=world_size, rank=rank)  # both or neither, in range
    if world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        else:
            world_size, rank = 1, 0
        LoaderOptions(world_size=world_size, rank=rank)
    return int(world_size), int(rank)


def check_worker_args(num_workers: Any, prefetch_factor: Any, persistent_workers: bool, timeout: Any) -> None:
    """The DataLoader arguments of ``to_torch_dataloader`` (ConfigError naming the bad one)."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}; must be an int >= 0")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ConfigError(f"timeout={timeout!r}; must be a number of seconds >= 0 (0: wait forever)")
    if num_workers == 0 and (prefetch_factor is not None or persistent_workers):
        raise ConfigError(
            "prefetch_factor and persistent_workers need num_workers > 0 "
            f"(got num_workers=0, prefetch_factor={prefetch_factor}, "
            f"persistent_workers={persistent_workers})"
        )
    if num_workers == 0 and timeout:
        raise ConfigError(f"timeout={timeout!r} needs num_workers > 0 (it bounds the wait for workers)")


def make_loader(dataset: Any, *, stateful: bool, num_workers: int, pin_memory: bool,
                prefetch_factor: int | None, persistent_workers: bool, timeout: float) -> Any:
    """A ``DlpipeDataLoader`` (or, ``stateful``, a ``DlpipeStatefulDataLoader``) of ``dataset``."""
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": persistent_workers,
    }
    if prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    if timeout:
        kwargs["timeout"] = float(timeout)
    if stateful:
        return stateful_loader_class()(dataset, **kwargs)
    return DlpipeDataLoader(dataset, **kwargs)
