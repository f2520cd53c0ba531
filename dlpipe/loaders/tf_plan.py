"""tf.data over dlpipe's epoch plan: the shuffled pipeline of ``to_tf_dataset``.

A shuffle that mixes the whole split permutes small blocks of records across it
(``dlpipe.loaders.common.epoch_pieces``), so reading jumps around inside files.
``TFRecordDataset`` reads a file front to back only, and a dataset op per block
(``FixedLengthRecordDataset`` at the block's offset, inside ``interleave``) measured 8x slower
than the whole sequential pipeline (56k vs 440k samples/s on 2 cores, 36-record blocks). So
the shuffled pipeline takes its records from dlpipe's reader: a generator walks this process's
windows of the epoch plan (the PyTorch loader's plan, same seed), gathers each batch's
serialized records with numpy, and yields runs of batches (~8k records) as one
``(bytes, starts, lengths, batch size)`` element, which one ``tf.strings.substr`` cuts into a
``[k, batch]`` block and ``unbatch`` into batches; ``parse_example`` and padding then run in the
graph as on every other path. Python runs a few numpy calls per batch, never per record, as in
``dlpipe.loaders.tf_remote``. The batches hold the same records in the same order as the
PyTorch loader's.

Each iteration of the returned dataset (each Keras epoch) plays the next epoch of the plan:
``ds.epoch``, then ``ds.epoch + 1``, ... A shard is checked against its manifest SHA-256 once
per process (per-record CRCs only where that differs), so a corrupt shard is named by a dlpipe
``FormatError``. The generator cannot be serialized: ``tf.distribute`` shards its batches by
data, not by file.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.loaders.common import buffer_batches, window_batches
from dlpipe.loaders.windows import gather_bytes, read_windows

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

_SPEC = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
         tf.TensorSpec([], tf.int64))
# records per generator element: from_generator costs ~0.7 ms per element on 2 cores, so many
# batches travel together as one [k, batch] block, split apart by unbatch (measured on the
# 144,563-record corpus: 0.9M records/s, against 0.6M for a ragged flat_map of the same chunks)
_CHUNK_RECORDS = 8192


def planned_batches(ds: Any, batch_size: int, *, seed: int, drop_remainder: bool, shuffle: bool = True,
                    world_size: int = 1, rank: int = 0, uneven: str = "pad") -> tf.data.Dataset:
    """``[b]`` string vectors: the serialized records of each batch of ``ds``'s epochs for this
    rank, batch by batch as ``to_torch_dataloader(batch_size=batch_size, world_size=world_size,
    rank=rank)`` makes them (ranks take equal record ranges of the epoch order, so any number of
    ranks works with any number of shards)."""
    reader, shards, config = ds.reader(), ds.shards, ds.shuffle_config
    per_window = buffer_batches(config.buffer_size, batch_size)
    block_records = ds.block_records if shuffle else None
    epochs = itertools.count(config.epoch)
    lock = threading.Lock()

    def chunks() -> Iterator[tuple[bytes, np.ndarray, np.ndarray, int]]:
        """(bytes, record starts, record lengths, batch size) of a run of equal-sized batches."""
        with lock:
            epoch = next(epochs)
        windows = ds.plan_windows(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                window_batches=per_window, drop_last=drop_remainder, world_size=world_size,
                                rank=rank, uneven=uneven, block_records=block_records)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        for window, (buf, starts, ends) in zip(windows, read_windows(reader, shards, windows, serialized=True)):
            for rows in window_batches(window, None, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                       epoch=epoch, rank=rank):
                batch = gather_bytes(buf, starts[rows], ends[rows])
                if len(rows) != batch_size:  # the epoch's last batch: on its own
                    if pending:
                        yield _joined(pending, batch_size)
                        pending = []
                    yield _joined([batch], len(rows))
                    continue
                pending.append(batch)
                if len(pending) * batch_size >= _CHUNK_RECORDS:
                    yield _joined(pending, batch_size)
                    pending = []
        if pending:
            yield _joined(pending, batch_size)

    def cut(chunk: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        # unbatch of [k, rows] rather than rebatch: rebatch's slices share the chunk's buffer, and
        # slicing them again downstream makes TensorFlow log an error per batch (tf_remote.py)
        return tf.reshape(tf.strings.substr(chunk, starts, lengths), [-1, rows])

    return tf.data.Dataset.from_generator(chunks, output_signature=_SPEC).map(cut).unbatch()


def _joined(batches: list[tuple[np.ndarray, np.ndarray]], rows: int) -> tuple[bytes, np.ndarray, np.ndarray, int]:
    """Packed batches (bytes, n + 1 offsets) as one chunk."""
    shift = np.cumsum([0] + [int(offsets[-1]) for _, offsets in batches[:-1]])
    starts = np.concatenate([offsets[:-1] + k for (_, offsets), k in zip(batches, shift)])
    lengths = np.concatenate([np.diff(offsets) for _, offsets in batches])
    return b"".join(packed.tobytes() for packed, _ in batches), starts, lengths, rows
