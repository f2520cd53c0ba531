"""From a HF dataset tokenized with ``padding="max_length"`` to dlpipe shards and both loaders.

    python examples/hf_max_length.py [--out examples-out/hf]

The "tokenizer" is character-level (no model download): it returns ``input_ids`` and
``attention_mask`` padded to ``max_length`` exactly as a HF tokenizer called with
``padding="max_length", truncation=True`` does. dlpipe finds the lengths from the mask, drops
the mask (derivable) and the text column, and the loaders pad each batch to its longest record.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import dlpipe
from dlpipe.benchmark.corpus import place_strings
from dlpipe.inspect import describe_dataset

MAX_LENGTH = 64


def tokenize(batch: dict) -> dict:
    ids, masks = [], []
    for text in batch["text"]:
        codes = [ord(c) for c in text][:MAX_LENGTH]
        ids.append(codes + [0] * (MAX_LENGTH - len(codes)))
        masks.append([1] * len(codes) + [0] * (MAX_LENGTH - len(codes)))
    return {"input_ids": ids, "attention_mask": masks}


def main() -> None:
    import datasets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--out", default="examples-out/hf")
    a = p.parse_args()
    out = Path(a.out)
    places = place_strings()[: a.records]
    ds = datasets.Dataset.from_dict({"text": [t for t, _, _ in places],
                                     "labels": [[lat, lon] for _, lat, lon in places]})
    ds = ds.map(tokenize, batched=True).cast_column("labels", datasets.Sequence(datasets.Value("float32"), length=2))
    ds.save_to_disk(str(out / "tokenized"))
    summary = dlpipe.reshard([out / "tokenized"], out / "shards", columns=["input_ids", "attention_mask", "labels"],
                             num_shards=4, overwrite=True)
    print(summary)
    print(describe_dataset(str(out / "shards")))

    shards = dlpipe.load_dataset(out / "shards")
    batch = next(iter(shards.to_torch_dataloader(batch_size=8)))
    print("torch batch:", {k: tuple(v.shape) for k, v in batch.items()})
    features, labels = next(iter(shards.to_tf_dataset(batch_size=8, columns=["input_ids", "attention_mask"],
                                                      label_cols=["labels"])))
    print("tf batch:", {k: tuple(v.shape) for k, v in features.items()}, "labels", tuple(labels.shape))
    real = int(np.asarray(batch["attention_mask"]).sum())
    print(f"padding efficiency of that batch: {real / batch['attention_mask'].numel():.0%} "
          f"(the padded source: {real / (8 * MAX_LENGTH):.0%})")


if __name__ == "__main__":
    main()
