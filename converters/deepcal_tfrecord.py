"""Reshard a DeepCAL-style legacy TFRecord: one file of Examples, each an address as character
codes padded with 0 to ``FixedLenFeature([128], tf.int64)`` plus ``coords`` ([lat, lon] floats).

    python converters/deepcal_tfrecord.py legacy.tfrecord shards/ --num-shards 16
    python converters/deepcal_tfrecord.py --make-legacy legacy.tfrecord --records 100000

``--make-legacy`` writes such a file with TensorFlow from the bench corpus (real place names),
the way the original pipeline did, so the recipe can be tried end to end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import dlpipe

PAD_ID = 0
TEXT_FEATURE = "address"


def reshard_legacy(legacy: str, output: str, *, num_shards: int | None = None, workers: int | None = None,
                   shuffle: bool = True, seed: int = 0, fmt: str = "tfrecord") -> dlpipe.ReshardSummary:
    """The recipe: the address is the only padded feature; coordinates stay fixed-size."""
    return dlpipe.reshard(
        [legacy], output, format=fmt, pad_id=PAD_ID, sequence_columns=[TEXT_FEATURE],
        num_shards=num_shards, workers=workers, shuffle=shuffle, seed=seed,
        splits="train=0.95,validation=0.05", overwrite=True,
    )


def make_legacy(path: str, records: int, width: int = 128) -> None:
    """Write the legacy padded file as the original TF pipeline did (one Example per record)."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from corpus import build_corpus  # bench/corpus.py: the DeepCAL-like corpus

    tmp = Path(path).with_suffix(".corpus")
    build_corpus(tmp, num_records=records)
    ids = np.load(tmp / "input_ids.npy", mmap_mode="r")
    coords = np.load(tmp / "labels.npy", mmap_mode="r")
    with tf.io.TFRecordWriter(path) as w:
        for i in range(len(ids)):
            feature = {
                TEXT_FEATURE: tf.train.Feature(int64_list=tf.train.Int64List(value=ids[i, :width])),
                "coords": tf.train.Feature(float_list=tf.train.FloatList(value=coords[i])),
            }
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("legacy")
    p.add_argument("output", nargs="?")
    p.add_argument("--num-shards", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--format", default="tfrecord", choices=["tfrecord", "webdataset"])
    p.add_argument("--make-legacy", action="store_true", help="write LEGACY from the bench corpus instead")
    p.add_argument("--records", type=int, default=100_000)
    a = p.parse_args()
    if a.make_legacy:
        make_legacy(a.legacy, a.records)
        print(f"wrote {a.legacy}")
        return
    if not a.output:
        p.error("OUTPUT is required unless --make-legacy")
    try:
        print(reshard_legacy(a.legacy, a.output, num_shards=a.num_shards, workers=a.workers, fmt=a.format))
    except dlpipe.DlpipeError as e:
        sys.exit(f"dlpipe: error: {e}")


if __name__ == "__main__":
    main()
