"""The shuffle benchmark's contenders: dlpipe's loaders and the peers (litdata, grain), each
over the same source, with ``record_id`` = source position in every record; and the data they
read (the corpus plus ``record_id.npy``, dlpipe's shards, the peers' own conversions).

A contender is a ``Maker``: (make a fresh loader for one epoch, the record ids of one yielded
item). ``group_makers`` builds one child process's contenders (``shuffle_bench.py --group``).
Nothing here imports dlpipe at import time: with ``--dlpipe-src`` the dlpipe measured is
whichever one is first on ``sys.path`` when a contender is built.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZE = 256
SEED = 0
BUFFER_SIZE = 1000  # dlpipe's default ShardDataset buffer_size
PAD_ID = 0  # the corpus pads input_ids with 0; 0 never occurs in the text
LITDATA_CHUNK_BYTES = "64MB"  # litdata's own default chunk size (optimize requires one)
GROUP_ORDER = ("torch", "tf", "iter", "litdata", "grain")

# name -> (child process group, what); the order is the order of the table
CONTENDERS: dict[str, tuple[str, str]] = {
    "dlpipe-torch-w0": (
        "torch",
        "`load_dataset(out).shuffle(seed=0, buffer_size=1000).to_torch_dataloader(batch_size=256,"
        " num_workers=0)`",
    ),
    "dlpipe-torch-w2": ("torch", "the same, `num_workers=2`"),
    "dlpipe-tf": (
        "tf",
        "`load_dataset(out).shuffle(seed=0).to_tf_dataset(batch_size=256,"
        ' columns=["input_ids", "record_id"], label_cols=["labels"])`',
    ),
    "dlpipe-iter": (
        "iter",
        "`for rec in load_dataset(out).shuffle(seed=0)`: one dict of numpy arrays per record",
    ),
    "litdata": (
        "litdata",
        f'`litdata.optimize(..., chunk_bytes="{LITDATA_CHUNK_BYTES}")` (one sample dict per'
        " record, padding stripped) → `StreamingDataset(shuffle=True, seed=0)` in"
        " `StreamingDataLoader(batch_size=256, collate_fn=padding collate)`, 0 workers",
    ),
    "grain-map": (
        "grain",
        "numpy-backed `RandomAccessDataSource` (padding stripped into one flat array + offsets)"
        " → `grain.MapDataset.source(src).shuffle(seed=0).batch(256, batch_fn=padding collate)`",
    ),
    "grain-dataloader": (
        "grain",
        "the same source in `grain.DataLoader(sampler=IndexSampler(N, shuffle=True, seed=0,"
        " num_epochs=1), operations=[Batch(256, batch_fn=padding collate)], worker_count=0)`",
    ),
    "grain-dataloader-threads0": (
        "grain",
        "the same with `read_options=ReadOptions(num_threads=0)` (grain's default reads with 16"
        " threads, which on 2 cores cost more than they give), for information",
    ),
}

# peers asked for but not run, and why (no fake rows)
LEFT_OUT: dict[str, str] = {
    "mosaicml-streaming": (
        "not installable beside this venv's pinned numpy 2.4.6 / torch 2.13.0 without changing"
        " other packages: 0.11.0-0.13.0 (0.13.0 is the newest) require numpy<2.2; the newest"
        " release pip can pair with numpy 2.4.6, 0.10.0, requires transformers<5, which would"
        " downgrade huggingface_hub 2.3.0 → 0.36.2 (a dependency of `datasets`) and xxhash"
        " 4.1 → 3.8 in the shared environment."
    ),
}

PEER_DISTS = ("litdata", "grain", "mosaicml-streaming")


# --- data --------------------------------------------------------------------------------------


def build_source(corpus_dir: Path, records: int, seed: int) -> dict[str, Any]:
    """The padded corpus plus ``record_id.npy`` (int64 [N], 0..N-1)."""
    from dlpipe.benchmark.corpus import build_corpus

    stats = build_corpus(corpus_dir, records, seed)
    path = corpus_dir / "record_id.npy"
    if not path.is_file() or np.load(path, mmap_mode="r").shape != (records,):
        np.save(path, np.arange(records, dtype=np.int64))
    return stats


def reshard(corpus_dir: Path, out: Path) -> dict[str, Any]:
    """dlpipe's default reshard (only ``pad_id=0`` given); what it chose."""
    import dlpipe
    from dlpipe.manifest import load_manifest

    sources = [f"{c}={corpus_dir / f'{c}.npy'}" for c in ("input_ids", "labels", "record_id")]
    t0 = time.perf_counter()
    dlpipe.reshard(sources, str(out), pad_id=PAD_ID, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    info = load_manifest(out)
    return {
        "seconds": round(seconds, 2),
        "format": info.format,
        "compression": info.compression,
        "num_shards": len(info.shards),
        "splits": sorted({s.split for s in info.shards}),
        "shard_bytes": sum(s.num_bytes for s in info.shards),
        "columns": {n: c.to_json() for n, c in info.columns.items()},
        "call": f"dlpipe.reshard([{', '.join(repr(s.split('=')[0] + '=...') for s in sources)}],"
        " out, pad_id=0)",
    }


def unpadded_rows(corpus_dir: Path, start: int, stop: int) -> Iterable[dict[str, Any]]:
    """Records ``start:stop`` of the source arrays as sample dicts, padding stripped."""
    ids = np.load(corpus_dir / "input_ids.npy", mmap_mode="r")
    labels = np.load(corpus_dir / "labels.npy", mmap_mode="r")
    rid = np.load(corpus_dir / "record_id.npy", mmap_mode="r")
    block = np.asarray(ids[start:stop])
    lengths = np.count_nonzero(block != PAD_ID, axis=1)
    lab = np.asarray(labels[start:stop])
    rids = np.asarray(rid[start:stop])
    for j in range(stop - start):
        yield {
            "input_ids": block[j, : lengths[j]].copy(),
            "labels": lab[j].copy(),
            "record_id": int(rids[j]),
        }


def pad_collate(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-record samples → padded numpy batch: ``input_ids`` padded to the batch's longest,
    ``attention_mask``, stacked ``labels``, ``record_id`` [B]."""
    lengths = np.fromiter((len(s["input_ids"]) for s in samples), np.int64, len(samples))
    ids = np.full((len(samples), max(int(lengths.max()), 1)), PAD_ID, np.int64)
    for j, s in enumerate(samples):
        ids[j, : lengths[j]] = s["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64),
        "labels": np.stack([np.asarray(s["labels"]) for s in samples]),
        "record_id": np.fromiter((int(s["record_id"]) for s in samples), np.int64, len(samples)),
    }


# --- contenders: each returns (make a fresh epoch's iterable, ids of one yielded item) ---------

Maker = tuple[Callable[[], Iterable[Any]], Callable[[Any], Any]]


def _np(x: Any) -> np.ndarray:
    return (x.numpy() if hasattr(x, "numpy") else np.asarray(x)).reshape(-1)


def dlpipe_torch(shards: Path, workers: int) -> Maker:
    import dlpipe

    ds = dlpipe.load_dataset(shards, split="train").shuffle(seed=SEED, buffer_size=BUFFER_SIZE)

    def make() -> Iterable[Any]:
        return ds.to_torch_dataloader(batch_size=BATCH_SIZE, num_workers=workers)

    return make, lambda batch: _np(batch["record_id"])


def dlpipe_tf(shards: Path) -> Maker:
    import dlpipe

    ds = dlpipe.load_dataset(shards, split="train").shuffle(seed=SEED)

    def make() -> Iterable[Any]:
        return ds.to_tf_dataset(
            batch_size=BATCH_SIZE, columns=["input_ids", "record_id"], label_cols=["labels"]
        )

    return make, lambda batch: _np(batch[0]["record_id"])


def dlpipe_iter(shards: Path) -> Maker:
    import dlpipe

    ds = dlpipe.load_dataset(shards, split="train").shuffle(seed=SEED)
    return lambda: ds, lambda rec: int(rec["record_id"])


def _litdata_write(item: tuple[str, int, int]) -> Iterable[dict[str, Any]]:
    """litdata ``optimize`` fn: one input = a span of source records, yields one sample each."""
    corpus_dir, start, stop = item
    yield from unpadded_rows(Path(corpus_dir), start, stop)


def litdata_peer(corpus_dir: Path, n: int, work: Path, convert: dict[str, Any]) -> Maker:
    import litdata

    out = work / f"litdata-{n}"
    spans = [(str(corpus_dir), s, min(s + 8192, n)) for s in range(0, n, 8192)]
    t0 = time.perf_counter()
    litdata.optimize(
        fn=_litdata_write, inputs=spans, output_dir=str(out), chunk_bytes=LITDATA_CHUNK_BYTES,
        mode="overwrite", verbose=False,
    )  # fmt: skip
    convert["litdata"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "files": sum(1 for f in out.rglob("*") if f.is_file()),
    }

    def make() -> Iterable[Any]:
        ds = litdata.StreamingDataset(str(out), shuffle=True, seed=SEED)
        return litdata.StreamingDataLoader(
            ds, batch_size=BATCH_SIZE, num_workers=0, collate_fn=pad_collate
        )

    return make, lambda batch: _np(batch["record_id"])


class ArraySource:
    """A grain ``RandomAccessDataSource``: the source arrays with padding stripped into one
    flat int64 array plus offsets, labels and record ids; one sample dict per index."""

    def __init__(self, corpus_dir: Path, n: int) -> None:
        parts, lengths, labels, rids = [], [], [], []
        for start in range(0, n, 65_536):
            rows = list(unpadded_rows(corpus_dir, start, min(start + 65_536, n)))
            parts += [r["input_ids"] for r in rows]
            lengths += [len(r["input_ids"]) for r in rows]
            labels += [r["labels"] for r in rows]
            rids += [r["record_id"] for r in rows]
        self.values = np.concatenate(parts)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.labels = np.stack(labels)
        self.record_id = np.asarray(rids, np.int64)

    def __len__(self) -> int:
        return len(self.record_id)

    def __getitem__(self, i: Any) -> dict[str, Any]:
        i = int(i)
        return {
            "input_ids": self.values[self.offsets[i] : self.offsets[i + 1]],
            "labels": self.labels[i],
            "record_id": self.record_id[i],
        }

    def __repr__(self) -> str:
        return f"ArraySource(num_records={len(self)})"


def grain_peers(corpus_dir: Path, n: int, convert: dict[str, Any]) -> dict[str, Maker]:
    import grain
    import grain.python as gp

    t0 = time.perf_counter()
    src = ArraySource(corpus_dir, n)
    convert["grain"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": int(src.values.nbytes + src.offsets.nbytes + src.labels.nbytes
                     + src.record_id.nbytes),
        "files": 0,
    }  # fmt: skip

    def make_map() -> Iterable[Any]:
        return grain.MapDataset.source(src).shuffle(seed=SEED).batch(BATCH_SIZE, batch_fn=pad_collate)

    def make_loader(threads: int | None = None) -> Iterable[Any]:
        sampler = gp.IndexSampler(len(src), shuffle=True, seed=SEED, num_epochs=1)
        extra = {} if threads is None else {"read_options": gp.ReadOptions(num_threads=threads)}
        return gp.DataLoader(
            data_source=src, sampler=sampler,
            operations=[gp.Batch(BATCH_SIZE, batch_fn=pad_collate)], worker_count=0, **extra,
        )  # fmt: skip

    ids = lambda batch: _np(batch["record_id"])  # noqa: E731
    return {
        "grain-map": (make_map, ids),
        "grain-dataloader": (make_loader, ids),
        "grain-dataloader-threads0": (lambda: make_loader(0), ids),
    }


def group_makers(group: str, names: list[str], args: argparse.Namespace,
                 convert: dict[str, Any]) -> dict[str, Callable[[], Maker]]:  # fmt: skip
    """Lazy makers of one group's contenders (a peer's conversion happens when first asked)."""
    shards, corpus_dir = Path(args.shards), Path(args.corpus)
    peer_n, work = args.peer_records, Path(args.cache_dir)
    if group == "torch":
        return {"dlpipe-torch-w0": lambda: dlpipe_torch(shards, 0),
                "dlpipe-torch-w2": lambda: dlpipe_torch(shards, 2)}  # fmt: skip
    if group == "tf":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        return {"dlpipe-tf": lambda: dlpipe_tf(shards)}
    if group == "iter":
        return {"dlpipe-iter": lambda: dlpipe_iter(shards)}
    if group == "litdata":
        return {"litdata": lambda: litdata_peer(corpus_dir, peer_n, work, convert)}
    if group == "grain":
        cache: dict[str, dict[str, Maker]] = {}

        def get(name: str) -> Maker:
            if "all" not in cache:
                cache["all"] = grain_peers(corpus_dir, peer_n, convert)
            return cache["all"][name]

        return {n: (lambda n=n: get(n)) for n in names}
    raise ValueError(group)
