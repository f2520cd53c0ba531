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
    varint,
    varint_bytes,
    varint_size,
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
    values = _real(data, elem_lengths)
    if values.dtype == np.uint64 and values.size and int(values.max()) >= 2**63:
        raise ValueError(f"column {name!r} has uint64 values >= 2**63 that int64_list cannot hold")
    groups, size = varint_bytes(values.astype(np.int64) if values.dtype == np.uint64 else values)
    flat = groups[size[:, None] > np.arange(groups.shape[1])]
    # bytes per record: sizes summed over each record's run of values
    ends = np.cumsum(elem_lengths.astype(np.int64))
    csize = np.concatenate([[0], np.cumsum(size)])
    nbytes = csize[ends] - csize[ends - elem_lengths]
    return FeaturePayload(name, "int64", RaggedPiece(flat, nbytes), nbytes)


def example_pieces(features: list[FeaturePayload], n: int) -> tuple[list[Piece], np.ndarray]:
    """The pieces of n serialized Examples and the byte length of each."""
    features = sorted(features, key=lambda f: f.name)
    body: list[Piece] = []
    features_len = np.zeros(n, dtype=np.int64)
    for f in features:
        key = f.name.encode()
        p = f.nbytes
        has_field = np.ones(n, dtype=bool) if f.kind == "bytes" else p > 0
        list_len = np.where(has_field, 1 + varint_size(p) + p, 0)
        feature_len = 1 + varint_size(list_len) + list_len
        entry_len = 1 + _vs(len(key)) + len(key)
        entry_len = entry_len + 1 + varint_size(feature_len) + feature_len
        body += [
            constant(b"\x0a", n),
            varint(entry_len),
            constant(b"\x0a" + _varint1(len(key)) + key + b"\x12", n),
            varint(feature_len),
            constant(bytes([_KIND_TAG[f.kind]]), n),
            varint(list_len),
            optional(constant(b"\x0a", n), has_field),
            optional(varint(p), has_field),
            f.payload,
        ]
        features_len += 1 + varint_size(entry_len) + entry_len
    head = [constant(b"\x0a", n), varint(features_len)]
    total = 1 + varint_size(features_len) + features_len
    return head + body, total


def encode_examples(features: list[FeaturePayload], n: int) -> tuple[np.ndarray, np.ndarray]:
    """n serialized Examples back to back, and their n+1 offsets."""
    pieces, _ = example_pieces(features, n)
    return assemble(pieces, n)


def _vs(x: int) -> int:
    return int(varint_size(np.array([x]))[0])


def _varint1(x: int) -> bytes:
    block, size = varint_bytes(np.array([x], dtype=np.int64))
    return bytes(block[0, : size[0]])
