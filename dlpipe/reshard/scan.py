"""The scan: one parallel pass over the source, by record ranges, before the shard plan.

It finds every record's real length (and padding side, where a mask can mix sides), each
integer column's value range and varint size (which pick its storage dtype and encoding), and
what the padded regions hold (each column's pad value, which must be one constant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dlpipe.columns import ColumnEncoding, choose_encoding, varint_bytes_total
from dlpipe.errors import PaddingError
from dlpipe.formats.pieces import varint_size
from dlpipe.padding import PaddingSpec, pad_values, record_lengths
from dlpipe.progress import Progress
from dlpipe.reshard.job import Job, current_job
from dlpipe.sources import Source


@dataclass
class ScanResult:
    """What the scan found over the whole source."""

    lengths: np.ndarray  # every record's real length, in the narrowest dtype that holds max_length
    is_left: np.ndarray | None  # each record's padding side where a mask can mix sides, else None
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer column: (min, max), padding included
    varints: dict[str, int] = field(default_factory=dict)  # integer column: varint bytes, padding included
    pads: dict[str, list] = field(default_factory=dict)  # sequence column: [(first record, pad values seen)]


# rows of a scan task are taken this many bytes at a time: every pass over a block after the
# first (lengths, value range, varint sizes, pad values) then reads it from the CPU's cache
_BLOCK_BYTES = 1 << 20


def scan_range(bounds: tuple[int, int]) -> tuple[tuple[np.ndarray, np.ndarray | None], dict, dict, dict]:
    """One scan task over records ``[start, stop)`` of the current job's source."""
    job = current_job()
    start, stop = bounds
    chunk = job.source.read(start, stop)
    row_bytes = sum(data[:1].nbytes for data in chunk.values())
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    lengths, lefts = [], []
    files = {name: job.source.column_path(name) for name in chunk}
    ranges: dict[str, tuple] = {}
    varints = {name: 0 for name, data in chunk.items() if data.dtype.kind in "iu"}
    pads: dict[str, tuple] = {}
    for a in range(0, stop - start, step):
        block = {name: data[a : a + step] for name, data in chunk.items()}
        lens, is_left = record_lengths(block, job.spec, path=files, first_record=start + a)
        lengths.append(lens)
        lefts.append(is_left)
        for name, data in block.items():
            # Value ranges over whole rows, padding included: the storage dtype then also holds
            # each column's pad value, which readers need to re-pad batches.
            if data.dtype.kind not in "iub" or not data.size:
                continue
            lo, hi = data.min().item(), data.max().item()
            if name in ranges:
                lo, hi = min(ranges[name][0], lo), max(ranges[name][1], hi)
            ranges[name] = (lo, hi)
            # varint bytes of every integer value, padding included; choose_encodings subtracts
            # the padding
            if data.dtype.kind in "iu":
                varints[name] += _varint_total(data, lo, hi)
        for name, v in pad_values(block, job.spec, lens, is_left).items():
            seen = pads.get(name, ())
            pads[name] = (min(seen[0], v[0]), max(seen[1], v[1])) if seen and v else (v or seen)
    lengths = np.concatenate(lengths) if len(lengths) != 1 else lengths[0]
    is_left = np.concatenate(lefts) if len(lefts) != 1 else lefts[0]
    # one length (and side, only when a mask can mix sides) per record goes back: keep them narrow
    narrow = lengths.astype(np.min_scalar_type(max(job.spec.max_length, 1)))
    side = is_left if job.spec.method == "mask" else None
    return (narrow, side), ranges, varints, {k: (start, v) for k, v in pads.items()}


def _varint_total(data: np.ndarray, lo: int, hi: int) -> int:
    """``varint_bytes_total(data)`` given the block's min ``lo`` and max ``hi``: without negative
    values, only a count per varint byte beyond the first that ``hi`` needs."""
    if lo < 0:
        return varint_bytes_total(data)
    total = data.size
    k = 1
    while k < 10 and hi >= 1 << (7 * k):
        total += int(np.count_nonzero(data >= (1 << (7 * k))))
        k += 1
    return total


def scan(job: Job, pool, show: bool) -> ScanResult:
    """Every record's length and padding side, value ranges, varint sizes and pad values, with
    the scan tasks run on ``pool`` (an executor whose workers hold ``job``)."""
    n = job.source.num_records
    # enough parts that workers finish together, few enough that each is worth a task
    step = max(job.chunk_rows // 2, min(job.chunk_rows * 4, -(-n // (8 * job.workers)) if n else 1))
    parts = [(a, min(n, a + step)) for a in range(0, n, step)]
    lengths, lefts, ranges, varints, pads = [], [], {}, {}, {}
    with Progress(n, "scan", enabled=show) as bar:
        for (a, b), ((lens, left), rng, vb, pad) in zip(parts, pool.map(scan_range, parts)):
            lengths.append(lens)
            lefts.append(left)
            for name, v in vb.items():
                varints[name] = varints.get(name, 0) + v
            for name, r in rng.items():
                if r is None:
                    continue
                lo, hi = ranges.get(name, r)
                ranges[name] = (min(lo, r[0]), max(hi, r[1]))
            for name, v in pad.items():
                pads.setdefault(name, []).append(v)
            bar.update(b - a)
    width_type = np.min_scalar_type(max(job.spec.max_length, 1))
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, width_type)
    all_left = np.concatenate(lefts) if lefts and lefts[0] is not None else None
    return ScanResult(all_lengths, all_left, ranges, varints, pads)


def check_pad_values(spec: PaddingSpec, found: ScanResult, source: Source) -> dict[str, int | None]:
    """Each sequence column's padded region must hold one constant; return it per column."""
    out = {spec.reference: spec.pad_id} if spec.method == "pad_id" else {}
    for name, parts in found.pads.items():
        seen = [(start, v) for start, v in parts if v]
        values = {v for _, v in seen}
        if not values:
            out[name] = spec.pad_id if name == spec.reference else None
            continue
        first = seen[0][1]
        bad = next(((s, v) for s, v in seen if v[0] != v[1] or v != first), None)
        if bad is not None:
            raise PaddingError(
                source.column_path(name),
                f"column {name!r} holds differing values ({bad[1][0]}..{bad[1][1]}) where the lengths say "
                f"padding is, so it is not padded like {spec.reference or spec.mask_column or spec.lengths_column!r}",
                record=bad[0],
                hint=f"pass --sequence-columns without {name!r} to keep it fixed-length",
            )
        out[name] = first[0]
    return out


def choose_encodings(source: Source, spec: PaddingSpec, names: Sequence[str], found: ScanResult,
                     int_encoding: str, pad_value: Mapping[str, int | None]) -> dict[str, ColumnEncoding]:
    """Each written column's storage dtype and encoding, from what the scan found."""
    out = {}
    n = source.num_records
    real_steps = int(found.lengths.sum(dtype=np.int64))
    for name in names:
        col = source.columns[name]
        variable = name in spec.sequence_columns
        shape = (None, *col.shape[1:]) if variable else col.shape
        inner = col.width // col.shape[0] if variable and col.shape[0] else max(col.width, 1)
        num_values = real_steps * inner if variable else n * col.width
        vb = found.varints.get(name)
        if vb is not None and variable:  # take the padding's varints back out
            pad = pad_value.get(name) or 0
            pad_size = 10 if pad < 0 else int(varint_size(np.array([pad]))[0])
            vb -= (n * spec.max_length - real_steps) * inner * pad_size
        lo, hi = found.ranges.get(name, (None, None))
        out[name] = choose_encoding(name, col.dtype, shape, lo, hi, int_encoding=int_encoding,
                                    num_values=num_values, varint_bytes=vb)
    return out
