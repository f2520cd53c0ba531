"""Keras 3 ``model.fit`` on dlpipe shards, on each backend.

Which loader for which backend (the backend is fixed when ``keras`` is imported, by
``KERAS_BACKEND``):

- **tensorflow**: ``ds.to_tf_dataset(batch_size, columns=[...], label_cols=...)``, as is. A
  native ``tf.data`` pipeline: parsing, padding and prefetching run in TensorFlow's threads with
  no Python per batch, and Keras's ``fit`` takes ``(features, labels)`` datasets directly. Each
  new iteration of the dataset plays the next epoch (reshuffled).
- **torch**: ``keras_loader(ds.to_torch_dataloader(...), columns=[...], label_cols=...)``. The
  PyTorch loader reads in its own DataLoader workers and hands over torch tensors, which the
  torch backend uses directly, and no TensorFlow is loaded into the process (it would cost
  memory and start-up time, and some TensorFlow and PyTorch builds clash in one process: issue
  15). Keras wants ``(x, y)`` tuples from a ``torch.utils.data.DataLoader`` and never calls
  ``set_epoch``; ``keras_loader`` gives it exactly that (below).
- **jax**: either works (Keras turns both into numpy batches); ``keras_loader`` plays the same
  epochs as the other backends. ``to_tf_dataset`` reads outside Python, but on JAX (as on torch)
  Keras first reads one batch through a fresh iterator to build the model, which
  ``to_tf_dataset`` counts as an epoch: ``fit``'s epochs then play dlpipe epochs 1, 2, ...
  (each still every record once).

``keras_loader(loader, columns, label_cols)`` is a ``torch.utils.data.DataLoader`` (no workers
of its own: ``loader`` keeps its own) whose batches are the ``(features, labels)`` split of
``loader``'s batches by HF ``to_tf_dataset``'s rule, the same structure ``to_tf_dataset(columns=,
label_cols=)`` gives: ``features`` a dict of ``columns`` (the tensor itself when there is one),
``labels`` likewise (no ``label_cols``: batches are ``features`` alone). Epochs: a pass that
follows a complete one (every batch handed out) plays the next epoch (``set_epoch``), so every
Keras epoch is reshuffled; an unfinished pass (Keras reads one batch to build an unbuilt model)
does not count. To start at ``fit(initial_epoch=k)``, call ``loader.set_epoch(k)`` first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from dlpipe._deps import require
from dlpipe.errors import ConfigError

torch = require("torch", "dlpipe.integrations.keras.keras_loader")
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

__all__ = ["keras_loader"]

def keras_loader(loader: Any, columns: str | Sequence[str] | None = None,
                 label_cols: str | Sequence[str] | None = None) -> DataLoader:
    """A DataLoader of ``(features, labels)`` batches of the dlpipe ``loader`` for Keras (module
    docstring). ``columns`` / ``label_cols`` as in HF ``to_tf_dataset`` (``columns`` is needed
    with ``label_cols``); ``attention_mask`` can be named in ``columns``."""
    if not callable(getattr(loader, "set_epoch", None)):
        raise ConfigError(f"{type(loader).__name__} is not a dlpipe loader; pass ds.to_torch_dataloader(...)")
    features = _names(columns, "columns")
    labels = _names(label_cols, "label_cols")
    if labels and not features:
        raise ConfigError(f"label_cols={labels!r} needs columns too (as in HF to_tf_dataset); pass columns=[...]")
    return DataLoader(_KerasBatches(loader, features, labels), batch_size=None, collate_fn=_as_is)


class _KerasBatches(IterableDataset):
    """``loader``'s batches split into ``(features, labels)``; a completed pass advances the epoch."""

    def __init__(self, loader: Any, features: list[str], labels: list[str]) -> None:
        self.loader = loader
        self.features = features
        self.labels = labels
        self._handed = 0  # batches the current (or last) pass handed out

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        # Keras takes len() batches an epoch and never asks for more, so a pass cannot end the
        # epoch itself: the next pass starts the next epoch if this one handed out all its batches
        if self._handed >= len(self.loader):
            self.loader.set_epoch(self.loader.dataset.epoch + 1)
        self._handed = 0
        for batch in self.loader:
            self._handed += 1
            yield self._split(batch)

    def _split(self, batch: dict[str, Any]) -> Any:
        if not self.features:
            return batch
        missing = [k for k in self.features + self.labels if k not in batch]
        if missing:
            raise ConfigError(f"columns {missing} are not in the loader's batches ({', '.join(batch)})")
        x = {k: batch[k] for k in self.features}
        x = next(iter(x.values())) if len(x) == 1 else x
        if not self.labels:
            return x
        y = {k: batch[k] for k in self.labels}
        return x, next(iter(y.values())) if len(y) == 1 else y


def _as_is(batch: Any) -> Any:
    return batch


def _names(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{what}={value!r}; must be a column name or a list of them")
    return names
