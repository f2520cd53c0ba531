"""TFRecord shards of ``tf.train.Example`` records, written and read without TensorFlow.

``framing`` (frames and their CRC32C), ``protowire`` (varints), ``example_encode`` /
``example_decode`` / ``example_layout`` (the Example wire format, many records per call),
``writer`` (a batch as framed records) and ``reader`` (records as columns; verify's walk).
``TFRECORD`` is the format object (``dlpipe.formats.base.ShardFormat``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.formats.base import Columns, ShardFormat
from dlpipe.formats.tfrecord.reader import decode_payloads, decode_runs, payloads, verify_records
from dlpipe.formats.tfrecord.writer import encode_batch

__all__ = ["TFRECORD", "TFRecordFormat"]


class TFRecordFormat(ShardFormat):
    name = "tfrecord"
    extension = ".tfrecord"
    compressions = (None, "gzip", "zlib")
    auto_compression = None  # framing adds 16 bytes a record: little for gzip to take back
    record_crcs = True
    supports_serialized = True

    def encode_batch(self, batch: Mapping[str, ColumnBatch], encodings: Mapping[str, ColumnEncoding],
                     keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return encode_batch(batch, encodings, keys)

    def decode(self, buf: np.ndarray, runs: Sequence[np.ndarray], encodings: Mapping[str, ColumnEncoding], *,
               path: str, check_crc: bool = False, stored: Sequence[str] | None = None) -> Columns:
        # features are found by name: the stored columns not asked for are skipped as they come
        return decode_runs(buf, runs, encodings, path=path, check_crc=check_crc)

    def payloads(self, buf: np.ndarray, frames: np.ndarray, *, path: str,
                 check_crc: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return payloads(buf, frames, path=path, check_crc=check_crc)

    def decode_serialized(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                          encodings: Mapping[str, ColumnEncoding], *, path: str, frames: np.ndarray) -> Columns:
        return decode_payloads(buf, starts, ends, encodings, path=path, frames=frames)

    def verify(self, buf: np.ndarray, columns: Mapping[str, ColumnEncoding], *,
               path: str) -> tuple[np.ndarray, np.ndarray | None]:
        return verify_records(buf, columns, path=path)


TFRECORD = TFRecordFormat()
