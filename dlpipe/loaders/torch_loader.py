"""The PyTorch DataLoader over a ``ShardIterableDataset`` (``dlpipe.loaders.torch_data``):
``to_torch_dataloader`` (what ``ShardDataset.to_torch_dataloader`` calls), the DataLoader's own
arguments (checked by ``check_worker_args``) and which loader class carries the dataset
(``make_loader``: ``DlpipeDataLoader``, or torchdata's ``StatefulDataLoader`` with
``stateful=True``; see ``dlpipe.loaders.torch_state``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.loaders.options import LoaderOptions

torch = require("torch", "dlpipe's PyTorch loader")

from dlpipe.loaders.torch_data import ShardIterableDataset  # noqa: E402
from dlpipe.loaders.torch_state import DlpipeDataLoader, stateful_loader_class  # noqa: E402

__all__ = ["check_worker_args", "make_loader", "to_torch_dataloader"]


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


def to_torch_dataloader(
    ds: Any,  # a loaders.dataset.ShardDataset
    batch_size: int = 1,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list[dict[str, np.ndarray]]], Any] | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
    bucket_boundaries: Sequence[int] | str | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    world_size: int | None = None,
    rank: int | None = None,
    uneven: str = "pad",
    seed: int | None = None,
    stateful: bool = False,
    return_attention_mask: bool = True,
    timeout: float = 0,
    packing: Any = False,
    max_length: int | None = None,
    max_segments: int | None = None,
    max_tokens: int | None = None,
    truncate: bool = False,
    pack_window: int | None = None,
    device: Any = None,
):
    """A DataLoader of padded batches of ``ds`` (see the module docstring).

    ``shuffle=True`` on a dataset not yet ``ds.shuffle(...)``-d shuffles it with ``seed`` (a
    random one when None, recorded in ``state_dict``); a shuffled ``ds`` is shuffled either way,
    and ``seed`` then replaces its seed (``loaders.options.resolve_shuffle``, shared with tf.data).
    ``bucket_boundaries``: lengths, or ``"auto"`` for ``default_boundaries`` of the first variable
    column; each batch is padded to the smallest boundary that fits (records are grouped by
    bucket within a window). Returns a ``DlpipeDataLoader``, or with ``stateful=True`` a
    torchdata ``StatefulDataLoader`` subclass; both have ``set_epoch``, ``state_dict`` and
    ``load_state_dict``. A worker that dies, or with ``timeout`` > 0 sends no batch for that many
    seconds, ends the epoch with ``LoaderWorkerError``.
    With ``packing`` (``dlpipe.loaders.packed``) ``batch_size`` is rows per batch, or
    ``max_tokens`` tokens per batch (``batch_size`` then stays at its default, 1).
    ``device`` (e.g. ``"cuda"``): the loader comes wrapped in a ``DevicePrefetcher`` that copies
    the next batch to the device on a side stream while the current one trains (use with
    ``pin_memory=True``); ``set_epoch`` and ``state_dict`` pass through, exact.
    """
    require("torch", "to_torch_dataloader")
    check_worker_args(num_workers, prefetch_factor, persistent_workers, timeout)
    if batch_size == 1 and packing not in (False, None) and (max_tokens or not isinstance(packing, (bool, str))):
        batch_size = None  # the default: the token budget or the PackingOptions sets the rows
    options = LoaderOptions(
        batch_size=batch_size, drop_last=drop_last, pad_to_multiple_of=pad_to_multiple_of,
        padding_side=padding_side, bucket_boundaries=bucket_boundaries,
        return_attention_mask=return_attention_mask, shuffle=shuffle, seed=seed,
        world_size=world_size, rank=rank, uneven=uneven, packing=packing, max_length=max_length,
        max_segments=max_segments, max_tokens=max_tokens, truncate=truncate, pack_window=pack_window,
    )
    dataset = ShardIterableDataset.from_options(ds, options, collate_fn)
    dataset.loader_transport = True
    loader = make_loader(dataset, stateful=stateful, num_workers=num_workers, pin_memory=pin_memory,
                         prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                         timeout=timeout)
    if device is None:
        return loader
    from dlpipe.loaders.torch_prefetch import DevicePrefetcher

    return DevicePrefetcher(loader, device)
