"""``to_tf_dataset``: dlpipe TFRecord shards as a native ``tf.data`` pipeline.

The DeepCAL lesson: a model ran 10x slower in TensorFlow than in PyTorch until the Keras input
path (a Python generator per record) was replaced by direct tf.data calls. So this pipeline is
all graph ops, no ``py_function`` and no ``from_generator``::

    shard files ─ shuffle (per epoch, seeded) ─ interleave(TFRecordDataset) ─ shuffle(records)
      ─ batch ─ ONE parse_example per batch ─ decode + pad to the shared rule ─ prefetch

"raw" columns are decoded with ``tf.io.decode_raw(..., fixed_length=width)``, which pads every
record with zero bytes to the batch width in one pass; pad values other than 0 and left padding
are applied afterwards with a mask. Lengths come from ``tf.strings.length`` without decoding.
Padding follows ``dlpipe.loaders.common.collate`` (pad to the longest record, rounded up to
``pad_to_multiple_of``, or to the smallest bucket boundary that fits), so TF and PyTorch batches
match. Length bucketing groups serialized records by bucket with ``group_by_window`` before
parsing, so every batch is padded to exactly one boundary: a small fixed set of shapes.

Return structure follows HF ``Dataset.to_tf_dataset``: ``columns=None`` gives a dict of every
column (plus ``attention_mask``); with ``columns`` / ``label_cols`` a ``features`` dict (or the
tensor itself when it has one key) or a ``(features, labels)`` tuple. ``attention_mask`` is made
from the lengths of the first variable column, as ``DataCollatorWithPadding`` does; name it in
``columns`` to get it when selecting columns.

A dataset in object storage (``load_dataset("s3://...", storage_options=..., cache_dir=...)``)
is read through local cached copies or, without ``cache_dir``, through dlpipe's range reader
feeding the same graph; ``dlpipe.loaders.tf_remote`` says how and why.

A corrupt local shard is found before TensorFlow reads it: each file is checked once per
process against the manifest's SHA-256 (dlpipe's reader does the same on the shuffled path), and
a mismatch raises dlpipe's FormatError naming the shard and, where record CRCs can tell, the
record and byte offset. It reaches the caller inside TensorFlow's error (``InvalidArgumentError``
or ``UnknownError`` from the per-file check), whose message carries the FormatError's text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import MASK, default_boundaries, rank_share

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

_COMPRESSION = {None: "", "gzip": "GZIP", "zlib": "ZLIB"}
# decode_raw lacks these dtypes: decode the same-width signed type and bitcast
_BITCAST_FROM = {"uint32": tf.int32, "uint64": tf.int64}
_CHUNK = 1024  # records per parse_example call when records are regrouped after parsing
_BLOCK = 64  # serialized records per interleave/shuffle element (see _records)
_MAX_CYCLE = 16  # default files read at once: fixed, so a seeded order is the same on every host


class BatchDecoder:
    """Serialized Examples → a dict of dense, padded tensors in the logical dtypes (graph ops)."""

    def __init__(
        self,
        encodings: Mapping[str, ColumnEncoding],
        pad_values: Mapping[str, Any],
        *,
        pad_to_multiple_of: int | None,
        boundaries: Sequence[int] | None,
        padding_side: str,
        return_attention_mask: bool,
    ) -> None:
        self.encodings = dict(encodings)
        self.pad_values = {n: pad_values.get(n, 0) for n in encodings}
        self.multiple = pad_to_multiple_of
        self.boundaries = list(boundaries or [])
        self.left = padding_side == "left"
        self.mask = return_attention_mask and MASK not in encodings
        self.spec = {n: _feature(e) for n, e in self.encodings.items()}
        variable = [n for n, e in self.encodings.items() if e.variable]
        self.length_column = variable[0] if variable else None

    def __call__(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, self.spec)
        out, mask = {}, None
        for name, enc in self.encodings.items():
            if not enc.variable:
                out[name] = _fixed(parsed[name], enc)
                continue
            values, steps, width = self._dense(parsed[name], enc)
            pos = tf.range(width, dtype=tf.int64)[None, :]
            real = pos >= (width - steps)[:, None] if self.left else pos < steps[:, None]
            if self.left:  # the decode is right-padded: shift row i right by width - steps[i]
                values = tf.gather(
                    values, tf.maximum(pos - (width - steps)[:, None], 0), batch_dims=1
                )
            pad = self.pad_values[name]
            if self.left or pad != 0:
                keep = tf.reshape(
                    real, tf.concat([tf.shape(real), tf.ones([len(enc.shape) - 1], tf.int32)], 0)
                )
                values = tf.where(keep, values, tf.cast(pad, values.dtype))
            out[name] = values
            if mask is None:
                mask = real
        if self.mask and mask is not None:
            out[MASK] = tf.cast(mask, tf.int64)
        return out

    def _dense(
        self, value: tf.Tensor, enc: ColumnEncoding
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Right-padded (zeros) values [B, width, *inner], steps [B] and width (int64)."""
        batch = tf.shape(value, out_type=tf.int64)[0] if enc.encoding == "raw" else value.nrows()
        steps = _steps(value, enc, check=True)
        width = self.width(tf.reduce_max(tf.concat([steps, [0]], 0)))
        if enc.encoding == "raw":
            item = np.dtype(enc.storage_dtype).itemsize
            # fixed_length must be > 0, so an all-empty batch decodes one value and slices it off
            nbytes = tf.maximum(width * enc.inner * item, item)
            flat = tf.io.decode_raw(value, _storage(enc), fixed_length=tf.cast(nbytes, tf.int32))
            flat = _bitcast(flat[:, : width * enc.inner], enc)
        else:
            flat = value.to_tensor(0, shape=tf.stack([batch, width * enc.inner]))
        values = tf.reshape(flat, tf.concat([tf.stack([batch, width]), list(enc.shape[1:])], 0))
        return tf.cast(values, enc.dtype), steps, width

    def width(self, longest: tf.Tensor) -> tf.Tensor:
        """``common.padded_length`` in graph ops."""
        rounded = longest
        if self.multiple:
            rounded = (longest + self.multiple - 1) // self.multiple * self.multiple
        if not self.boundaries:
            return rounded
        bounds = tf.constant(self.boundaries, tf.int64)
        i = tf.searchsorted(bounds, longest[None], side="left")[0]
        return tf.where(
            i < len(self.boundaries), tf.gather(tf.concat([bounds, [0]], 0), i), rounded
        )

    def steps(self, serialized: tf.Tensor) -> tf.Tensor:
        """Lengths (steps of the variable axis) of ``length_column``, parsing only that column."""
        name = self.length_column
        value = tf.io.parse_example(serialized, {name: self.spec[name]})[name]
        return _steps(value, self.encodings[name])

    def ragged(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        """Unpadded rows (for ``batch_size=None``): RaggedTensors, unbatched to plain tensors."""
        parsed = tf.io.parse_example(serialized, self.spec)
        out, lengths = {}, None
        for name, enc in self.encodings.items():
            if not enc.variable:
                out[name] = _fixed(parsed[name], enc)
                continue
            value, steps = parsed[name], _steps(parsed[name], enc, check=True)
            if enc.encoding == "raw":
                flat = _bitcast(tf.io.decode_raw(tf.strings.reduce_join(value), _storage(enc)), enc)
            else:
                flat = value.flat_values
            flat = tf.cast(tf.reshape(flat, [-1, *enc.shape[1:]]), enc.dtype)
            out[name] = tf.RaggedTensor.from_row_lengths(flat, steps)
            lengths = steps if lengths is None else lengths
        if self.mask and lengths is not None:
            out[MASK] = tf.RaggedTensor.from_row_lengths(
                tf.ones([tf.reduce_sum(lengths)], tf.int64), lengths
            )
        return out


def _steps(value: Any, enc: ColumnEncoding, *, check: bool = False) -> tf.Tensor:
    """Steps of the variable axis per record (int64), from byte lengths without decoding."""
    if enc.encoding != "raw":
        return value.row_lengths() // enc.inner
    step = np.dtype(enc.storage_dtype).itemsize * enc.inner
    nbytes = tf.strings.length(value)
    if check:  # decode_raw would silently drop a partial value
        message = f"column {enc.name!r} holds a partial value"
        tf.debugging.assert_equal(nbytes % step, 0, message=message)
    return tf.cast(nbytes // step, tf.int64)


def _feature(enc: ColumnEncoding) -> Any:
    if enc.encoding == "raw":
        return tf.io.FixedLenFeature([], tf.string)
    kind = tf.int64 if enc.encoding == "int64_list" else tf.float32
    if enc.variable:
        return tf.io.RaggedFeature(kind, row_splits_dtype=tf.int64)
    return tf.io.FixedLenFeature([enc.inner], kind)


def _storage(enc: ColumnEncoding) -> tf.DType:
    return _BITCAST_FROM.get(enc.storage_dtype) or tf.as_dtype(enc.storage_dtype)


def _bitcast(values: tf.Tensor, enc: ColumnEncoding) -> tf.Tensor:
    if enc.storage_dtype in _BITCAST_FROM:
        return tf.bitcast(values, tf.as_dtype(enc.storage_dtype))
    return values


def _fixed(value: tf.Tensor, enc: ColumnEncoding) -> tf.Tensor:
    if enc.encoding == "raw":  # equal lengths by construction; decode_raw fails loudly otherwise
        value = _bitcast(tf.io.decode_raw(value, _storage(enc)), enc)
    return tf.cast(tf.reshape(value, [-1, *enc.shape]), enc.dtype)


def _names(value: str | Sequence[str] | None, param: str) -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    if len(set(names)) < len(names):
        raise ConfigError(f"{param}={names!r} contains duplicates")
    return names


def _input_workers() -> int:
    """Input pipelines of a multi-worker job (TF_CONFIG / the strategy's cluster), else 1."""
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is not None:
        cluster = resolver.cluster_spec().as_dict()
    else:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return max(1, sum(len(cluster.get(job, [])) for job in ("chief", "worker")))


def to_tf_dataset(
    ds: Any,
    batch_size: int | None = None,
    columns: str | Sequence[str] | None = None,
    shuffle: bool = False,
    collate_fn: Callable[..., Mapping[str, Any]] | None = None,
    drop_remainder: bool = False,
    collate_fn_args: Mapping[str, Any] | None = None,
    label_cols: str | Sequence[str] | None = None,
    prefetch: bool = True,
    num_workers: int = 0,
    *,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
    bucket_boundaries: Sequence[int] | str | None = None,
    return_attention_mask: bool = True,
    seed: int | None = None,
    cycle_length: int | None = None,
    deterministic: bool | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    uneven: str = "pad",
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of padded batches of a ``ShardDataset`` (HF names and structure).

    - ``shuffle`` (or ``ds.shuffle(seed, buffer_size)``): uncompressed shards are shuffled across
      the whole split as the PyTorch loader does it (blocks of records permuted with (seed,
      epoch), records within a ``buffer_size`` window; ``dlpipe.loaders.tf_plan``), giving the
      same batches; each new iteration of the returned dataset (each Keras epoch) plays the next
      epoch. Compressed shards are read front to back: shard order and a ``buffer_size`` record
      buffer are shuffled with ``seed + ds.epoch``. ``seed`` overrides ``ds``'s seed.
    - ``collate_fn``: a graph-traceable function of the padded batch dict (plus
      ``collate_fn_args``) returning a dict; it runs inside ``Dataset.map``, not on numpy lists
      (padding is done natively, so HF's ``DataCollatorWithPadding`` is not needed).
    - ``num_workers``: parallel batch parses (0: ``AUTOTUNE``); ``cycle_length``: shard files
      read at once (default min(shards, 16)).
    - ``bucket_boundaries`` (a sorted list, or ``"auto"`` for ``common.default_boundaries``):
      records are grouped by length bucket and each batch is padded to its bucket's boundary.
    - ``world_size``/``rank`` (both or neither): this process's share when several read the split
      (e.g. one per GPU without ``tf.distribute``): equal record ranges of the epoch order, as the
      PyTorch loader splits them, so any number of ranks works with any number of shards; the
      same batches as ``to_torch_dataloader`` with the same arguments. ``uneven`` as there.
    - ``deterministic``: None keeps the order reproducible (an unseeded shuffle draws its seed
      once, as in the PyTorch loader).
    """
    info = ds.info
    if info.format != "tfrecord":
        raise ConfigError(
            f"{info.root} holds {info.format!r} shards; tf.data reads the TFRecord format. "
            "Reshard with --format tfrecord (format='tfrecord'), or use to_torch_dataloader"
        )
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; use None (unbatched) or an integer >= 1")
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of={pad_to_multiple_of}; use None or an integer >= 1")
    if num_workers < 0 or (cycle_length is not None and cycle_length < 1):
        raise ConfigError(
            f"num_workers={num_workers} must be >= 0 and cycle_length={cycle_length} None or >= 1"
        )
    features, labels = _names(columns, "columns"), _names(label_cols, "label_cols") or []
    if labels and not features:
        raise ConfigError("label_cols needs columns too (as in HF to_tf_dataset)")

    wanted = None if features is None or collate_fn is not None else features + labels
    load = [c for c in ds.columns if wanted is None or c in wanted]
    unknown = [c for c in (wanted or []) if c not in info.columns and c != MASK]
    if unknown:
        raise ConfigError(
            f"columns {unknown} are not in {info.root}; columns: {', '.join(ds.columns)}"
            f"{', ' + MASK if return_attention_mask else ''}"
        )
    encodings = {n: info.columns[n] for n in load}
    boundaries = None
    if bucket_boundaries is not None:
        boundaries = _boundaries(bucket_boundaries, info, encodings, batch_size, pad_to_multiple_of)
    # a mask nobody selected is not computed (it is dropped by the HF split anyway)
    mask_used = wanted is None or MASK in wanted
    decoder = BatchDecoder(
        encodings,
        info.pad_values,
        pad_to_multiple_of=pad_to_multiple_of,
        boundaries=boundaries,
        padding_side=padding_side,
        return_attention_mask=return_attention_mask and mask_used,
    )

    ds = ds.with_shuffle(shuffle, seed)  # the PyTorch loader's rule: unseeded = a random seed
    shuffle, seed = ds.shuffled, ds.shuffle_seed
    if (world_size is None) != (rank is None):
        raise ConfigError(f"pass both world_size and rank, or neither (got world_size={world_size}, rank={rank})")
    world_size, rank = (1, 0) if world_size is None else (int(world_size), int(rank))
    rank_share(1, world_size, rank, uneven)  # checks them
    if world_size > 1 and shuffle and not ds.seed_given:
        raise ConfigError("shuffling across several ranks needs the same seed on every rank; pass "
                          "ds.shuffle(seed=...) or to_tf_dataset(seed=...)")
    # shuffled shards that can be read from the middle, and any split over ranks, follow the
    # epoch plan (a global shuffle; record ranges per rank)
    planned = (shuffle and ds.block_records is not None) or world_size > 1
    if deterministic is None:
        deterministic = True
    parallel = num_workers or tf.data.AUTOTUNE
    finish = _batch_fn(decoder, batch_size, collate_fn, collate_fn_args, features, labels)
    if planned:  # elements are whole batches already (of _CHUNK records when unbatched)
        from dlpipe.loaders.tf_plan import planned_batches

        files = []
        data = planned_batches(ds, batch_size or _CHUNK, seed=int(seed or 0), shuffle=shuffle,
                               drop_remainder=drop_remainder and batch_size is not None,
                               world_size=world_size, rank=rank, uneven=uneven)
    else:
        seed = None if seed is None else int(seed) + ds.epoch
        files, open_file = _shard_files(ds, _COMPRESSION[info.compression])
        data = _records(
            files,
            open_file,
            shuffle=shuffle,
            seed=seed,
            buffer_size=ds.buffer_size,
            cycle_length=cycle_length,
            deterministic=deterministic,
        )
    if batch_size is None:
        if not planned:
            data = data.rebatch(_CHUNK)
        data = data.map(finish, num_parallel_calls=parallel, deterministic=deterministic)
        data = data.unbatch()
    else:
        if boundaries is not None:
            data = _group_by_bucket(
                data.unbatch(), decoder, boundaries, batch_size, drop_remainder, parallel, deterministic
            )
        elif not planned:
            data = data.rebatch(batch_size, drop_remainder=drop_remainder)
        data = data.map(finish, num_parallel_calls=parallel, deterministic=deterministic)

    options = tf.data.Options()
    options.deterministic = deterministic
    policy = tf.data.experimental.AutoShardPolicy
    # FILE sharding needs a file per input pipeline; DATA reads all and keeps every n-th batch
    native = not info.remote or ds.reader().cache_dir is not None
    options.experimental_distribute.auto_shard_policy = (
        policy.FILE if native and len(files) >= _input_workers() else policy.DATA
    )
    data = data.with_options(options)
    return data.prefetch(tf.data.AUTOTUNE) if prefetch else data


def _shard_files(ds: Any, compression: str) -> tuple[list[str], Callable[[tf.Tensor], tf.data.Dataset]]:
    """The split's files and how to read one as blocks of ``_BLOCK`` serialized records: local
    paths (or cached copies of remote shards) through TFRecordDataset, else URLs through
    dlpipe's reader (see ``dlpipe.loaders.tf_remote``)."""
    info = ds.info
    if info.remote and ds.reader().cache_dir is None:
        from dlpipe.loaders.tf_remote import remote_blocks

        files = [info.shard_location(s).url for s in ds.shards]
        return files, remote_blocks(ds.reader(), ds.shards, _BLOCK)
    reader = ds.reader()
    files = reader.cache_shards(ds.shards)
    by_path = dict(zip(files, ds.shards))

    def check(path: bytes) -> bool:
        reader.check_file(by_path[path.decode()], path.decode())
        return True

    def open_file(f: tf.Tensor) -> tf.data.Dataset:
        # the shard is checked against its manifest SHA-256 (once per process) before TensorFlow
        # reads it, so corruption is a FormatError naming the shard and record, not TensorFlow's
        # DataLossError, which names neither; one Python call per file, none per record
        ok = tf.numpy_function(check, [f], tf.bool, stateful=True)
        with tf.control_dependencies([ok]):
            f = tf.identity(f)
        return tf.data.TFRecordDataset(f, compression_type=compression).batch(_BLOCK)

    return files, open_file


def _records(
    files: list[str],
    open_file: Callable[[tf.Tensor], tf.data.Dataset],
    *,
    shuffle: bool,
    seed: int | None,
    buffer_size: int,
    cycle_length: int | None,
    deterministic: bool,
) -> tf.data.Dataset:
    """Blocks of up to ``_BLOCK`` serialized records: shard files (shuffled per iteration)
    interleaved in parallel a block at a time, then a buffer of ``buffer_size`` records' worth
    of blocks shuffled. Callers ``rebatch`` (or ``unbatch``).

    tf.data pays a fixed cost per element at every step; records here are tens of bytes, so
    moving them one at a time through interleave and shuffle costs more than parsing them (on
    2 cores: 0.3M records/s one by one, 1.6M in blocks of 64). A batch is then a few runs of
    consecutive records from different shards, as in PyTorch's loader, whose batches are drawn
    from windows of consecutive records.
    """
    data = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string, shape=[len(files)]))
    if shuffle and len(files) > 1:
        data = data.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    data = data.interleave(
        open_file,
        cycle_length=cycle_length or max(1, min(len(files), _MAX_CYCLE)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    if shuffle:
        record_seed = None if seed is None else seed + 1
        data = data.shuffle(max(2, buffer_size // _BLOCK), seed=record_seed, reshuffle_each_iteration=True)
    return data


def _boundaries(
    value: Sequence[int] | str,
    info: Any,
    encodings: Mapping[str, ColumnEncoding],
    batch_size: int | None,
    multiple: int | None,
) -> list[int]:
    variable = [n for n, e in encodings.items() if e.variable]
    if batch_size is None or not variable:
        raise ConfigError(
            f"bucket_boundaries={value!r} needs a batch_size and a variable-length column "
            f"(got batch_size={batch_size}, variable columns {variable})"
        )
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(
                f"bucket_boundaries={value!r}; use 'auto' or a sorted list of lengths"
            )
        return default_boundaries(info, variable[0], pad_to_multiple_of=multiple)
    bounds = [int(b) for b in value]
    if not bounds or bounds[0] < 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(
            f"bucket_boundaries={list(value)!r}; use strictly increasing lengths >= 1"
        )
    return bounds


def _group_by_bucket(
    records: tf.data.Dataset,
    decoder: BatchDecoder,
    boundaries: Sequence[int],
    batch_size: int,
    drop_remainder: bool,
    parallel: int,
    deterministic: bool,
) -> tf.data.Dataset:
    """Batches of serialized records whose lengths share a bucket (longer ones: one more group).

    Only the length column is parsed here, once per chunk; records travel as strings, and every
    batch is parsed in full once, after grouping.
    """
    bounds = tf.constant(list(boundaries), tf.int64)

    def keyed(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return serialized, tf.searchsorted(
            bounds, decoder.steps(serialized), side="left", out_type=tf.int64
        )

    keyed_records = (
        records.batch(_CHUNK)
        .map(keyed, num_parallel_calls=parallel, deterministic=deterministic)
        .unbatch()
    )
    return keyed_records.group_by_window(
        key_func=lambda serialized, bucket: bucket,
        reduce_func=lambda _, window: window.batch(batch_size, drop_remainder=drop_remainder),
        window_size=batch_size,
    ).map(lambda serialized, bucket: serialized)


def _batch_fn(
    decoder: BatchDecoder,
    batch_size: int | None,
    collate_fn: Callable | None,
    collate_fn_args: Mapping[str, Any] | None,
    features: list[str] | None,
    labels: list[str],
) -> Callable:
    """Serialized records → output structure: decode, ``collate_fn``, HF's features/labels split,
    all in the one parse map (a separate map per step would cost a pass over every batch)."""
    decode = decoder.ragged if batch_size is None else decoder
    finish = decode
    if collate_fn is not None:

        def finish(serialized: tf.Tensor) -> Any:
            return collate_fn(decode(serialized), **(collate_fn_args or {}))

    if features is None:
        return finish
    produced = list(decoder.encodings) + ([MASK] if decoder.mask and decoder.length_column else [])
    if collate_fn is not None:  # whatever it returns: trace it once
        spec = tf.TensorSpec([batch_size or _CHUNK], tf.string)
        produced = list(tf.function(finish).get_concrete_function(spec).structured_outputs)
    missing = [n for n in features + labels if n not in produced]
    if missing:
        raise ConfigError(f"columns {missing} are not produced; batches hold {', '.join(produced)}")
    return _split(finish, features, labels)


def _split(finish: Callable, features: list[str], labels: list[str]) -> Callable:
    """HF's ``split_features_and_labels``: one-key dicts collapse to the tensor itself."""

    def split(serialized: tf.Tensor) -> Any:
        batch = finish(serialized)
        x = {k: batch[k] for k in features}
        y = {k: batch[k] for k in labels}
        x = next(iter(x.values())) if len(x) == 1 else x
        if not y:
            return x
        return x, next(iter(y.values())) if len(y) == 1 else y

    return split
