"""``dlpipe inspect``: what a source holds and how much of it is padding, or what a dataset is."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dlpipe._units import format_bytes
from dlpipe.defaults import MASK_COLUMN
from dlpipe.errors import DlpipeError
from dlpipe.manifest import MANIFEST, load_manifest
from dlpipe.padding import record_lengths, resolve_padding
from dlpipe.sources import open_source
from dlpipe.storage import Location

SAMPLE_RECORDS = 100_000


def inspect(
    paths: Sequence[str] | str,
    *,
    pad_id: int | None = None,
    lengths_column: str | None = None,
    mask_column: str | None = MASK_COLUMN,
    padding_side: str = "auto",
    layout: str | None = None,
    header_bytes: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """A human-readable description of a source (schema, padding waste, length histogram) or of a
    dlpipe dataset directory (its manifest); paths may be fsspec URLs (``storage_options``)."""
    if isinstance(paths, str):
        paths = [paths]
    if len(paths) == 1 and _is_dataset(paths[0], storage_options):
        return describe_dataset(paths[0], storage_options=storage_options)
    source = open_source(paths, layout=layout, header_bytes=header_bytes, storage_options=storage_options)
    lines = [f"{source.describe()}", f"  records: {source.num_records:,}   size: {format_bytes(source.num_bytes)}",
             "  columns:"]
    for name, col in source.columns.items():
        lines.append(f"    {name:<20} {col.dtype.name:<8} {list(col.shape)}")
    n = min(source.num_records, SAMPLE_RECORDS)
    if n == 0:
        return "\n".join(lines)
    chunk = source.read(0, n)
    guessed = ""
    if pad_id is None and lengths_column is None and not (mask_column and mask_column in source.columns):
        pad_id = _guess_pad_id(chunk)
        guessed = " (guessed: the most common last value; pass --pad-id to be sure)" if pad_id is not None else ""
    try:
        spec = resolve_padding(source.columns, pad_id=pad_id, lengths_column=lengths_column,
                               mask_column=mask_column, padding_side=padding_side, source_name=source.paths[0])
    except DlpipeError as e:
        lines.append(f"  padding: cannot tell ({e})")
        return "\n".join(lines)
    if spec.method == "none":
        lines.append("  padding: no padded columns")
        return "\n".join(lines)
    lengths, is_left = record_lengths(chunk, spec, path={n: source.column_path(n) for n in chunk}, first_record=0)
    how = {"pad_id": f"pad id {spec.pad_id}{guessed}", "mask": f"mask column {spec.mask_column!r}",
           "lengths": f"lengths column {spec.lengths_column!r}"}[spec.method]
    waste = 1 - lengths.mean() / spec.max_length
    lines += [
        f"  padding: {', '.join(spec.sequence_columns)} padded to {spec.max_length}, found by {how}"
        f"{', left-padded' if is_left.any() else ''}",
        f"  lengths (first {n:,} records): min {lengths.min()}  mean {lengths.mean():.1f}  "
        f"p50 {np.percentile(lengths, 50):.0f}  p99 {np.percentile(lengths, 99):.0f}  max {lengths.max()}",
        f"  padding waste: {waste:.1%} of padded positions hold padding",
        "  length histogram:",
    ]
    lines += _histogram(lengths, spec.max_length)
    return "\n".join(lines)


def _guess_pad_id(chunk: dict[str, np.ndarray]) -> int | None:
    ints = [a for a in chunk.values() if a.ndim == 2 and a.dtype.kind in "iu" and a.shape[1] > 1]
    if not ints:
        return None
    widest = max(ints, key=lambda a: a.shape[1])
    values, counts = np.unique(widest[:, -1], return_counts=True)
    return int(values[np.argmax(counts)])


def _histogram(lengths: np.ndarray, width: int, bins: int = 12) -> list[str]:
    counts, edges = np.histogram(lengths, bins=bins, range=(0, max(width, 1)))
    top = counts.max() or 1
    return [f"    {int(lo):>6}-{int(hi):<6} {'#' * int(40 * c / top):<40} {c:,}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def _is_dataset(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> bool:
    manifest = Location(path, storage_options).join(MANIFEST)
    try:
        return manifest.isfile()
    except OSError:  # not a place a manifest can be (a source file's URL, say): not a dataset
        return False


def describe_dataset(root: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    info = load_manifest(root, storage_options)
    raw = info.raw["dlpipe"]
    comp = info.compression or "none"
    lines = [f"dlpipe dataset {root} ({info.format}, compression {comp}, made by dlpipe {raw['version']})"]
    for split, entry in info.raw["splits"].items():
        shards = info.split_shards(split)
        lines.append(f"  split {split}: {entry['num_examples']:,} records in {len(shards)} "
                     f"shard{'s' if len(shards) != 1 else ''}, "
                     f"{format_bytes(entry['num_bytes'])}")
    lines.append("  columns:")
    for name, c in raw["columns"].items():
        shape = "[" + ", ".join("*" if d is None else str(d) for d in c["shape"]) + "]"
        pad = f" pad {c['pad_value']}" if c.get("pad_value") is not None else ""
        lines.append(f"    {name:<20} {c['dtype']:<8} {shape:<10} stored as {c['storage_dtype']} ({c['encoding']}){pad}")
        if "lengths" in c:
            s = c["lengths"]
            lines.append(f"      lengths: mean {s['mean']:.1f} p50 {s['p50']:.0f} p99 {s['p99']:.0f} max {s['max']} "
                         f"of {s['padded_length']} padded ({s['padding_efficiency_of_source']:.0%} of the source was real)")
    src = raw["source"]
    lines.append(f"  source: {src['kind']} {', '.join(src['paths'])} ({format_bytes(src['num_bytes'])}, "
                 f"fingerprint {src['fingerprint'][:12]})")
    plan = raw["plan"]
    shuffle = f"shuffled with seed {plan['seed']}" if plan["shuffle"] else "source order"
    lines.append(f"  plan: {plan['num_shards']} shards balanced by {plan['balance_by']}, {shuffle}")
    total = info.raw["dataset_size"]
    if src["num_bytes"] and total:
        lines.append(f"  size: {format_bytes(src['num_bytes'])} -> {format_bytes(total)} "
                     f"({src['num_bytes'] / total:.1f}x smaller)")
    return "\n".join(lines)
