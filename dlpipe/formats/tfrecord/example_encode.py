"""Serialize ``tf.train.Example`` records without TensorFlow, many records per call.

Wire layout of one record (features sorted by name, so output is deterministic)::

    Example   0x0A len  Features
    Features  (0x0A len  MapEntry) for each feature
    MapEntry  0x0A len key  0x12 len Feature
    Feature   tag len  List          tag: 0x0A bytes_list, 0x12 float_list, 0x1A int64_list
    List      0x0A len payload       one bytes value, or packed floats / varints

An empty float/int64 list omits its packed field, as protobuf does; a bytes list always holds one
value (possibly empty). Lengths are computed bottom-up with numpy and the bytes are assembled by
``pieces.assemble``: no per-record Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlpipe.formats.pieces import (
    Piece,
    RaggedPiece,
    assemble,
    constant,
    flat_rows,
    optional,
    piece_size,
    varint,
    varint_bytes,
    varint_size,
    varint_stream,
)

_KIND_TAG = {"bytes": 0x0A, "float": 0x12, "int64": 0x1A}


@dataclass(frozen=True)
class FeaturePayload:
    """One feature's payload for n records: what goes inside its list message."""

    name: str
    kind: str  # "bytes" | "float" | "int64"
    payload: Piece | RaggedPiece
    nbytes: np.ndarray  # payload bytes per record (int64)


def _real(data: np.ndarray, elem_lengths: np.ndarray) -> np.ndarray:
    """The real values of (n, width) rows, back to back."""
    return data[np.arange(data.shape[1])[None, :] < elem_lengths[:, None]]


def raw_payload(name: str, data: np.ndarray, elem_lengths: np.ndarray | None, kind: str = "bytes") -> FeaturePayload:
    """Little-endian bytes of ``data`` (n, width) rows, the first ``elem_lengths[i]`` elements of row i.

    ``kind="float"`` gives a packed float_list (data must be float32).
    """
    n = data.shape[0]
    data = np.ascontiguousarray(flat_rows(data), dtype=data.dtype.newbyteorder("<"))
    itemsize = data.dtype.itemsize
    if elem_lengths is None:
        block = flat_rows(data.view(np.uint8)) if data.shape[1] else np.zeros((n, 0), np.uint8)
        return FeaturePayload(name, kind, Piece(block, None), np.full(n, block.shape[1], np.int64))
    nbytes = elem_lengths.astype(np.int64) * itemsize
    flat = np.ascontiguousarray(_real(data, elem_lengths)).view(np.uint8)
    return FeaturePayload(name, kind, RaggedPiece(flat, nbytes), nbytes)


def int64_payload(name: str, data: np.ndarray, elem_lengths: np.ndarray | None) -> FeaturePayload:
    """Packed varints of integer ``data`` (n, width) rows: an ``int64_list`` TF reads natively."""
    n = data.shape[0]
    data = flat_rows(data)
    if elem_lengths is None:
        elem_lengths = np.full(n, data.shape[1], dtype=np.int64)
    elem_lengths = elem_lengths.astype(np.int64, copy=False)
    values = _real(data, elem_lengths)
    if values.dtype == np.uint64 and values.size and int(values.max()) >= 2**63:
        raise ValueError(f"column {name!r} has uint64 values >= 2**63 that int64_list cannot hold")
    flat, nbytes = varint_stream(values.astype(np.int64) if values.dtype == np.uint64 else values, elem_lengths)
    return FeaturePayload(name, "int64", RaggedPiece(flat, nbytes), nbytes)


def example_pieces(features: list[FeaturePayload], n: int) -> tuple[list[Piece], np.ndarray]:
    """The pieces of n serialized Examples and the byte length of each."""
    features = sorted(features, key=lambda f: f.name)
    body: list[Piece] = []
    features_len = np.zeros(n, dtype=np.int64)
    for f in features:
        key = f.name.encode()
        p = f.nbytes
        # an empty float/int64 list omits its packed field
        has_field = None if f.kind == "bytes" else p > 0
        if has_field is not None and has_field.all():
            has_field = None
        # lengths bottom-up; each varint piece also gives its size
        p_field = varint(p)
        list_len = 1 + piece_size(p_field) + p
        if has_field is not None:
            list_len = np.where(has_field, list_len, 0)
            p_field = optional(p_field, has_field)
        list_field = varint(list_len)
        feature_len = 1 + piece_size(list_field) + list_len
        feature_field = varint(feature_len)
        entry_len = 1 + _vs(len(key)) + len(key) + 1 + piece_size(feature_field) + feature_len
        entry_field = varint(entry_len)
        tag = constant(b"\x0a", n)
        body += [
            tag,
            entry_field,
            constant(b"\x0a" + _varint1(len(key)) + key + b"\x12", n),
            feature_field,
            constant(bytes([_KIND_TAG[f.kind]]), n),
            list_field,
            tag if has_field is None else optional(tag, has_field),
            p_field,
            f.payload,
        ]
        features_len += 1 + piece_size(entry_field) + entry_len
    head = varint(features_len)
    total = 1 + piece_size(head) + features_len
    return [constant(b"\x0a", n), head, *body], np.asarray(total, dtype=np.int64)


def encode_examples(features: list[FeaturePayload], n: int) -> tuple[np.ndarray, np.ndarray]:
    """n serialized Examples back to back, and their n+1 offsets."""
    pieces, _ = example_pieces(features, n)
    return assemble(pieces, n)


def _vs(x: int) -> int:
    return int(varint_size(np.array([x]))[0])


def _varint1(x: int) -> bytes:
    block, size = varint_bytes(np.array([x], dtype=np.int64))
    return bytes(block[0, : size[0]])
