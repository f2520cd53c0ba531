"""``DlpipeTrainer``: a tiny BERT (2 layers, built from a config, no download) trained by the real
``transformers.Trainer`` on CPU over dlpipe shards. The records each step trained on (the
``rid`` column) must be the loader's own epoch order, reshuffled each epoch (``set_epoch``
reaches the loader), and a run stopped mid-epoch then resumed from its checkpoint must see
exactly the records an uninterrupted run sees after that point: each once per epoch."""

from __future__ import annotations

import json
import os

import pytest

import dlpipe
from dlpipe.errors import ConfigError

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.torch

import torch  # noqa: E402
import transformers  # noqa: E402
from integration_corpus import BATCH, N, epoch_order  # noqa: E402

from dlpipe.integrations.transformers import STATE_FILE, DlpipeTrainer, loader_state_path  # noqa: E402

transformers.logging.set_verbosity_error()
EPOCHS = 2
PER_EPOCH = N // BATCH


class TinyBert(transformers.BertForSequenceClassification):
    """Records the ``rid`` of every training batch (a parameter: the column reaches it)."""

    seen: list[list[int]] = []

    def forward(self, input_ids=None, attention_mask=None, labels=None, rid=None, **kwargs):
        if self.training and rid is not None:
            TinyBert.seen.append(rid.tolist())
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def tiny_bert() -> TinyBert:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, num_labels=2)
    return TinyBert(config)


class StopAt(transformers.TrainerCallback):
    """Ends training after ``step`` optimizer steps (a crash right after the checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def args(out, *, save_steps: int, accumulation: int = 1, **kw) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, seed=0, use_cpu=True,
        save_strategy="steps", save_steps=save_steps, logging_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_pin_memory=False, **kw)


def train(path, out, how: str, *, stop: int | None = None, resume=None, save_steps: int = 4,
          accumulation: int = 1) -> list[list[int]]:
    """Record ids of each batch one ``train()`` saw; ``how``: the loader's origin."""
    TinyBert.seen = []
    ds = dlpipe.load_dataset(path)
    kw: dict = {}
    if how == "dataset":  # built from the TrainingArguments
        kw["train_dataset"] = ds
    elif how == "workers":
        kw["train_dataloader"] = ds.to_torch_dataloader(batch_size=BATCH, shuffle=True, seed=0, num_workers=2)
    elif how == "stateful":
        kw["train_dataloader"] = ds.to_torch_dataloader(batch_size=BATCH, shuffle=True, seed=0, stateful=True)
    trainer = DlpipeTrainer(model=tiny_bert(), args=args(out, save_steps=save_steps, accumulation=accumulation),
                            callbacks=[StopAt(stop)] if stop else None, **kw)
    trainer.train(resume_from_checkpoint=resume)
    return TinyBert.seen


def expected(path) -> list[list[int]]:
    return [b for e in range(EPOCHS) for b in epoch_order(path, e)]


def test_trains_on_the_loaders_epochs(corpus, tmp_path):
    seen = train(corpus, tmp_path, "dataset", save_steps=100)
    assert seen == expected(corpus)  # epoch 1 reshuffled: set_epoch reached the loader
    for e in range(EPOCHS):
        assert sorted(r for b in seen[e * PER_EPOCH:(e + 1) * PER_EPOCH] for r in b) == list(range(N))
    assert seen[:PER_EPOCH] != seen[PER_EPOCH:]


@pytest.mark.parametrize(("how", "stop", "accumulation"), [
    ("dataset", 5, 1),    # mid epoch 0
    ("dataset", 12, 1),   # the end of epoch 0
    ("dataset", 8, 2),    # mid epoch 1 (6 updates an epoch), gradient accumulation
    ("workers", 17, 1),   # mid epoch 1, two DataLoader workers
    ("stateful", 5, 1),   # torchdata's StatefulDataLoader
    ("stateful", 12, 1),
])
def test_resume_mid_epoch_sees_each_record_once(corpus, tmp_path, how, stop, accumulation):
    """Stopped after ``stop`` updates (a checkpoint there), then resumed: together exactly the
    uninterrupted run's batches (which ``test_trains_on_the_loaders_epochs`` shows to be the
    loader's own epochs)."""
    full = expected(corpus)
    before = train(corpus, tmp_path, how, stop=stop, save_steps=stop, accumulation=accumulation)
    assert before == full[:stop * accumulation]
    state = json.loads((tmp_path / f"checkpoint-{stop}" / STATE_FILE.format(rank=0)).read_text())
    assert state.get("batches_yielded", state.get("_num_yielded")) in ((stop * accumulation) % PER_EPOCH, PER_EPOCH)
    after = train(corpus, tmp_path, how, resume=True, save_steps=stop, accumulation=accumulation)
    assert before + after == full


def test_resume_without_state_file_uses_the_trainers_count(corpus, tmp_path):
    train(corpus, tmp_path, "dataset", stop=5, save_steps=5)
    os.remove(loader_state_path(tmp_path / "checkpoint-5"))
    after = train(corpus, tmp_path, "dataset", resume=str(tmp_path / "checkpoint-5"), save_steps=5)
    assert after == expected(corpus)[5:]


def test_resume_under_other_loader_settings_is_refused(corpus, tmp_path):
    train(corpus, tmp_path, "dataset", stop=5, save_steps=5)
    ds = dlpipe.load_dataset(corpus)
    other = ds.to_torch_dataloader(batch_size=BATCH, shuffle=True, seed=1)
    trainer = DlpipeTrainer(model=tiny_bert(), args=args(tmp_path, save_steps=5), train_dataloader=other)
    with pytest.raises(ConfigError, match="seed"):
        trainer.train(resume_from_checkpoint=True)


def test_columns_follow_the_models_forward(corpus, tmp_path):
    """A model whose forward has no ``rid``: the loader built from the dataset leaves it out (as
    ``remove_unused_columns`` does), and evaluation runs over a ShardDataset too."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    ds = dlpipe.load_dataset(corpus)
    trainer = DlpipeTrainer(model=model, args=args(tmp_path, save_steps=100), train_dataset=ds, eval_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and metrics["epoch"] == EPOCHS
