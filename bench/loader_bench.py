"""Loader benchmark: dlpipe's tf.data and PyTorch loaders against the pipelines people write.

All contenders read the same DeepCAL-like corpus (``corpus.py``, default 200k records), in one
run on one machine, batch size 256, shuffled, and are iterated in eager Python the way a
training loop does (``for batch in loader``). The shards are written once per run by
``dlpipe.reshard`` into ``bench/.cache/loader-shards/`` (TFRecord and WebDataset, 8 shards).

TF side: ``dlpipe-tf`` (``ShardDataset.to_tf_dataset``), ``tfdata-handwritten`` (TensorFlow's
performance guide over the same TFRecord shards, decoding the encodings in the manifest) and
``hf-tf`` (HF ``datasets`` over the padded arrays, ``Dataset.to_tf_dataset``).
PyTorch side: ``dlpipe-torch`` with 0 and 2 workers, the ``tfrecord`` package's
``MultiTFRecordDataset``, ``webdataset.WebDataset`` over dlpipe's ``.tar.gz`` shards, and HF
``with_format("torch")`` with batched (``__getitems__``) access; the peers at 0 and 2 workers.

Each run builds a fresh loader, takes ``--warmup`` batches untimed (worker start-up, shuffle
buffers), then times ``--batches`` batches; ``--repeat`` rounds, every contender once per
round, reported as median (min-max). Every batch's ``input_ids`` go through numpy to count real
tokens (non-pad ids; 0 never occurs in the text), so tokens/s counts real tokens and padding
efficiency = real tokens / tokens in the padded batches.

    python bench/loader_bench.py [--records 200000] [--repeat 3] [--only dlpipe-torch-w0,...]
    python bench/loader_bench.py --render-only

PyTorch contenders run before TensorFlow is imported (a forked DataLoader worker then does not
inherit TF's threads). This is a benchmark, not a test: targets print PASS/FAIL, exit code 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from corpus import PAD_ID, build_corpus
from machine import machine_busy_seconds, machine_info
from results_io import record

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"
SHUFFLE_BUFFER = 1000  # records; dlpipe's default ShardDataset buffer_size, used by the peers too

# name -> (side, what); the order is the order of the tables
CONTENDERS: dict[str, tuple[str, str]] = {
    "dlpipe-torch-w0": (
        "torch",
        "`to_torch_dataloader(batch_size=256, shuffle=True, num_workers=0)`",
    ),
    "dlpipe-torch-w2": ("torch", "the same, `num_workers=2`"),
    "dlpipe-torch-w0-bucket": ("torch", '`num_workers=0`, `bucket_boundaries="auto"`'),
    "tfrecord-torch-w0": (
        "torch",
        "`tfrecord.torch.MultiTFRecordDataset` (dlpipe's `.index` files) + padding collate, 0 workers",
    ),
    "tfrecord-torch-w2": ("torch", "the same, 2 workers"),
    "wds-torch-w0": (
        "torch",
        "`webdataset.WebDataset(.tar.gz)`.shuffle.decode.to_tuple.batched(padding collate), 0 workers",
    ),
    "wds-torch-w2": ("torch", "the same in `wds.WebLoader`, 2 workers"),
    "hf-torch-w0": (
        "torch",
        'HF `Dataset` (padded [N,128]) `.with_format("torch")`, `BatchSampler` as sampler, 0 workers',
    ),
    "hf-torch-w2": ("torch", "the same, 2 workers"),
    "dlpipe-tf": (
        "tf",
        '`to_tf_dataset(batch_size=256, columns=["input_ids"], label_cols=["labels"], shuffle=True, prefetch=True)`',
    ),
    "dlpipe-tf-bucket": ("tf", 'the same with `bucket_boundaries="auto"`'),
    "tfdata-handwritten": (
        "tf",
        "files (shuffled) → `interleave(TFRecordDataset, cycle_length=8)` → `shuffle(1000)` → `batch` → `map(parse_example + decode)` → `prefetch`; AUTOTUNE, `deterministic=False`",
    ),
    "tfdata-handwritten-tfcycle": (
        "tf",
        "the same without `cycle_length` (TF's default: one file per core, here 2), for information",
    ),
    "tfdata-handwritten-blocks64": (
        "tf",
        "the same with records in blocks of 64 through interleave and `shuffle(1000 // 64)`, then `rebatch(256)` (dlpipe's block trick), for information",
    ),
    "hf-tf": (
        "tf",
        "HF `Dataset` (padded [N,128]) `.to_tf_dataset(batch_size=256, ..., shuffle=True)`",
    ),
}

# --- data ------------------------------------------------------------------------------------


def write_shards(corpus_dir: Path, out: Path, num_shards: int) -> dict[str, Any]:
    """TFRecord and WebDataset shards of the corpus with dlpipe's defaults; what was chosen."""
    import dlpipe
    from dlpipe.manifest import load_manifest

    chosen: dict[str, Any] = {}
    sources = [f"input_ids={corpus_dir / 'input_ids.npy'}", f"labels={corpus_dir / 'labels.npy'}"]
    for fmt in ("tfrecord", "webdataset"):
        t0 = time.perf_counter()
        dlpipe.reshard(
            sources, str(out / fmt), format=fmt, num_shards=num_shards, pad_id=PAD_ID,
            overwrite=True, progress=False,
        )  # fmt: skip
        info = load_manifest(out / fmt)
        chosen[fmt] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "compression": info.compression,
            "num_shards": len(info.shards),
            "shard_bytes": sum(s.num_bytes for s in info.shards),
            "columns": {n: c.to_json() for n, c in info.columns.items()},
        }
    return chosen


def load_padded(corpus_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(corpus_dir / "input_ids.npy"), np.load(corpus_dir / "labels.npy")


def hf_dataset(corpus_dir: Path) -> Any:
    """The padded arrays as an in-memory HF ``datasets.Dataset`` (what a DeepCAL user has)."""
    import datasets

    ids, labels = load_padded(corpus_dir)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


# --- PyTorch contenders ------------------------------------------------------------------------


def pad_collate(records: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The usual per-record collate: pad ``input_ids`` to the batch's longest, mask, stack labels."""
    import torch

    ids = [torch.from_numpy(r[0]) for r in records]
    lengths = torch.tensor([len(x) for x in ids])
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=PAD_ID)
    mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).long()
    labels = torch.from_numpy(np.stack([r[1] for r in records]))
    return {"input_ids": padded, "attention_mask": mask, "labels": labels}


def dlpipe_torch(shards: Path, workers: int, bucket: bool = False) -> Callable[[], Iterable]:
    import dlpipe

    ds = dlpipe.load_dataset(shards / "tfrecord")
    extra = {"bucket_boundaries": "auto"} if bucket else {}
    loader = ds.to_torch_dataloader(batch_size=256, shuffle=True, num_workers=workers, **extra)
    return lambda: loader


def tfrecord_torch(shards: Path, workers: int) -> Callable[[], Iterable]:
    """The tfrecord package's reader with dlpipe's index files, described from the manifest."""
    from tfrecord.torch.dataset import MultiTFRecordDataset
    from torch.utils.data import DataLoader

    from dlpipe.manifest import load_manifest

    info = load_manifest(shards / "tfrecord")
    cols = info.columns
    kind = {"int64_list": "int", "float_list": "float", "raw": "byte"}
    description = {n: kind[c.encoding] for n, c in cols.items()}

    def decode(name: str, value: np.ndarray) -> np.ndarray:
        enc = cols[name]
        if enc.encoding == "raw":  # the package returns bytes: little-endian storage dtype
            value = np.frombuffer(value, np.dtype(enc.storage_dtype).newbyteorder("<"))
        value = value.astype(enc.dtype, copy=False)
        return value if enc.variable else value.reshape(enc.shape)

    def transform(rec: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return decode("input_ids", rec["input_ids"]), decode("labels", rec["labels"])

    root = shards / "tfrecord"
    names = [s.path.removesuffix(".tfrecord") for s in info.split_shards("train")]
    ds = MultiTFRecordDataset(
        f"{root}/{{}}.tfrecord", f"{root}/{{}}.tfrecord.index", dict.fromkeys(names, 1.0),
        description=description, shuffle_queue_size=SHUFFLE_BUFFER, transform=transform,
        infinite=False,
    )  # fmt: skip
    return lambda: DataLoader(ds, batch_size=256, num_workers=workers, collate_fn=pad_collate)


def wds_torch(shards: Path, workers: int) -> Callable[[], Iterable]:
    import webdataset as wds

    from dlpipe.manifest import load_manifest

    info = load_manifest(shards / "webdataset")
    urls = [str(shards / "webdataset" / s.path) for s in info.split_shards("train")]
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(SHUFFLE_BUFFER)
        .decode()
        .to_tuple("input_ids.npy", "labels.npy")
        .batched(256, collation_fn=pad_collate, partial=True)
    )
    return lambda: wds.WebLoader(ds, batch_size=None, num_workers=workers)


def hf_torch(hf: Any, workers: int) -> Callable[[], Iterable]:
    """Batched access: the sampler yields 256 indices, HF gathers them in one ``__getitems__``."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    ds = hf.with_format("torch")
    gen = torch.Generator().manual_seed(0)
    sampler = BatchSampler(RandomSampler(ds, generator=gen), batch_size=256, drop_last=False)
    return lambda: DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers)


# --- TF contenders -----------------------------------------------------------------------------


def dlpipe_tf(shards: Path, bucket: bool = False) -> Callable[[], Iterable]:
    import dlpipe

    ds = dlpipe.load_dataset(shards / "tfrecord")
    extra = {"bucket_boundaries": "auto"} if bucket else {}
    tfds = ds.to_tf_dataset(
        batch_size=256, columns=["input_ids"], label_cols=["labels"], shuffle=True, prefetch=True,
        **extra,
    )  # fmt: skip
    return lambda: tfds


def tf_decoder(info: Any) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """``parse_example`` spec and a batch decoder for dlpipe's encodings (``dataset_info.json``)."""
    import tensorflow as tf

    spec: dict[str, Any] = {}
    for name, enc in info.columns.items():
        if enc.encoding == "raw":
            spec[name] = tf.io.FixedLenFeature([], tf.string)
        elif enc.variable:
            spec[name] = tf.io.VarLenFeature(
                tf.int64 if enc.encoding == "int64_list" else tf.float32
            )
        else:
            kind = tf.int64 if enc.encoding == "int64_list" else tf.float32
            spec[name] = tf.io.FixedLenFeature(list(enc.shape), kind)

    def column(name: str, value: Any) -> Any:
        enc = info.columns[name]
        pad = info.pad_values.get(name, 0)
        if enc.encoding == "raw":
            storage = tf.as_dtype(np.dtype(enc.storage_dtype).name)
            item = np.dtype(enc.storage_dtype).itemsize * enc.inner
            if enc.variable:  # zero bytes pad to the batch's longest; pad id 0 here
                width = tf.reduce_max(tf.strings.length(value)) // item * item
                value = tf.io.decode_raw(value, storage, fixed_length=tf.maximum(width, item))
                value = tf.reshape(value, [tf.shape(value)[0], -1, *enc.shape[1:]])
            else:
                value = tf.io.decode_raw(value, storage, fixed_length=item)
                value = tf.reshape(value, [-1, *enc.shape])
            return tf.cast(value, enc.dtype)
        if enc.variable:
            value = tf.sparse.to_dense(value, default_value=tf.cast(pad, value.dtype))
        return tf.cast(value, enc.dtype)

    def decode(serialized: Any) -> Any:
        parsed = tf.io.parse_example(serialized, spec)
        return column("input_ids", parsed["input_ids"]), column("labels", parsed["labels"])

    return spec, decode


def tfdata_handwritten(
    shards: Path, cycle_length: int | None = None, block: int = 1
) -> Callable[[], Iterable]:
    """TensorFlow's performance guide over dlpipe's TFRecord shards, reading ``cycle_length``
    files at once (None: every shard, as dlpipe does for 8 shards; 0: TF's default).

    ``block`` > 1 moves records through interleave and shuffle in blocks of that many
    consecutive records, then ``rebatch``-es: fewer tf.data elements, a coarser shuffle."""
    import tensorflow as tf

    from dlpipe.manifest import load_manifest

    info = load_manifest(shards / "tfrecord")
    if info.columns["input_ids"].variable is False or info.pad_values.get("input_ids", 0) != 0:
        raise RuntimeError("the hand-written pipeline assumes variable input_ids padded with 0")
    _, decode = tf_decoder(info)
    files = [str(shards / "tfrecord" / s.path) for s in info.split_shards("train")]
    compression = {"gzip": "GZIP", "zlib": "ZLIB"}.get(info.compression or "", "")
    autotune = tf.data.AUTOTUNE

    def records(f: Any) -> Any:
        data = tf.data.TFRecordDataset(f, compression_type=compression)
        return data.batch(block) if block > 1 else data

    ds = (
        tf.data.Dataset.from_tensor_slices(files)
        .shuffle(len(files))
        .interleave(
            records,
            cycle_length=len(files) if cycle_length is None else (cycle_length or None),
            num_parallel_calls=autotune,
            deterministic=False,
        )
        .shuffle(max(1, SHUFFLE_BUFFER // block))
    )
    ds = ds.rebatch(256) if block > 1 else ds.batch(256)
    ds = ds.map(decode, num_parallel_calls=autotune, deterministic=False).prefetch(autotune)
    return lambda: ds


def hf_tf(hf: Any) -> Callable[[], Iterable]:
    ds = hf.to_tf_dataset(
        batch_size=256, columns=["input_ids"], label_cols=["labels"], shuffle=True
    )
    return lambda: ds


# --- measuring ---------------------------------------------------------------------------------


def input_ids_of(batch: Any) -> np.ndarray:
    """The ``input_ids`` of a batch as numpy: dicts, ``(features, labels)`` tuples, tensors."""
    if isinstance(batch, tuple):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch["input_ids"]
    return batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)


def labels_of(batch: Any) -> np.ndarray:
    value = batch[1] if isinstance(batch, tuple) else batch["labels"]
    if isinstance(value, dict):
        value = value["labels"]
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def batches(make_epoch: Callable[[], Iterable], count: int) -> Iterator[Any]:
    """``count`` batches, iterating the loader again (a new epoch) when one runs out."""
    done = 0
    while done < count:
        before = done
        for batch in make_epoch():
            yield batch
            done += 1
            if done == count:
                return
        if done == before:
            raise RuntimeError("the loader yielded no batches")


def tree_cpu_seconds() -> float:
    """CPU seconds of this process (all threads), its live children (DataLoader workers) and
    the children it has reaped (a worker that exits in between still counts)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            total += sum(child.cpu_times()[:2])
    return total


def one_run(make: Callable[[], Callable[[], Iterable]], warmup: int, timed: int) -> dict[str, Any]:
    """Build a loader, take ``warmup`` batches, then time ``timed`` batches."""
    t0 = time.perf_counter()
    it = batches(make(), warmup + timed)
    first = next(it)
    ids, labels = input_ids_of(first), labels_of(first)
    if ids.ndim != 2 or labels.shape != (ids.shape[0], 2):
        raise RuntimeError(f"unexpected batch: input_ids {ids.shape}, labels {labels.shape}")
    for _ in range(warmup - 1):
        next(it)
    setup = time.perf_counter() - t0
    samples = real = padded = lengths = 0
    own0, busy0, t1 = tree_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    for _ in range(timed):
        ids = input_ids_of(next(it))
        samples += ids.shape[0]
        padded += ids.size
        lengths += ids.shape[1]
        real += int(np.count_nonzero(ids != PAD_ID))
    # stop the clock at the last batch, before the generator ends and shuts the loader down
    seconds = time.perf_counter() - t1
    busy = machine_busy_seconds() - busy0
    own = tree_cpu_seconds() - own0
    it.close()
    return {
        "seconds": seconds,
        "setup_seconds": setup,
        "samples": samples,
        "real_tokens": real,
        "padded_tokens": padded,
        "mean_padded_length": lengths / timed,
        "machine_cpu_per_s": busy / seconds,
        "own_cpu_per_s": own / seconds,
        "others_cpu_per_s": max(0.0, busy - own) / seconds,
    }


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    side, what = CONTENDERS[name]
    sps = [r["samples"] / r["seconds"] for r in runs]
    tps = [r["real_tokens"] / r["seconds"] for r in runs]
    last = runs[-1]
    return {
        "name": name,
        "side": side,
        "what": what,
        "samples_per_s": statistics.median(sps),
        "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps),
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_min": min(tps),
        "tokens_per_s_max": max(tps),
        "tokens_per_sample": last["real_tokens"] / last["samples"],
        "padding_efficiency": statistics.median(
            r["real_tokens"] / r["padded_tokens"] for r in runs
        ),
        "mean_padded_length": statistics.median(r["mean_padded_length"] for r in runs),
        "setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
        "machine_cpu_per_s": statistics.median(r["machine_cpu_per_s"] for r in runs),
        "own_cpu_per_s": statistics.median(r["own_cpu_per_s"] for r in runs),
        "others_cpu_per_s": statistics.median(r["others_cpu_per_s"] for r in runs),
        "own_cpu_us_per_sample": statistics.median(
            1e6 * r["own_cpu_per_s"] * r["seconds"] / r["samples"] for r in runs
        ),
        "runs": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs
        ],
    }


def run_side(
    makers: dict[str, Callable[[], Callable[[], Iterable]]], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``--repeat`` rounds, each contender once per round (so load drift hits all alike)."""
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in makers}
    failed: dict[str, str] = {}
    for r in range(args.repeat):
        for name, make in makers.items():
            if name in failed:
                continue
            try:
                run = one_run(make, args.warmup, args.batches)
            except Exception as exc:  # report it and go on with the others
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"  {name}: FAILED {failed[name]}", flush=True)
                traceback.print_exc()
                continue
            results[name].append(run)
            print(
                f"  {name} #{r + 1}: {run['samples'] / run['seconds']:>10,.0f} samples/s "
                f"{run['real_tokens'] / run['seconds']:>12,.0f} tokens/s  "
                f"pad-eff {run['real_tokens'] / run['padded_tokens']:.3f}  "
                f"setup {run['setup_seconds']:.2f} s  CPU own {run['own_cpu_per_s']:.2f} "
                f"others {run['others_cpu_per_s']:.2f}",
                flush=True,
            )
    return [summarize(n, rs) for n, rs in results.items() if rs and n not in failed], failed


def selected(names: Iterable[str], only: set[str] | None) -> list[str]:
    return [n for n in names if only is None or n in only]


def dlpipe_tf_status() -> str | None:
    """None when dlpipe's tf.data loader imports, else why not."""
    try:
        from dlpipe.loaders import tf_data

        tf_data.to_tf_dataset  # noqa: B018
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def accepts_buckets(func_path: str) -> bool:
    import importlib
    import inspect

    module, _, attr = func_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    return "bucket_boundaries" in params


# --- ratios and targets ------------------------------------------------------------------------


def best(by_name: dict[str, dict[str, Any]], *names: str) -> tuple[str, float] | None:
    found = [(n, by_name[n]["samples_per_s"]) for n in names if n in by_name]
    return max(found, key=lambda x: x[1]) if found else None


def judge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ratio or target: what, value, goal, PASS/FAIL (INFO without a goal, n/a if missing)."""
    by = {r["name"]: r for r in rows}
    torch_best = best(by, "dlpipe-torch-w0", "dlpipe-torch-w2")
    tf = best(by, "dlpipe-tf")
    out: list[dict[str, Any]] = []

    def ratio(what: str, num: tuple[str, float] | None, den: tuple[str, float] | None,
              lo: float | None = None, hi: float | None = None) -> None:  # fmt: skip
        value = num[1] / den[1] if num and den else None
        goal = " ".join(x for x in (f"≥ {lo:g}" if lo else "", f"≤ {hi:g}" if hi else "") if x)
        if value is None:
            verdict = "n/a"
        elif lo is None and hi is None:
            verdict = "INFO"
        else:
            verdict = (
                "PASS" if (lo is None or value >= lo) and (hi is None or value <= hi) else "FAIL"
            )
        pair = f"{num[0]} ÷ {den[0]}" if num and den else ""
        out.append(
            {"what": what, "pair": pair, "value": value, "goal": goal or "info", "verdict": verdict}
        )

    ratio("dlpipe to_tf_dataset ÷ hand-written tf.data", tf, best(by, "tfdata-handwritten"), 1.0)
    ratio(
        "dlpipe torch (best of 0/2 workers) ÷ tfrecord package (best)",
        torch_best, best(by, "tfrecord-torch-w0", "tfrecord-torch-w2"), 3.0,
    )  # fmt: skip
    ratio(
        "dlpipe torch (best) ÷ HF with_format(\"torch\") (best)",
        torch_best, best(by, "hf-torch-w0", "hf-torch-w2"), 5.0,
    )  # fmt: skip
    ratio(
        "TF/PyTorch parity: dlpipe to_tf_dataset ÷ dlpipe torch (best)", tf, torch_best, 0.8, 1.25
    )
    ratio(
        "dlpipe to_tf_dataset ÷ hand-written tf.data with the same 64-record blocks",
        tf, best(by, "tfdata-handwritten-blocks64"),
    )  # fmt: skip
    ratio("dlpipe to_tf_dataset ÷ HF to_tf_dataset", tf, best(by, "hf-tf"))
    ratio(
        "dlpipe torch (best) ÷ webdataset (best)",
        torch_best,
        best(by, "wds-torch-w0", "wds-torch-w2"),
    )
    for name in ("dlpipe-torch-w0-bucket", "dlpipe-tf-bucket"):
        eff = by[name]["padding_efficiency"] if name in by else None
        verdict = "n/a" if eff is None else ("PASS" if eff >= 0.9 else "FAIL")
        out.append({"what": "padding efficiency with bucket_boundaries=\"auto\"", "pair": name,
                    "value": eff, "goal": "≥ 0.9", "verdict": verdict})  # fmt: skip
    return out


# --- main --------------------------------------------------------------------------------------


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "torchdata", "datasets", "pyarrow", "webdataset", "tfrecord"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def side_makers(
    side: str, names: list[str], shards: Path, corpus_dir: Path
) -> tuple[dict[str, Callable[[], Callable[[], Iterable]]], dict[str, str]]:
    """The loader factories of one side's selected contenders, and the ones skipped (why)."""
    hf = hf_dataset(corpus_dir) if any(n.startswith("hf-") for n in names) else None
    skipped: dict[str, str] = {}
    makers: dict[str, Callable[[], Callable[[], Iterable]]] = {
        "dlpipe-torch-w0": lambda: dlpipe_torch(shards, 0),
        "dlpipe-torch-w2": lambda: dlpipe_torch(shards, 2),
        "dlpipe-torch-w0-bucket": lambda: dlpipe_torch(shards, 0, bucket=True),
        "tfrecord-torch-w0": lambda: tfrecord_torch(shards, 0),
        "tfrecord-torch-w2": lambda: tfrecord_torch(shards, 2),
        "wds-torch-w0": lambda: wds_torch(shards, 0),
        "wds-torch-w2": lambda: wds_torch(shards, 2),
        "hf-torch-w0": lambda: hf_torch(hf, 0),
        "hf-torch-w2": lambda: hf_torch(hf, 2),
        "dlpipe-tf": lambda: dlpipe_tf(shards),
        "dlpipe-tf-bucket": lambda: dlpipe_tf(shards, bucket=True),
        "tfdata-handwritten": lambda: tfdata_handwritten(shards),
        "tfdata-handwritten-tfcycle": lambda: tfdata_handwritten(shards, cycle_length=0),
        "tfdata-handwritten-blocks64": lambda: tfdata_handwritten(shards, block=64),
        "hf-tf": lambda: hf_tf(hf),
    }
    makers = {n: makers[n] for n in names}
    if side == "tf":
        import warnings

        import tensorflow as tf

        # datasets warns that list-valued columns/label_cols will give dicts in a later version
        warnings.filterwarnings("ignore", category=FutureWarning, module="datasets")

        tf.get_logger().setLevel("ERROR")
        why = dlpipe_tf_status()
        for name in ("dlpipe-tf", "dlpipe-tf-bucket"):
            if name in makers and why is not None:
                del makers[name]
                skipped[name] = f"dlpipe.loaders.tf_data does not import: {why}"
        if "dlpipe-tf-bucket" in makers and not accepts_buckets(
            "dlpipe.loaders.tf_data.to_tf_dataset"
        ):
            del makers["dlpipe-tf-bucket"]
            skipped["dlpipe-tf-bucket"] = "to_tf_dataset has no bucket_boundaries parameter"
    return makers, skipped


def side_main(args: argparse.Namespace) -> int:
    """Child process: time one side's contenders, write rows/failures to ``--side-out``."""
    names = args.only.split(",")
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    makers, skipped = side_makers(args.side, names, args.cache_dir / "loader-shards", corpus_dir)
    rows, failed = run_side(makers, args)
    for name, why in skipped.items():
        print(f"  {name}: skipped, {why}", flush=True)
    out = {"rows": rows, "failed": failed, "skipped": skipped}
    args.side_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def run_side_process(side: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One side in a fresh interpreter: TF and torch never share a process (the ``tfrecord``
    package registers TF's protos, so TF cannot be imported after it; a forked DataLoader
    worker would inherit TF's threads)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [
            sys.executable, __file__, "--side", side, "--side-out", str(out),
            "--only", ",".join(names), "--records", str(args.records), "--seed", str(args.seed),
            "--repeat", str(args.repeat), "--warmup", str(args.warmup),
            "--batches", str(args.batches), "--cache-dir", str(args.cache_dir),
        ]  # fmt: skip
        rc = subprocess.run(cmd, check=False).returncode
        if out.is_file():
            return json.loads(out.read_text())
    why = f"the {side} process exited with {rc} before writing results"
    return {"rows": [], "failed": dict.fromkeys(names, why), "skipped": {}}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(",")) if args.only else None
    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, args.seed)
    print(f"corpus: {corpus['num_records']:,} records in {corpus_dir}", flush=True)
    chosen = write_shards(corpus_dir, args.cache_dir / "loader-shards", args.num_shards)
    for fmt, c in chosen.items():
        encs = ", ".join(
            f"{n}: {v['encoding']} {v['storage_dtype']}" for n, v in c["columns"].items()
        )
        print(f"shards: {fmt} ({c['compression'] or 'no'} compression): {encs}", flush=True)
    load_before, uptime_before = os.getloadavg(), _uptime()
    print(f"before: {uptime_before}", flush=True)

    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for side, title in (("torch", "PyTorch"), ("tf", "TF")):
        names = [n for n, (s, _) in CONTENDERS.items() if s == side and (only is None or n in only)]
        if names:
            print(f"{title} side:", flush=True)
            got = run_side_process(side, names, args)
            rows += got["rows"]
            failed |= got["failed"]
            skipped |= got["skipped"]

    return {
        "benchmark": "loaders",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {**machine_info(), **library_versions()},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "uptime_before": uptime_before,
        "uptime_after": _uptime(),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {
            "batch_size": 256,
            "warmup_batches": args.warmup,
            "timed_batches": args.batches,
            "repeat": args.repeat,
            "num_shards": args.num_shards,
            "peer_shuffle_buffer": SHUFFLE_BUFFER,
        },
        "shards": chosen,
        "runs": rows,
        "failed": failed,
        "skipped": skipped,
        "targets": judge(rows),
    }


def _uptime() -> str | None:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --- markdown ----------------------------------------------------------------------------------


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


NOTES = [
    "Every run builds a fresh loader; setup s = building it plus the untimed warm-up batches"
    " (worker start-up, shuffle buffers filling).",
    "Shuffling: dlpipe's PyTorch loader shuffles shard order and records within windows of"
    " about `buffer_size` = 1000 records (its default); dlpipe's `to_tf_dataset` shuffles blocks"
    " of 64 consecutive records in a buffer of 1000 records' worth, so a batch holds a few runs"
    " of consecutive records (a coarser shuffle than a record-level buffer; the corpus itself is"
    " in random order, so it costs nothing here). `tfdata-handwritten`, tfrecord and webdataset"
    " use a 1000-record shuffle buffer; `tfdata-handwritten-blocks64` does what dlpipe does;"
    " HF shuffles globally (a random permutation of indices).",
    "Padding: dlpipe, the hand-written tf.data pipeline and the padding collates pad each batch"
    " to its longest record; the HF runs keep the corpus's padding to 128 (what a user holding"
    " the padded arrays gets), hence padding efficiency 0.17.",
    '`tfrecord-torch`: `description` from the manifest (`int64_list` → "int", raw → "byte"'
    " decoded with `np.frombuffer` in `transform`); no resharding for it.",
    "`hf-torch`: a `BatchSampler` passed as `sampler` with `batch_size=None`, so each step is one"
    " batched `dataset[list_of_256_indices]` (Arrow gather, formatted to tensors) rather than 256"
    " single-row reads.",
    "CPU own / others: CPU-s per second of this benchmark's process tree (main process, all its"
    " threads, DataLoader workers) and of everything else on the machine during the timed"
    " batches; a large *others* means other work competed for the 2 cores, so read that row"
    " with care. CPU µs/sample = own CPU time per sample, the cost less sensitive to load.",
    "PyTorch and TF contenders run in two separate child processes (the `tfrecord` package"
    " registers TF's protobuf types, after which TensorFlow cannot be imported; and a forked"
    " DataLoader worker should not inherit TF's threads).",
]


def render_markdown(res: dict[str, Any]) -> str:
    m, s, load = res["machine"], res["settings"], res["load_average"]
    lines = [
        "# Loader benchmark",
        "",
        f"{res['created']}, `{res['command']}`. Corpus: {res['corpus']['num_records']:,}"
        f" DeepCAL-like records (mean length {res['corpus']['mean_length']:.1f} code points,"
        f" padded to 128); batch size {s['batch_size']}, shuffled; each run takes"
        f" {s['warmup_batches']} batches untimed, then times {s['timed_batches']}"
        f" ({s['timed_batches'] * s['batch_size']:,} samples); {s['repeat']} rounds, every"
        " contender once per round; median (min–max).",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores,"
        f" {m.get('memory_gib')} GiB; {m.get('platform')}; Python {m.get('python')}, numpy"
        f" {m.get('numpy')}, TF {m.get('tensorflow')}, torch {m.get('torch')}, datasets"
        f" {m.get('datasets')}, pyarrow {m.get('pyarrow')}, webdataset {m.get('webdataset')},"
        f" tfrecord {m.get('tfrecord')}; dlpipe {m.get('dlpipe')} (commit {m.get('git_commit')}"
        " plus uncommitted work). Load average (1/5/15 min) before"
        f" {_loads(load['before'])}, after {_loads(load['after'])}.",
        "",
        "**This machine has 2 cores**: with `num_workers=2` the two worker processes compete"
        " with the main process (which receives, unpickles and counts the batches), and TF's"
        " threads share the same two cores.",
        "",
        f"Shards (`dlpipe.reshard`, dlpipe's defaults, {s['num_shards']} shards; encodings as"
        " the manifest chose them): "
        + "; ".join(
            f"{fmt} ({c['compression'] or 'uncompressed'}, {c['shard_bytes'] / 1e6:.1f} MB): "
            + ", ".join(
                f"`{n}` {v['encoding']} {v['storage_dtype']}" for n, v in c["columns"].items()
            )
            for fmt, c in res["shards"].items()
        )
        + ".",
        "",
    ]
    for side, title in (("tf", "TF side"), ("torch", "PyTorch side")):
        rows = [r for r in res["runs"] if r["side"] == side]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| run | samples/s | real tokens/s | tokens/ sample | padded length | padding eff."
            " | CPU own / others | CPU µs/ sample | setup s | what |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| `{r['name']}` | {_k(r['samples_per_s'])} ({_k(r['samples_per_s_min'])}–"
                f"{_k(r['samples_per_s_max'])}) | {_k(r['tokens_per_s'])}"
                f" ({_k(r['tokens_per_s_min'])}–{_k(r['tokens_per_s_max'])})"
                f" | {r['tokens_per_sample']:.1f} | {r['mean_padded_length']:.1f}"
                f" | {r['padding_efficiency']:.3f}"
                f" | {r['own_cpu_per_s']:.2f} / {r['others_cpu_per_s']:.2f}"
                f" | {r['own_cpu_us_per_sample']:.1f} | {r['setup_seconds']:.2f} | {r['what']} |"
            )
        lines.append("")
    lines += [
        "## Ratios and targets (median samples/s)",
        "",
        "| | runs | value | goal | |",
        "|---|---|---|---|---|",
    ]
    for t in res["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['what']} | {t['pair']} | {value} | {t['goal']} | {t['verdict']} |")
    lines.append("")
    for key, title in (("failed", "Failed"), ("skipped", "Skipped")):
        if res.get(key):
            lines += [f"## {title}", ""]
            lines += [f"- `{n}`: {why}" for n, why in res[key].items()]
            lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def _loads(avg: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in avg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="corpus size N (default 200k)")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds (each contender once per round)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches per run")
    parser.add_argument("--batches", type=int, default=600, help="timed batches per run")
    parser.add_argument("--num-shards", type=int, default=8, help="shards per format")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpus and shards")
    parser.add_argument(
        "--results-dir", type=Path, default=DEFAULT_RESULTS, help="loaders.json/.md"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="rebuild loaders.md from loaders.json"
    )
    parser.add_argument("--side", choices=("torch", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.warmup < 1 or args.batches < 1:
        parser.error("--warmup and --batches must be >= 1")

    if args.side:
        return side_main(args)
    return record(args.results_dir, "loaders", lambda: run_all(args), render_markdown, render_only=args.render_only)


if __name__ == "__main__":
    raise SystemExit(main())
