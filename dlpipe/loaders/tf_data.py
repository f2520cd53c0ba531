"""``to_tf_dataset``: dlpipe TFRecord shards as a native ``tf.data`` pipeline.

The DeepCAL lesson: a model ran 10x slower in TensorFlow than in PyTorch until the Keras input
path (a Python generator per record) was replaced by direct tf.data calls. So this pipeline is
all graph ops, no ``py_function`` and no ``from_generator``::

    shard files ─ shuffle (per epoch, seeded) ─ interleave(TFRecordDataset) ─ shuffle(records)
      ─ batch ─ ONE parse_example per batch ─ decode + pad to the shared rule ─ prefetch

Decoding and padding (``dlpipe.loaders.tf_decode.BatchDecoder``) follow
``dlpipe.loaders.collate.collate``, so TF and PyTorch batches match; this module reads the files
(interleave, or the epoch plan of ``dlpipe.loaders.tf_plan``) and groups records into batches.
Length bucketing (``dlpipe.loaders.tf_buckets``) groups serialized records by bucket a window of
records at a time, by the PyTorch loader's rule, before parsing, so every batch is padded to a
bucket boundary: a small fixed set of shapes. The arguments both front ends share are checked
once, as ``dlpipe.loaders.options.LoaderOptions``.

Return structure follows HF ``Dataset.to_tf_dataset``: ``columns=None`` gives a dict of every
column (plus ``attention_mask``); with ``columns`` / ``label_cols`` a ``features`` dict (or the
tensor itself when it has one key) or a ``(features, labels)`` tuple. ``attention_mask`` is made
from the lengths of the first variable column, as ``DataCollatorWithPadding`` does; name it in
``columns`` to get it when selecting columns.

A dataset in object storage (``load_dataset("s3://...", storage_options=..., cache_dir=...)``)
is read through local cached copies or, without ``cache_dir``, through dlpipe's range reader
feeding the same graph; ``dlpipe.loaders.tf_remote`` says how and why.

**Checkpoints**: ``tf.train.Checkpoint(iterator=it)`` saves and restores an iterator's position
(and, planned, its epoch), and an iterator of a dataset built again with the same arguments
goes on with the batches an uninterrupted run gives next (a dataset built with other arguments
refuses a planned pipeline's checkpoint: ``tf_plan``): in the pipelines that read files
front to back (local or cached shards, unshuffled, or compressed and shuffled) and in those of
the epoch plan (the global shuffle, any split over ranks, mixtures; ``tf_plan``: elements by
number, local or remote). Only remote shards read front to back without ``cache_dir``
(``tf_remote``, unshuffled or compressed) are fed by ``from_generator``, which TensorFlow
cannot save: writing the checkpoint raises ``FailedPreconditionError`` ("PyFunc is
stateful"); resume those by epoch (``ds.set_epoch``).

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

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import MASK
from dlpipe.loaders.options import LoaderOptions, resolve_shuffle

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

from dlpipe.loaders.tf_buckets import file_order_bucket_batches, planned_bucket_batches  # noqa: E402
from dlpipe.loaders.tf_decode import BatchDecoder  # noqa: E402

_COMPRESSION = {None: "", "gzip": "GZIP", "zlib": "ZLIB"}
_CHUNK = 1024  # records per parse_example call when records are regrouped after parsing
_BLOCK = 64  # serialized records per interleave/shuffle element (see _records)
_MAX_CYCLE = 16  # default files read at once: fixed, so a seeded order is the same on every host


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
    packing: Any = False,
    max_length: int | None = None,
    max_segments: int | None = None,
    max_tokens: int | None = None,
    truncate: bool = False,
    pack_window: int | None = None,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of padded batches of a ``ShardDataset`` (HF names and structure).

    - ``shuffle`` (or ``ds.shuffle(seed, buffer_size)``): uncompressed shards are shuffled across
      the whole split as the PyTorch loader does it (blocks of records permuted with (seed,
      epoch), records within a ``buffer_size`` window; ``dlpipe.loaders.tf_plan``), giving the
      same batches; each new iteration of the returned dataset (each Keras epoch) plays the next
      epoch. Compressed shards are read front to back: shard order and a ``buffer_size`` record
      buffer are shuffled with ``seed + ds.epoch``. ``seed`` overrides ``ds``'s seed; no seed
      draws a random one per call (``dlpipe.loaders.options.resolve_shuffle``, as PyTorch's).
    - ``collate_fn``: a graph-traceable function of the padded batch dict (plus
      ``collate_fn_args``) returning a dict; it runs inside ``Dataset.map``, not on numpy lists
      (padding is done natively, so HF's ``DataCollatorWithPadding`` is not needed).
    - ``num_workers``: parallel batch parses (0: ``AUTOTUNE``); ``cycle_length``: shard files
      read at once (default min(shards, 16)).
    - ``bucket_boundaries`` (a sorted list, or ``"auto"`` for ``collate.default_boundaries``):
      records are grouped by length bucket a window at a time (the PyTorch loader's rule, see
      ``dlpipe.loaders.tf_buckets``) and each batch is padded to its bucket's boundary.
    - ``world_size``/``rank`` (both or neither): this process's share when several read the split
      (e.g. one per GPU without ``tf.distribute``): equal record ranges of the epoch order, as the
      PyTorch loader splits them, so any number of ranks works with any number of shards; the
      same batches as ``to_torch_dataloader`` with the same arguments. ``uneven`` as there.
    - ``deterministic``: None keeps the order reproducible (an unseeded shuffle draws its seed
      once, as in the PyTorch loader).
    - ``packing`` (True, ``"rows"``, ``"flat"`` or a ``PackingOptions``) with ``max_length``,
      ``max_segments``, ``max_tokens``, ``truncate``, ``pack_window``: batches of ``batch_size``
      packed rows, the PyTorch loader's (``dlpipe.loaders.tf_packed``).
    """
    info = ds.info
    if info.format != "tfrecord":
        raise ConfigError(
            f"{info.root} holds {info.format!r} shards; tf.data reads the TFRecord format. "
            "Reshard with --format tfrecord (format='tfrecord'), or use to_torch_dataloader"
        )
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}; use an int >= 0 (0: AUTOTUNE)")
    if cycle_length is not None and cycle_length < 1:
        raise ConfigError(f"cycle_length={cycle_length!r}; use None (min(shards, 16)) or an int >= 1")
    opts = LoaderOptions(
        batch_size=batch_size, drop_last=drop_remainder, pad_to_multiple_of=pad_to_multiple_of,
        padding_side=padding_side, bucket_boundaries=bucket_boundaries,
        return_attention_mask=return_attention_mask, shuffle=shuffle, seed=seed,
        world_size=world_size, rank=rank, uneven=uneven, columns=columns, label_cols=label_cols,
        packing=packing, max_length=max_length, max_segments=max_segments, max_tokens=max_tokens,
        truncate=truncate, pack_window=pack_window,
    )
    if opts.world_size is None:
        opts = opts.with_world(1, 0)
    if opts.packing is not None:  # sequence packing: numpy batches through from_generator
        from dlpipe.loaders.packed import refuse_collate_fn
        from dlpipe.loaders.tf_packed import packed_tf_dataset

        refuse_collate_fn(collate_fn, opts.packing)
        return packed_tf_dataset(ds, opts, prefetch=prefetch)
    features = None if opts.columns is None else list(opts.columns)
    labels = list(opts.label_cols)
    wanted = None if features is None or collate_fn is not None else features + labels
    if wanted is not None:  # a collate_fn may make columns of its own (checked by _batch_fn)
        opts.check_columns(info, ds.columns)
    encodings = {n: info.columns[n] for n in ds.columns if wanted is None or n in wanted}
    boundaries = opts.boundaries(info, encodings)
    # a mask nobody selected is not computed (it is dropped by the HF split anyway)
    mask_used = wanted is None or MASK in wanted
    decoder = BatchDecoder(
        encodings,
        info.pad_values,
        pad_to_multiple_of=opts.pad_to_multiple_of,
        boundaries=boundaries,
        padding_side=opts.padding_side,
        return_attention_mask=opts.return_attention_mask and mask_used,
    )

    ds, shuffle_state = resolve_shuffle(ds, opts)  # one rule with PyTorch: unseeded = a random seed
    batch_size, drop_remainder = opts.batch_size, opts.drop_last
    # shuffled shards that can be read from the middle, any split over ranks and mixtures of
    # datasets follow the epoch plan (a global shuffle; record ranges per rank; ds.plan_windows)
    planned = (opts.world_size > 1 or (shuffle_state.shuffled and shuffle_state.block_records is not None)
               or getattr(ds, "mixture", None) is not None)
    if deterministic is None:
        deterministic = True
    parallel = num_workers or tf.data.AUTOTUNE
    finish = _batch_fn(decoder, batch_size, collate_fn, collate_fn_args, features, labels)

    def finished(data: tf.data.Dataset) -> tf.data.Dataset:
        """Batches of serialized records (or parsed, bucketed) → the output structure, prefetched."""
        data = data.map(finish, num_parallel_calls=parallel, deterministic=deterministic)
        data = data.unbatch() if batch_size is None else data
        return data.prefetch(tf.data.AUTOTUNE) if prefetch else data

    # planned pipelines take ``finished`` inside: one epoch's pipeline whole, so that a checkpoint
    # holds its epoch until the last batch (tf_plan.PlannedEpochs.dataset)
    if planned and boundaries is not None:  # whole batches, grouped by bucket per window (tf_buckets)
        files = []
        data = planned_bucket_batches(ds, decoder, batch_size, seed=shuffle_state.plan_seed,
                                      shuffle=shuffle_state.shuffled, drop_remainder=drop_remainder,
                                      world_size=opts.world_size, rank=opts.rank, uneven=opts.uneven,
                                      parallel=parallel, deterministic=deterministic, then=finished)
    elif planned:  # elements are whole batches already (of _CHUNK records when unbatched)
        from dlpipe.loaders.tf_plan import planned_batches

        files = []
        data = planned_batches(ds, batch_size or _CHUNK, seed=shuffle_state.plan_seed,
                               shuffle=shuffle_state.shuffled,
                               drop_remainder=drop_remainder and batch_size is not None,
                               world_size=opts.world_size, rank=opts.rank, uneven=opts.uneven,
                               parallel=parallel, deterministic=deterministic, then=finished)
    else:
        files, open_file = _shard_files(ds, _COMPRESSION[info.compression])
        data = _records(
            files,
            open_file,
            shuffle=shuffle_state.shuffled,
            seed=None if shuffle_state.seed is None else shuffle_state.seed + shuffle_state.epoch,
            buffer_size=shuffle_state.buffer_size,
            cycle_length=cycle_length,
            deterministic=deterministic,
        )
        if batch_size is None:
            data = data.rebatch(_CHUNK)
        elif boundaries is not None:  # grouped by bucket per window (tf_buckets)
            data = file_order_bucket_batches(data, ds, decoder, batch_size, shuffle_state=shuffle_state,
                                             drop_remainder=drop_remainder, parallel=parallel,
                                             deterministic=deterministic)
        else:
            data = data.rebatch(batch_size, drop_remainder=drop_remainder)
        data = finished(data)

    options = tf.data.Options()
    options.deterministic = deterministic
    policy = tf.data.experimental.AutoShardPolicy
    # FILE sharding needs a file per input pipeline; DATA reads all and keeps every n-th batch
    native = not info.remote or ds.reader().cache_dir is not None
    options.experimental_distribute.auto_shard_policy = (
        policy.FILE if native and len(files) >= _input_workers() else policy.DATA
    )
    if native or planned:  # checkpointable: the per-file SHA-256 check and the planned elements'
        # Python calls (tf_plan.PlannedEpochs) hold no state a restored iterator needs
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    if planned:  # a prefetch TensorFlow adds after the epoch's flat_map would end it early (tf_plan)
        options.experimental_optimization.inject_prefetch = False
    return data.with_options(options)


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
