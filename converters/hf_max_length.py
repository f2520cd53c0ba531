"""Reshard a HF dataset tokenized with ``padding="max_length"`` (saved with ``save_to_disk``).

    python converters/hf_max_length.py tokenized/ shards/ --num-shards 8

Lengths come from ``attention_mask`` (right or left padding, as the tokenizer wrote it), which is
then dropped (it is derivable); text and other non-numeric columns are left out; a
``DatasetDict`` directory is resharded split by split into ``OUTPUT/<split>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dlpipe

_NUMERIC = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
            "float64", "bool"}


def numeric_columns(split_dir: Path) -> list[str]:
    """Columns whose HF feature is numeric (Value, or List/Sequence of numeric values)."""
    features = json.loads((split_dir / "dataset_info.json").read_text())["features"]

    def numeric(f) -> bool:
        if f.get("_type") == "Value":
            return f["dtype"] in _NUMERIC
        if f.get("_type") in ("List", "Sequence", "LargeList"):
            return numeric(f["feature"])
        return False

    return [name for name, f in features.items() if numeric(f)]


def reshard_tokenized(source: str, output: str, *, num_shards: int | None = None,
                      workers: int | None = None, fmt: str = "tfrecord") -> dict[str, dlpipe.ReshardSummary]:
    root = Path(source)
    splits = {}
    if (root / "dataset_dict.json").exists():
        names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        splits = {name: (root / name, Path(output) / name) for name in names}
    else:
        splits = {"train": (root, Path(output))}
    results = {}
    for name, (src, out) in splits.items():
        results[name] = dlpipe.reshard(
            [str(src)], out, format=fmt, columns=numeric_columns(src), mask_column="attention_mask",
            num_shards=num_shards, workers=workers, overwrite=True,
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--num-shards", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--format", default="tfrecord", choices=["tfrecord", "webdataset"])
    a = p.parse_args()
    try:
        for split, summary in reshard_tokenized(a.source, a.output, num_shards=a.num_shards, workers=a.workers,
                                                fmt=a.format).items():
            print(f"{split}: {summary}")
    except dlpipe.DlpipeError as e:
        sys.exit(f"dlpipe: error: {e}")


if __name__ == "__main__":
    main()
