"""Writing TFRecord shards: a batch of stripped records as framed, serialized ``tf.train.Example``s
(columns as ``ColumnEncoding.encoding`` says: int64_list, float_list or one raw bytes value)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dlpipe.columns import ColumnBatch, ColumnEncoding
from dlpipe.formats.tfrecord.example_encode import (
    FeaturePayload,
    example_pieces,
    int64_payload,
    raw_payload,
)
from dlpipe.formats.tfrecord.framing import frame_pieces

__all__ = ["encode_batch"]


def encode_batch(batch: Mapping[str, ColumnBatch], encodings: Mapping[str, ColumnEncoding],
                 keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Framed records of the batch back to back, and the n + 1 frame offsets (``keys`` only count
    them: an Example does not hold its record id)."""
    n = len(keys)
    features: list[FeaturePayload] = []
    for name, col in batch.items():
        enc = encodings[name]
        if enc.encoding == "int64_list":
            features.append(int64_payload(name, col.data, col.elems))
        else:
            kind = "float" if enc.encoding == "float_list" else "bytes"
            features.append(raw_payload(name, col.data, col.elems, kind=kind))
    pieces, lengths = example_pieces(features, n)
    return frame_pieces(pieces, lengths)
