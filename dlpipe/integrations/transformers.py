"""HF ``transformers.Trainer`` on dlpipe shards: ``DlpipeTrainer``.

``Trainer`` builds its own ``DataLoader`` and sends it through ``accelerator.prepare``, which
would rebuild dlpipe's loader as a plain one (losing its tensors, ``state_dict`` and the split
over ranks it already does), and on ``resume_from_checkpoint`` it fast-forwards by *reading*
the first batches of the epoch again (``accelerate.skip_first_batches``, which rebuilds the
loader too). ``DlpipeTrainer`` changes exactly that:

- **the loader**: ``train_dataset=`` / ``eval_dataset=`` may be a ``ShardDataset``
  (``dlpipe.load_dataset(path)``); the loader is then ``to_torch_dataloader`` with the
  ``TrainingArguments`` (``per_device_*_batch_size``, ``seed``/``data_seed``, the
  ``dataloader_*`` options), shuffled for training, with the columns the model's ``forward``
  takes (as ``remove_unused_columns`` does for HF datasets). Or pass a loader you made,
  ``train_dataloader=ds.to_torch_dataloader(...)`` (and ``eval_dataloader=``). Either way it is
  used as it is, not through ``accelerator.prepare``: it already splits the data over
  ``torch.distributed`` ranks, and ``Trainer`` moves each batch to the device itself.
- **epochs**: ``Trainer`` calls ``set_epoch(epoch)`` on the loader before each epoch, so each
  epoch is shuffled anew (with the seed and the epoch, on every rank alike).
- **checkpoints**: each ``checkpoint-N`` folder gets ``dlpipe_loader-rank{R}.json``, the
  loader's ``state_dict()`` of every process. When ``train(resume_from_checkpoint=...)`` resumes
  mid-epoch, the loader loads it and continues with exactly the next batch, without reading the
  earlier ones (in place of ``skip_first_batches``; the batch count is checked against the
  ``Trainer``'s own). A checkpoint at the end of an epoch simply starts the next one. A
  checkpoint without the file (saved by a plain ``Trainer``) is resumed from the ``Trainer``'s
  count. The loader settings must be those of the checkpoint (batch size, seed, shuffle, world
  size, workers): otherwise ``ConfigError`` says which differ. ``ignore_data_skip=True`` starts
  the resumed epoch from its first batch, as in ``Trainer``.

Not covered: ``auto_find_batch_size`` (the loader's batch size is fixed), TPUs (XLA wants its
own device loader).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from dlpipe._deps import require
from dlpipe.errors import ConfigError

transformers = require("transformers", "dlpipe.integrations.transformers")
require("torch", "dlpipe.integrations.transformers")
import transformers.trainer as _trainer_module  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

from dlpipe.loaders.dataset import ShardDataset  # noqa: E402

__all__ = ["STATE_FILE", "DlpipeTrainer", "loader_state_path"]

logger = logging.getLogger(__name__)

STATE_FILE = "dlpipe_loader-rank{rank}.json"
# the labels Trainer itself keeps besides the forward's parameters (remove_unused_columns)
_LABEL_COLUMNS = ("label", "label_ids", "labels")


def loader_state_path(checkpoint_dir: str | os.PathLike[str], rank: int = 0) -> str:
    """Where ``DlpipeTrainer`` keeps rank ``rank``'s loader state in a checkpoint folder."""
    return os.path.join(os.fspath(checkpoint_dir), STATE_FILE.format(rank=rank))


class DlpipeTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains on dlpipe shards and checkpoints the loader's position
    (module docstring). Arguments are ``Trainer``'s; ``train_dataset``/``eval_dataset`` may be
    ``ShardDataset``s, or ``train_dataloader``/``eval_dataloader`` dlpipe loaders;
    ``loader_kwargs`` go to ``to_torch_dataloader`` for loaders built from a ``ShardDataset``
    (e.g. ``bucket_boundaries="auto"``, ``packing=...``)."""

    def __init__(self, *args: Any, train_dataloader: Any = None, eval_dataloader: Any = None,
                 loader_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for given in (train_dataloader, eval_dataloader):
            if given is not None and not callable(getattr(given, "state_dict", None)):
                raise ConfigError(f"{type(given).__name__} is not a dlpipe loader (no state_dict); "
                                  "pass ds.to_torch_dataloader(...)")
        self.dlpipe_train_dataloader = train_dataloader
        self.dlpipe_eval_dataloader = eval_dataloader
        self.loader_kwargs = dict(loader_kwargs or {})
        self._dlpipe_saved: dict[str, Any] | None = None  # the checkpoint's loader state

    # -- loaders
    def get_train_dataloader(self) -> Any:
        if self.dlpipe_train_dataloader is None and isinstance(self.train_dataset, ShardDataset):
            self.dlpipe_train_dataloader = self._make_loader(self.train_dataset, train=True)
        if self.dlpipe_train_dataloader is None:
            return super().get_train_dataloader()
        return self.dlpipe_train_dataloader

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        if eval_dataset is None and self.dlpipe_eval_dataloader is not None:
            return self.dlpipe_eval_dataloader
        if eval_dataset is None:
            eval_dataset = self.eval_dataset
        if isinstance(eval_dataset, ShardDataset):
            if self.dlpipe_eval_dataloader is None and eval_dataset is self.eval_dataset:
                self.dlpipe_eval_dataloader = self._make_loader(eval_dataset, train=False)
                return self.dlpipe_eval_dataloader
            return self._make_loader(eval_dataset, train=False)
        return super().get_eval_dataloader(eval_dataset)

    def _make_loader(self, ds: ShardDataset, *, train: bool) -> Any:
        a = self.args
        kwargs: dict[str, Any] = {
            "batch_size": a.per_device_train_batch_size if train else a.per_device_eval_batch_size,
            "shuffle": train,
            "seed": a.data_seed if a.data_seed is not None else a.seed,
            "num_workers": a.dataloader_num_workers,
            "pin_memory": a.dataloader_pin_memory,
            "drop_last": a.dataloader_drop_last,
        }
        if a.dataloader_num_workers > 0:
            kwargs["persistent_workers"] = a.dataloader_persistent_workers
            kwargs["prefetch_factor"] = a.dataloader_prefetch_factor
        columns = self._model_columns(ds.column_names)
        if columns is not None:
            ds = ds.select_columns(columns)
            kwargs["return_attention_mask"] = "attention_mask" in self._forward_parameters()
        kwargs.update(self.loader_kwargs)
        return ds.to_torch_dataloader(**kwargs)

    def _forward_parameters(self) -> set[str]:
        """The named parameters of the model's forward (``**kwargs`` aside, as ``Trainer``'s
        ``remove_unused_columns`` reads it)."""
        model = self.model
        while hasattr(model, "module"):  # unwrap DDP / DataParallel
            model = model.module
        if callable(getattr(model, "get_base_model", None)):  # PEFT, as Trainer reads it
            model = model.get_base_model()
        params = inspect.signature(model.forward).parameters.values()
        return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    def _model_columns(self, names: Sequence[str]) -> list[str] | None:
        """The columns of ``names`` the model takes (None: all, without ``remove_unused_columns``)."""
        if not self.args.remove_unused_columns:
            return None
        takes = self._forward_parameters()
        keep = [n for n in names if n in takes or n in _LABEL_COLUMNS or n in (self.label_names or ())]
        if not keep:
            raise ConfigError(f"none of the columns {list(names)} is a parameter of "
                              f"{type(self.model).__name__}.forward; rename them or pass "
                              "remove_unused_columns=False")
        return keep

    # -- checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        loader = self.dlpipe_train_dataloader
        if loader is None:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = loader_state_path(folder, self.args.process_index)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(loader.state_dict(), f)
        os.replace(tmp, path)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        if self.dlpipe_train_dataloader is None and not isinstance(self.train_dataset, ShardDataset):
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        self._dlpipe_saved = None
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            path = loader_state_path(checkpoint, self.args.process_index)
            if os.path.isfile(path):
                with open(path) as f:
                    self._dlpipe_saved = json.load(f)
        with self._resume_in_place():
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    @contextlib.contextmanager
    def _resume_in_place(self) -> Iterator[None]:
        """While training: ``Trainer``'s fast-forward of the dlpipe loader becomes a check that
        the loader stands where ``Trainer`` resumes (``_position``); others are skipped as usual."""
        original = getattr(_trainer_module, "skip_first_batches", None)
        if original is None:  # a transformers that resumes some other way: nothing to replace
            if self._dlpipe_saved is not None:
                logger.warning("this transformers has no trainer.skip_first_batches; DlpipeTrainer cannot "
                               "resume the loader mid-epoch in place (tested with transformers 5.24)")
            yield
            return

        def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
            if dataloader is None or dataloader is not self.dlpipe_train_dataloader:
                return original(dataloader, num_batches)
            self._position(dataloader, num_batches)
            return dataloader

        _trainer_module.skip_first_batches = skip_first_batches
        try:
            yield
        finally:
            _trainer_module.skip_first_batches = original

    def _position(self, loader: Any, batches: int) -> None:
        """Make ``loader`` resume after ``batches`` batches of the epoch ``Trainer`` resumes (called
        only mid-epoch: a checkpoint at the end of an epoch resumes with a fresh next epoch)."""
        per_epoch = len(loader)
        accumulation = self.args.gradient_accumulation_steps
        updates_per_epoch = max(per_epoch // accumulation + int(per_epoch % accumulation > 0), 1)
        epoch = self.state.global_step // updates_per_epoch
        state = self._dlpipe_saved
        if state is None:
            if "batches_yielded" not in loader.state_dict():
                raise ConfigError("this checkpoint has no dlpipe loader state (no "
                                  f"{STATE_FILE.format(rank=self.args.process_index)}); a "
                                  "stateful=True loader cannot resume without it")
            logger.warning("checkpoint without %s: resuming the loader at epoch %d, batch %d from "
                           "the Trainer's step count", STATE_FILE.format(rank=self.args.process_index),
                           epoch, batches)
            loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "batches_yielded": batches})
            return
        saved = state.get("batches_yielded", state.get("_num_yielded"))
        saved_epoch = state.get("epoch", epoch)
        if saved != batches or saved_epoch != epoch:
            raise ConfigError(
                f"the checkpoint's loader state stands at epoch {saved_epoch}, batch {saved}, but "
                f"Trainer resumes at epoch {epoch}, batch {batches} (global step "
                f"{self.state.global_step}, {per_epoch} batches an epoch, gradient_accumulation_steps="
                f"{accumulation}); resume with the settings the checkpoint was trained with")
        loader.load_state_dict(state)  # ConfigError if the loader's settings differ
