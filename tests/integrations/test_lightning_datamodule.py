"""``ShardDataModule`` under the real Lightning ``Trainer`` on CPU: a tiny embedding classifier
trained on dlpipe shards. Each epoch must be the loader's own epoch order (reshuffled: the epoch
reaches the loader), and a run that crashes after a checkpoint, resumed with
``fit(ckpt_path=...)``, must see exactly the records an uninterrupted run sees after that
checkpoint: each once per epoch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.torch

import torch  # noqa: E402
from integration_corpus import BATCH, N, epoch_order  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from dlpipe.errors import ConfigError  # noqa: E402
from dlpipe.integrations.lightning import EpochLoader, ShardDataModule  # noqa: E402

EPOCHS = 2
PER_EPOCH = N // BATCH


class Crash(Exception):
    pass


class Classifier(L.LightningModule):
    """Mean of token embeddings -> 2 classes; records the ``rid`` of each training batch and
    raises ``Crash`` at global step ``crash_at`` (before training on that batch)."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(128, 8)
        self.out = torch.nn.Linear(8, 2)
        self.crash_at = crash_at
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_at:
            raise Crash
        self.seen.append(batch["rid"].tolist())
        mask = batch["attention_mask"].unsqueeze(-1)
        pooled = (self.emb(batch["input_ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.cross_entropy(self.out(pooled), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log("val_batches", float(len(batch["rid"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(ckpt_dir=None) -> L.Trainer:
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)] if ckpt_dir else []
    return L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks,
                     num_sanity_val_steps=0)


def expected(path) -> list[list[int]]:
    return [b for e in range(EPOCHS) for b in epoch_order(path, e)]


def test_fits_on_the_loaders_epochs(corpus):
    model = Classifier()
    dm = ShardDataModule(corpus, batch_size=BATCH, seed=0, val_split="train")
    trainer().fit(model, datamodule=dm)
    assert model.seen == expected(corpus)
    assert model.seen[:PER_EPOCH] != model.seen[PER_EPOCH:]  # reshuffled
    for e in range(EPOCHS):
        assert sorted(r for b in model.seen[e * PER_EPOCH:(e + 1) * PER_EPOCH] for r in b) == list(range(N))


@pytest.mark.parametrize(("crash", "num_workers"), [(5, 0), (12, 0), (17, 0), (7, 2)])
def test_resume_sees_each_record_once(corpus, tmp_path, crash, num_workers):
    """Crash before step ``crash``; resume from the checkpoint of step ``crash`` (12: the last
    batch of epoch 0)."""
    full = expected(corpus)
    model = Classifier(crash_at=crash)
    dm = ShardDataModule(corpus, batch_size=BATCH, seed=0, num_workers=num_workers)
    with pytest.raises(Crash):
        trainer(tmp_path).fit(model, datamodule=dm)
    assert model.seen == full[:crash]
    ckpt = tmp_path / f"epoch={(crash - 1) // PER_EPOCH}-step={crash}.ckpt"
    saved = torch.load(ckpt, weights_only=False)["ShardDataModule"]["train"]
    assert saved["batches_yielded"] == (crash - 1) % PER_EPOCH + 1

    resumed = Classifier()
    dm = ShardDataModule(corpus, batch_size=BATCH, seed=0, num_workers=num_workers)
    trainer().fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert model.seen + resumed.seen == full


def test_resume_under_other_loader_settings_is_refused(corpus, tmp_path):
    with pytest.raises(Crash):
        trainer(tmp_path).fit(Classifier(crash_at=3), datamodule=ShardDataModule(corpus, batch_size=BATCH, seed=0))
    other = ShardDataModule(corpus, batch_size=BATCH, seed=1)
    with pytest.raises(ConfigError, match="seed"):
        trainer().fit(Classifier(), datamodule=other, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")


def test_rank_of_a_checkpoint_is_this_process(corpus):
    """Lightning saves rank 0's DataModule state; rank 1 resumes it as its own."""
    dm0 = ShardDataModule(corpus, batch_size=BATCH, seed=0, world_size=2, rank=0)
    loader0 = dm0.train_dataloader().loader
    it = iter(loader0)
    next(it), next(it)
    dm1 = ShardDataModule(corpus, batch_size=BATCH, seed=0, world_size=2, rank=1)
    dm1.load_state_dict(dm0.state_dict())
    wrapped = dm1.train_dataloader()
    assert isinstance(wrapped, EpochLoader) and len(wrapped) == PER_EPOCH // 2
    rest = [b["rid"].tolist() for b in wrapped]  # no trainer: the loader's epoch stays
    whole = [b["rid"].tolist() for b in ShardDataModule(corpus, batch_size=BATCH, seed=0, world_size=2,
                                                         rank=1).train_dataloader()]
    assert rest == whole[2:]
