"""PyTorch Lightning on dlpipe shards: ``ShardDataModule``.

A ``LightningDataModule`` over a dlpipe dataset directory (local or fsspec URL): its
``train_dataloader`` / ``val_dataloader`` / ``test_dataloader`` / ``predict_dataloader`` are
dlpipe's PyTorch loader (``to_torch_dataloader``; the training one shuffled with ``seed``).
What it adds to returning ``to_torch_dataloader`` from a ``LightningModule``:

- **epochs**: Lightning calls ``set_epoch`` only on a loader's *sampler* (for
  ``DistributedSampler``); dlpipe's loader, an iterable dataset, has none, so every epoch would
  replay epoch 0's order. The training loader here is wrapped in an iterable that sets the
  loader's epoch to Lightning's (``fit_loop.epoch_progress.current.processed``, the count
  Lightning gives samplers) each time Lightning starts iterating it, so each epoch is shuffled
  anew, after a resume as well.
- **checkpoints**: ``state_dict()`` is ``{"train": loader.state_dict()}``; Lightning saves it in
  every checkpoint (under the DataModule's class name) and ``trainer.fit(ckpt_path=...)`` gives
  it back through ``load_state_dict`` before the loader is made, so a run resumed mid-epoch
  continues with exactly the batch after the checkpoint, without reading the earlier ones. A
  checkpoint at the end of an epoch starts the next one. (Lightning also keeps the state of any
  training loader that has ``state_dict``, the wrapper included, in its fit loop, and loads it
  again when resuming mid-epoch: the same state, so no harm, and without it Lightning warns
  that the loader is not resumable.) Under DDP the checkpoint holds rank 0's state; every rank
  resumes from it with its own rank (each rank yields the same number of batches an epoch,
  which is the whole of a position).

The loader settings must be the checkpoint's (batch size, seed, shuffle, world size, workers),
else ``load_state_dict`` raises ``ConfigError`` naming what differs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dlpipe._deps import require

L = require("lightning.pytorch", "dlpipe.integrations.lightning")
require("torch", "dlpipe.integrations.lightning")

from dlpipe.loaders.dataset import ShardDataset, load_dataset  # noqa: E402

__all__ = ["EpochLoader", "ShardDataModule"]


class EpochLoader:
    """A training loader as Lightning gets it: its iterator, at its first batch, sets the loader's
    epoch to the trainer's; ``state_dict``/``load_state_dict`` are the loader's (a state saved on
    another rank resumes as this one's). ``loader`` is the dlpipe loader itself."""

    def __init__(self, loader: Any, datamodule: L.LightningDataModule) -> None:
        self.loader = loader
        self._datamodule = datamodule

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(_as_my_rank(state, self.loader.state_dict()))

    def epoch(self) -> int | None:
        """The epoch Lightning is about to play, or None outside ``fit``."""
        trainer = getattr(self._datamodule, "trainer", None)
        if trainer is None or trainer.fit_loop is None:
            return None
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def __iter__(self) -> Iterator[Any]:
        # lazily, at the first batch: Lightning calls iter() once only to check that it can
        # (``_check_dataloader_iterable``), which must neither use up a pending resume nor start workers
        epoch = self.epoch()
        if epoch is not None:
            self.loader.set_epoch(epoch)  # a resume pending for another epoch is dropped
        yield from self.loader


class ShardDataModule(L.LightningDataModule):
    """A LightningDataModule of a dlpipe dataset (module docstring).

    ``path``: the dataset directory or URL. ``*_split``: the split each stage reads (None: that stage has no loader).
    ``batch_size``, ``seed``, ``num_workers`` and the rest of ``loader_kwargs`` go to
    ``to_torch_dataloader`` (``eval_batch_size`` for the other stages, default ``batch_size``);
    ``columns`` selects columns; ``storage_options`` / ``cache_dir`` go to ``load_dataset``.
    """

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int,
                 train_split: str | None = "train", val_split: str | None = None,
                 test_split: str | None = None, predict_split: str | None = None,
                 shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                 eval_batch_size: int | None = None, columns: Sequence[str] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, **loader_kwargs: Any) -> None:
        super().__init__()
        self.path = path
        self.splits = {"train": train_split, "val": val_split, "test": test_split, "predict": predict_split}
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.columns = None if columns is None else list(columns)
        self.storage_options = storage_options
        self.cache_dir = cache_dir
        self.loader_kwargs = loader_kwargs
        self.train_loader: Any = None  # the dlpipe loader of the current fit
        self._pending: dict[str, Any] | None = None  # a loader state to resume

    def dataset(self, stage: str) -> ShardDataset:
        """The ``ShardDataset`` of ``stage``'s split (``train``, ``val``, ``test``, ``predict``)."""
        split = self.splits[stage]
        if split is None:
            raise ValueError(f"ShardDataModule has no {stage} split; pass {stage}_split=...")
        ds = load_dataset(self.path, split, storage_options=self.storage_options, cache_dir=self.cache_dir)
        return ds if self.columns is None else ds.select_columns(self.columns)

    def _loader(self, stage: str, **kwargs: Any) -> Any:
        options = {"num_workers": self.num_workers, **self.loader_kwargs, **kwargs}
        return self.dataset(stage).to_torch_dataloader(**options)

    def train_dataloader(self) -> EpochLoader:
        loader = self._loader("train", batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed)
        if self._pending is not None:
            loader.load_state_dict(_as_my_rank(self._pending, loader.state_dict()))
            self._pending = None
        self.train_loader = loader
        return EpochLoader(loader, self)

    def val_dataloader(self) -> Any:
        return self._eval_loader("val")

    def test_dataloader(self) -> Any:
        return self._eval_loader("test")

    def predict_dataloader(self) -> Any:
        return self._eval_loader("predict")

    def _eval_loader(self, stage: str) -> Any:
        if self.splits[stage] is None:
            return []  # Lightning's "no data for this stage"
        return self._loader(stage, batch_size=self.eval_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.train_loader is None else {"train": self.train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train")
        if state is None:
            return
        if self.train_loader is not None:  # already made (e.g. fit called again): resume it now
            self.train_loader.load_state_dict(_as_my_rank(state, self.train_loader.state_dict()))
        else:
            self._pending = dict(state)


def _as_my_rank(saved: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (rank 0's, as Lightning checkpoints it) for this process's rank: a dlpipe loader's
    position is the epoch and the batch count, the same on every rank."""
    if "rank" in saved and "rank" in mine and saved.get("world_size") == mine.get("world_size"):
        return {**saved, "rank": mine["rank"]}
    return saved
