"""tf.data over dlpipe's epoch plan: the shuffled pipeline of ``to_tf_dataset``.

A shuffle that mixes the whole split permutes small blocks of records across it
(``dlpipe.loaders.common.epoch_pieces``), so reading jumps around inside files.
``TFRecordDataset`` reads a file front to back only, and a dataset op per block
(``FixedLengthRecordDataset`` at the block's offset, inside ``interleave``) measured 8x slower
than the whole sequential pipeline (56k vs 440k samples/s on 2 cores, 36-record blocks). So
the shuffled pipeline takes its records from dlpipe's reader: a generator walks this process's
windows of the epoch plan (the PyTorch loader's plan, same seed) and yields each batch's
serialized records as one ``(bytes, starts, lengths)`` triple, which one ``tf.strings.substr``
cuts; ``parse_example`` and padding then run in the graph as on every other path. Python runs
once per batch, never per record, as in ``dlpipe.loaders.tf_remote``. The batches hold the
same records in the same order as the PyTorch loader's.

Each iteration of the returned dataset (each Keras epoch) plays the next epoch of the plan:
``ds.epoch``, then ``ds.epoch + 1``, ... A shard is checked against its manifest SHA-256 once
per process (per-record CRCs only where that differs), so a corrupt shard is named by a dlpipe
``FormatError``. The generator cannot be serialized: ``tf.distribute`` shards its batches by
data, not by file.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.loaders.common import epoch_windows, window_batches
from dlpipe.loaders.shard_reader import gather_bytes, read_windows

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

_SPEC = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
         tf.TensorSpec([None], tf.int64))
# records per generator element: from_generator costs ~0.7 ms per element on 2 cores, so several
# batches travel together and are split apart in the graph
_CHUNK_RECORDS = 8192


def planned_batches(ds: Any, batch_size: int, *, seed: int, drop_remainder: bool) -> tf.data.Dataset:
    """``[b]`` string vectors: the serialized records of each batch of ``ds``'s shuffled epochs,
    batch by batch as ``to_torch_dataloader(batch_size=batch_size)`` makes them."""
    reader, shards = ds.reader(), ds.shards
    sizes = [s.num_records for s in shards]
    per_window = max(1, math.ceil(ds.buffer_size / batch_size))  # as ShardIterableDataset
    block_records = ds.block_records
    epochs = itertools.count(ds.epoch)
    lock = threading.Lock()

    def chunks() -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
        """(bytes, record starts, record lengths, records per batch) of a few batches at a time."""
        with lock:
            epoch = next(epochs)
        windows = epoch_windows(sizes, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                                window_batches=per_window, drop_last=drop_remainder,
                                block_records=block_records)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        for window, (buf, starts, ends) in zip(windows, read_windows(reader, shards, windows, serialized=True)):
            rows = window_batches(window, None, batch_size=batch_size, shuffle=True, seed=seed,
                                  epoch=epoch, rank=0)
            packed, offsets = gather_bytes(buf, starts[np.concatenate(rows)], ends[np.concatenate(rows)])
            pending.append((packed, offsets, np.array([len(r) for r in rows], np.int64)))
            if sum(len(p[1]) - 1 for p in pending) >= _CHUNK_RECORDS:
                yield _joined(pending)
                pending = []
        if pending:
            yield _joined(pending)

    def batches(chunk: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor, sizes: tf.Tensor) -> tf.data.Dataset:
        records = tf.strings.substr(chunk, starts, lengths)
        return tf.data.Dataset.from_tensor_slices(tf.RaggedTensor.from_row_lengths(records, sizes))

    return tf.data.Dataset.from_generator(chunks, output_signature=_SPEC).flat_map(batches)


def _joined(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    shift = np.cumsum([0] + [int(p[1][-1]) for p in parts[:-1]])
    offsets = np.concatenate([p[1][:-1] + k for p, k in zip(parts, shift)])
    lengths = np.concatenate([np.diff(p[1]) for p in parts])
    return b"".join(p[0].tobytes() for p in parts), offsets, lengths, np.concatenate([p[2] for p in parts])
