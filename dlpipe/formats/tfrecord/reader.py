"""Reading TFRecord shards into columns: frames located by the index (CRCs checked when asked),
their Examples decoded together (``example_decode``), each feature cast to its column's logical
dtype and checked against the column's shape; and the index-free walk of ``dlpipe verify``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import FormatError
from dlpipe.formats.base import Columns, Ragged
from dlpipe.formats.tfrecord.example_decode import DecodedFeature, decode_examples
from dlpipe.formats.tfrecord.framing import check_frame_crcs, payload_bounds, scan_frames

__all__ = ["decode_payloads", "decode_runs", "payloads", "verify_records"]


def decode_runs(buf: np.ndarray, runs: Sequence[np.ndarray], encodings: Mapping[str, ColumnEncoding], *,
                path: str, check_crc: bool = False) -> Columns:
    """Decode runs of records (frame offsets of each run, n + 1 each) as one batch: a decode costs
    about the same whatever its size, so a window of many small runs costs what one run does."""
    if check_crc:
        for f in runs:
            check_frame_crcs(buf, f, path=path)
    bounds = [payload_bounds(f) for f in runs]
    starts = np.concatenate([b[0] for b in bounds])
    ends = np.concatenate([b[1] for b in bounds])
    return decode_payloads(buf, starts, ends, encodings, path=path, frames=np.concatenate([f[:-1] for f in runs]))


def payloads(buf: np.ndarray, frames: np.ndarray, *, path: str, check_crc: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each record's Example in ``buf``, from its frame offsets (n + 1)."""
    if check_crc:
        check_frame_crcs(buf, frames, path=path)
    return payload_bounds(frames)


def decode_payloads(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, encodings: Mapping[str, ColumnEncoding],
                    *, path: str, frames: np.ndarray) -> Columns:
    """Serialized Examples ``buf[starts[i]:ends[i]]`` (already checked) as ragged columns;
    errors name ``path`` and ``frames[i]``."""
    feats = decode_examples(buf, starts, ends, path=path, frame_offsets=frames)
    n = len(starts)
    out = {}
    for name, enc in encodings.items():
        f = feats.get(name)
        if f is None or (n and not f.present.all()):
            i = 0 if f is None else int(np.flatnonzero(~f.present)[0])
            raise FormatError(path, f"record lacks column {name!r}", offset=int(frames[i]), record=i,
                              hint="the shard does not match its manifest; rerun dlpipe reshard")
        out[name] = _typed(f, enc, path, frames)
    return out


def _typed(f: DecodedFeature, enc: ColumnEncoding, path: str, frames: np.ndarray) -> Ragged:
    """A decoded feature as values in the logical dtype with element row splits."""
    if f.kind == "bytes":
        storage = np.dtype(enc.storage_dtype).newbyteorder("<")
        data, byte_splits = f.single_bytes(path=path)
        bad = np.flatnonzero(np.diff(byte_splits) % storage.itemsize)
        if len(bad):
            i = int(bad[0])
            raise FormatError(path, f"column {enc.name!r} holds a partial {storage} value",
                              offset=int(frames[i]), record=i, hint="rerun dlpipe reshard")
        values = data[byte_splits[0] : byte_splits[-1]].view(storage)
        splits = (byte_splits - byte_splits[0]) // storage.itemsize
    else:
        values, splits = f.values, f.row_splits
    counts = np.diff(splits)
    if enc.variable:
        bad = np.flatnonzero(counts % enc.inner if enc.inner else counts)
    else:
        bad = np.flatnonzero(counts != enc.inner)
    if len(bad):
        i = int(bad[0])
        raise FormatError(path, f"column {enc.name!r} holds {int(counts[i])} values, which do not make "
                          f"records of shape {list(enc.shape)}", offset=int(frames[i]), record=i,
                          hint="the shard does not match its manifest; rerun dlpipe reshard")
    dtype = np.dtype(enc.dtype)
    if len(values) and values.dtype.kind in "iu" and not np.can_cast(values.dtype, dtype, "safe"):
        # narrowest storage (uint8 for int8 data in [0, 127]): the values must fit the dtype
        lo, hi = int(values.min()), int(values.max())
        top = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        if lo < top[0] or hi > top[1]:
            raise FormatError(path, f"column {enc.name!r} holds values {lo}..{hi}, outside its dtype {dtype}",
                              hint="the shard does not match its manifest; rerun dlpipe reshard")
    return values.astype(dtype, copy=False), splits.astype(np.int64, copy=False)


def verify_records(buf: np.ndarray, columns: Mapping[str, ColumnEncoding], *, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Walk every frame (CRCs checked) and decode every Example against ``columns``: each record's
    tokens (positions of the first variable column that has any) and the n + 1 frame offsets."""
    offsets = scan_frames(buf, path=path)
    starts, ends = payload_bounds(offsets)
    feats = decode_examples(np.asarray(buf), starts, ends, path=path, frame_offsets=offsets[:-1])
    n = len(starts)
    missing = set(columns) - set(feats)
    extra = set(feats) - set(columns)
    if n and (missing or extra):
        raise FormatError(path, f"records hold features {sorted(feats)}, manifest says {sorted(columns)}")
    tokens = np.zeros(n, dtype=np.int64)
    for name, enc in columns.items():
        if not n:
            break
        f = feats[name]
        if not f.present.all():
            i = int(np.flatnonzero(~f.present)[0])
            raise FormatError(path, f"record lacks feature {name!r}", offset=int(offsets[i]), record=i)
        itemsize = np.dtype(enc.storage_dtype).itemsize
        if f.kind == "bytes":
            per_record = np.diff(f.value_splits)[f.row_splits[:-1]] if len(f.value_splits) > 1 else np.zeros(n, np.int64)
            elems = per_record // itemsize
            bad = np.flatnonzero(per_record % (itemsize * enc.inner) != 0)
        else:
            elems = np.diff(f.row_splits)
            bad = np.flatnonzero(elems % enc.inner != 0)
        if len(bad):
            i = int(bad[0])
            raise FormatError(path, f"feature {name!r} does not hold whole {enc.storage_dtype} values of its shape",
                              offset=int(offsets[i]), record=i)
        steps = elems // enc.inner
        if not enc.variable:
            wrong = np.flatnonzero(steps != 1)
            if len(wrong):
                i = int(wrong[0])
                raise FormatError(path, f"fixed feature {name!r} has the wrong size", offset=int(offsets[i]), record=i)
        elif not tokens.any():
            tokens = steps
    return tokens, offsets
