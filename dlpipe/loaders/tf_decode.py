"""Batch decoding for the tf.data loader: serialized TFRecord Examples to dense, padded tensors in
the manifest's logical dtypes, in graph ops (``BatchDecoder``; ``to_tf_dataset`` and ``dlpipe
bench``'s TF stages use it).

"raw" columns are decoded with ``tf.io.decode_raw(..., fixed_length=width)``, which pads every
record with zero bytes to the batch width in one pass; pad values other than 0 and left padding
are applied afterwards with a mask. Record lengths (values along the variable axis) come from
``tf.strings.length`` without decoding. Padding follows ``dlpipe.loaders.collate.collate`` (pad to
the longest record, rounded up to ``pad_to_multiple_of``, or to the smallest bucket boundary that
fits), so TF and PyTorch batches match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.columns import ColumnEncoding
from dlpipe.loaders.common import MASK

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

__all__ = ["BatchDecoder"]

# decode_raw lacks these dtypes: decode the same-width signed type and bitcast
_BITCAST_FROM = {"uint32": tf.int32, "uint64": tf.int64}


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

    def __call__(self, serialized: tf.Tensor | Mapping[str, Any]) -> dict[str, tf.Tensor]:
        """The padded batch of serialized records ``[B]``, or of what ``parse_example`` made of them
        (``self.spec``; length buckets parse a window at a time: ``dlpipe.loaders.tf_buckets``),
        where a ragged column may come as its (flat values, row lengths)."""
        if isinstance(serialized, Mapping):
            parsed = {n: tf.RaggedTensor.from_row_lengths(*v, validate=False) if isinstance(v, tuple) else v
                      for n, v in serialized.items()}
        else:
            parsed = tf.io.parse_example(serialized, self.spec)
        out, mask = {}, None
        for name, enc in self.encodings.items():
            if not enc.variable:
                out[name] = _fixed(parsed[name], enc)
                continue
            values, lengths, width = self._dense(parsed[name], enc)
            pos = tf.range(width, dtype=tf.int64)[None, :]
            real = pos >= (width - lengths)[:, None] if self.left else pos < lengths[:, None]
            if self.left:  # the decode is right-padded: shift row i right by width - lengths[i]
                values = tf.gather(
                    values, tf.maximum(pos - (width - lengths)[:, None], 0), batch_dims=1
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
        """Right-padded (zeros) values [B, width, *inner], record lengths [B] and width (int64)."""
        batch = tf.shape(value, out_type=tf.int64)[0] if enc.encoding == "raw" else value.nrows()
        lengths = _record_lengths(value, enc, check=True)
        width = self.width(tf.reduce_max(tf.concat([lengths, [0]], 0)))
        if enc.encoding == "raw":
            item = np.dtype(enc.storage_dtype).itemsize
            # fixed_length must be > 0, so an all-empty batch decodes one value and slices it off
            nbytes = tf.maximum(width * enc.inner * item, item)
            flat = tf.io.decode_raw(value, _storage(enc), fixed_length=tf.cast(nbytes, tf.int32))
            flat = _bitcast(flat[:, : width * enc.inner], enc)
        else:
            flat = value.to_tensor(0, shape=tf.stack([batch, width * enc.inner]))
        values = tf.reshape(flat, tf.concat([tf.stack([batch, width]), list(enc.shape[1:])], 0))
        return tf.cast(values, enc.dtype), lengths, width

    def width(self, longest: tf.Tensor) -> tf.Tensor:
        """``collate.padded_length`` in graph ops."""
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

    def record_lengths(self, serialized: tf.Tensor | Mapping[str, Any]) -> tf.Tensor:
        """Each record's length (values along the variable axis, int64 [B]) in ``length_column``
        (what bucketing groups by), parsing only that column, or of parsed records."""
        name = self.length_column
        if isinstance(serialized, Mapping):
            value = serialized[name]
        else:
            value = tf.io.parse_example(serialized, {name: self.spec[name]})[name]
        return _record_lengths(value, self.encodings[name])

    def ragged(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        """Unpadded rows (for ``batch_size=None``): RaggedTensors, unbatched to plain tensors."""
        parsed = tf.io.parse_example(serialized, self.spec)
        out, mask_lengths = {}, None
        for name, enc in self.encodings.items():
            if not enc.variable:
                out[name] = _fixed(parsed[name], enc)
                continue
            value, lengths = parsed[name], _record_lengths(parsed[name], enc, check=True)
            if enc.encoding == "raw":
                flat = _bitcast(tf.io.decode_raw(tf.strings.reduce_join(value), _storage(enc)), enc)
            else:
                flat = value.flat_values
            flat = tf.cast(tf.reshape(flat, [-1, *enc.shape[1:]]), enc.dtype)
            out[name] = tf.RaggedTensor.from_row_lengths(flat, lengths)
            mask_lengths = lengths if mask_lengths is None else mask_lengths
        if self.mask and mask_lengths is not None:
            out[MASK] = tf.RaggedTensor.from_row_lengths(
                tf.ones([tf.reduce_sum(mask_lengths)], tf.int64), mask_lengths
            )
        return out


def _record_lengths(value: Any, enc: ColumnEncoding, *, check: bool = False) -> tf.Tensor:
    """Each record's length (values along the variable axis, int64), from byte lengths without
    decoding."""
    if enc.encoding != "raw":
        return value.row_lengths() // enc.inner
    value_bytes = np.dtype(enc.storage_dtype).itemsize * enc.inner
    nbytes = tf.strings.length(value)
    if check:  # decode_raw would silently drop a partial value
        message = f"column {enc.name!r} holds a partial value"
        tf.debugging.assert_equal(nbytes % value_bytes, 0, message=message)
    return tf.cast(nbytes // value_bytes, tf.int64)


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
