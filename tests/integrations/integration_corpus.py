"""Helpers of the integration tests: a small classification corpus, ``input_ids`` (lengths 1..12,
ids < 100), an int ``labels`` column (0/1) and ``rid`` (the record's id, to check which records a
framework trained on), 96 records in 3 TFRecord shards (batch size 8: 12 batches an epoch), and
the order dlpipe's own loader plays each epoch in, to compare a framework's run with."""

from __future__ import annotations

import numpy as np

import dlpipe

N = 96
BATCH = 8
WIDTH = 12


def build_corpus(out) -> str:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, WIDTH + 1, N)
    ids = rng.integers(1, 100, (N, WIDTH))
    ids[np.arange(WIDTH)[None, :] >= lengths[:, None]] = 0
    src = out.parent / f"{out.name}-src"
    src.mkdir(parents=True, exist_ok=True)
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", (ids[:, 0] % 2).astype(np.int64))  # learnable from the first id
    np.save(src / "rid.npy", np.arange(N, dtype=np.int64))
    dlpipe.reshard([str(src / f"{c}.npy") for c in ("input_ids", "labels", "rid")], out, pad_id=0,
                   num_shards=3, workers=1, overwrite=True)
    return str(out)


def epoch_order(path: str, epoch: int, *, seed: int = 0, batch_size: int = BATCH) -> list[list[int]]:
    """The record ids of each batch of ``epoch``, as dlpipe's own PyTorch loader plays them."""
    loader = dlpipe.load_dataset(path).to_torch_dataloader(batch_size=batch_size, shuffle=True, seed=seed)
    loader.set_epoch(epoch)
    return [b["rid"].tolist() for b in loader]
