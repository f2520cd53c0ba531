"""The loader benchmark's contenders: dlpipe's loaders and the pipelines people write, each a
factory of a fresh loader over the same shards (``loader_bench.py`` runs them).

``CONTENDERS`` names them in table order with their side (``torch`` or ``tf``: the two never
share a process) and what they do; ``side_makers`` builds one side's factories. A factory
returns ``make_epoch``: a callable giving an iterable of batches, called again for a new epoch.
Every contender: batch size 256, shuffled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.benchmark.corpus import PAD_ID

SHUFFLE_BUFFER = 1000  # records; dlpipe's default ShardDataset buffer_size, used by the peers too
# the peers' packages, whose versions the results record beside describe()'s
VERSIONS = ("datasets", "pyarrow", "webdataset", "tfrecord")

# name -> (side, what); the order is the order of the tables
CONTENDERS: dict[str, tuple[str, str]] = {
    "dlpipe-torch-w0": (
        "torch",
        "`to_torch_dataloader(batch_size=256, shuffle=True, num_workers=0)`",
    ),
    "dlpipe-torch-w2": ("torch", "the same, `num_workers=2`"),
    "dlpipe-torch-w0-bucket": ("torch", '`num_workers=0`, `bucket_boundaries="auto"`'),
    "dlpipe-torch-w2-bucket": ("torch", "the same, `num_workers=2`"),
    "dlpipe-torch-w0-map10us": (
        "torch",
        "`ds.map(f)` with f a ~10 µs per-record Python function (a tokenize/augment stand-in:"
        " it busy-waits 10 µs and adds a column), `num_workers=0`",
    ),
    "dlpipe-torch-w2-map10us": ("torch", "the same, `num_workers=2` (the map runs in the workers)"),
    "dlpipe-torch-w0-packed": (
        "torch",
        "`num_workers=0`, `packing=True`: rows of the longest record rounded up to 8 tokens,"
        " batch_size = round(256 x mean length / (max_length x 0.98)) rows, about 256 records"
        " per batch (`dlpipe.benchmark.modes`); samples/s counts records",
    ),
    "dlpipe-torch-w2-packed": ("torch", "the same, `num_workers=2`"),
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
    "dlpipe-tf-packed": ("tf", "the same with `packing=True`, rows and max_length as for `dlpipe-torch-w0-packed`"),
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


def padding_kwargs(shards: Path, mode: str) -> dict[str, Any]:
    """The loader arguments of a padding mode at 256 records per batch (``dlpipe bench``'s
    rule, ``dlpipe.benchmark.modes.plan``): buckets or packing, ``batch_size`` included."""
    from dlpipe.benchmark.modes import plan

    return plan(mode, str(shards / "tfrecord"), 256).loader_kwargs


def dlpipe_torch(shards: Path, workers: int, bucket: bool = False, packed: bool = False) -> Callable[[], Iterable]:
    import dlpipe

    ds = dlpipe.load_dataset(shards / "tfrecord")
    mode = "packing" if packed else "buckets" if bucket else "longest"
    loader = ds.to_torch_dataloader(shuffle=True, num_workers=workers, **padding_kwargs(shards, mode))
    return lambda: loader


def busy_10us(record: dict) -> dict:
    """~10 µs of Python per record, as a tokenizer or an augmentation might cost."""
    end = time.perf_counter() + 10e-6
    while time.perf_counter() < end:
        pass
    return {"n_tokens": len(record["input_ids"])}


def dlpipe_torch_map(shards: Path, workers: int) -> Callable[[], Iterable]:
    import dlpipe

    ds = dlpipe.load_dataset(shards / "tfrecord").map(busy_10us)
    loader = ds.to_torch_dataloader(shuffle=True, num_workers=workers, **padding_kwargs(shards, "longest"))
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


def dlpipe_tf(shards: Path, bucket: bool = False, packed: bool = False) -> Callable[[], Iterable]:
    import dlpipe

    ds = dlpipe.load_dataset(shards / "tfrecord")
    mode = "packing" if packed else "buckets" if bucket else "longest"
    tfds = ds.to_tf_dataset(
        columns=["input_ids"], label_cols=["labels"], shuffle=True, prefetch=True,
        **padding_kwargs(shards, mode),
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


def dlpipe_tf_status() -> str | None:
    """None when dlpipe's tf.data loader imports, else why not."""
    try:
        from dlpipe.loaders import tf_data

        tf_data.to_tf_dataset  # noqa: B018
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def accepts(func_path: str, param: str) -> bool:
    """Whether the function at ``func_path`` takes ``param`` (a loader before a feature lacks it)."""
    import importlib
    import inspect

    module, _, attr = func_path.rpartition(".")
    return param in inspect.signature(getattr(importlib.import_module(module), attr)).parameters


# contender -> (the loader function it needs, the parameter it uses)
NEEDS = {
    "dlpipe-tf-bucket": ("dlpipe.loaders.tf_data.to_tf_dataset", "bucket_boundaries"),
    "dlpipe-tf-packed": ("dlpipe.loaders.tf_data.to_tf_dataset", "packing"),
    "dlpipe-torch-w0-packed": ("dlpipe.loaders.torch_loader.to_torch_dataloader", "packing"),
    "dlpipe-torch-w2-packed": ("dlpipe.loaders.torch_loader.to_torch_dataloader", "packing"),
}


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
        "dlpipe-torch-w2-bucket": lambda: dlpipe_torch(shards, 2, bucket=True),
        "dlpipe-torch-w0-map10us": lambda: dlpipe_torch_map(shards, 0),
        "dlpipe-torch-w2-map10us": lambda: dlpipe_torch_map(shards, 2),
        "dlpipe-torch-w0-packed": lambda: dlpipe_torch(shards, 0, packed=True),
        "dlpipe-torch-w2-packed": lambda: dlpipe_torch(shards, 2, packed=True),
        "tfrecord-torch-w0": lambda: tfrecord_torch(shards, 0),
        "tfrecord-torch-w2": lambda: tfrecord_torch(shards, 2),
        "wds-torch-w0": lambda: wds_torch(shards, 0),
        "wds-torch-w2": lambda: wds_torch(shards, 2),
        "hf-torch-w0": lambda: hf_torch(hf, 0),
        "hf-torch-w2": lambda: hf_torch(hf, 2),
        "dlpipe-tf": lambda: dlpipe_tf(shards),
        "dlpipe-tf-bucket": lambda: dlpipe_tf(shards, bucket=True),
        "dlpipe-tf-packed": lambda: dlpipe_tf(shards, packed=True),
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
        for name in ("dlpipe-tf", "dlpipe-tf-bucket", "dlpipe-tf-packed"):
            if name in makers and why is not None:
                del makers[name]
                skipped[name] = f"dlpipe.loaders.tf_data does not import: {why}"
    for name, (func, param) in NEEDS.items():
        if name in makers and not accepts(func, param):
            del makers[name]
            skipped[name] = f"{func.rpartition('.')[2]} has no {param} parameter"
    return makers, skipped
