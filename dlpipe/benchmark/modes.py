"""Padding modes of ``dlpipe bench``: how batches are shaped, and what that costs the step.

Padded batches of the DeepCAL-like corpus hold about half real tokens, and the model's step
(the constraint of every training row) pays for every token it computes. ``dlpipe bench``
measures each mode's training row:

- ``fixed``: every batch padded to one width, the dataset's padded width (the source's) or its
  longest record: ``pad_to_multiple_of=<that width>``, the old way;
- ``longest``: each batch padded to its longest record (HF's pad-to-longest; dlpipe's default);
- ``buckets``: records grouped by length, each batch padded to its bucket's boundary
  (``bucket_boundaries="auto"``);
- ``packing``: several records per row of ``max_length`` tokens (``packing=True``;
  ``dlpipe.loaders.packing``), see ``PACKING_RULE``.

``plan(mode, data, batch_size)`` gives the loader arguments of a mode from the dataset's
recorded length statistics alone (the same in every process and framework). ``batch_counts``
counts a batch's samples, real tokens and computed tokens in any mode (numpy, torch or TF
tensors). Nothing here imports a framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.defaults import MASK_COLUMN as MASK
from dlpipe.errors import ConfigError

__all__ = ["DEFAULT_MODE", "MODES", "PACKING_RULE", "PaddingPlan", "batch_counts", "efficiency",
           "parse_modes", "plan", "samples_in", "shape_note"]  # fmt: skip

MODES = ("fixed", "longest", "buckets", "packing")
DEFAULT_MODE = "longest"
COLUMN = "input_ids"
PACK_FILL = 0.98  # the share of a packed row's tokens the rows-per-batch rule counts on
PACK_MULTIPLE = 8
PACKING_RULE = (
    "packing: max_length = the longest record rounded up to a multiple of 8 (every record fits "
    "whole; the 99.9th percentile would cut the longest); rows per batch = round(batch_size x "
    "mean length / (max_length x 0.98)), so a batch holds about batch_size records on average; "
    "max_segments = min(max_length // shortest, ceil(2 x max_length / mean length)), twice the "
    "records an average row holds"
)


@dataclass(frozen=True)
class PaddingPlan:
    """One mode's loader arguments: ``loader_kwargs`` (``batch_size`` included) go to
    ``to_torch_dataloader`` and ``to_tf_dataset`` alike."""

    mode: str
    loader_kwargs: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the mode in words, for notes and the report
    max_length: int | None = None  # packing: tokens per row; fixed: the width
    max_segments: int | None = None
    rows: int | None = None  # packing: rows per batch

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "loader_kwargs": dict(self.loader_kwargs), "text": self.text,
                "max_length": self.max_length, "max_segments": self.max_segments, "rows": self.rows}  # fmt: skip


def parse_modes(text: str | Sequence[str] | None) -> list[str]:
    """``"all"``, ``"fixed,packing"`` or a list: the modes in ``MODES`` order, checked."""
    if text is None:
        return list(MODES)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if names in (["all"], []):
        return list(MODES)
    bad = [n for n in names if n not in MODES]
    if bad:
        raise ConfigError(f"padding mode(s) {bad}; use all or a list of {', '.join(MODES)}")
    return [m for m in MODES if m in names]


def length_stats(data: str, column: str = COLUMN) -> dict[str, Any]:
    """The manifest's length statistics of ``column`` (recorded by reshard)."""
    from dlpipe.manifest import load_manifest

    stats = load_manifest(data).raw.get("dlpipe", {}).get("columns", {}).get(column, {}).get("lengths")
    if not stats:
        raise ConfigError(f"{data}: no length statistics for column {column!r}; padding modes need a "
                          "dataset written by dlpipe reshard with a variable-length input_ids")  # fmt: skip
    return stats


def _round_up(n: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(n / multiple)) * multiple)


def packing_shape(stats: Mapping[str, Any], batch_size: int) -> tuple[int, int, int]:
    """(max_length, max_segments, rows per batch) under ``PACKING_RULE``."""
    longest, mean = max(int(stats["max"]), 1), max(float(stats["mean"]), 1e-9)
    shortest = max(int(stats.get("min") or 1), 1)
    max_length = _round_up(longest, PACK_MULTIPLE)
    rows = max(1, round(batch_size * mean / (max_length * PACK_FILL)))
    segments = max(1, min(max_length // shortest, math.ceil(2 * max_length / mean)))
    return max_length, segments, rows


def plan(mode: str, data: str, batch_size: int) -> PaddingPlan:
    """The loader arguments of ``mode`` for the dataset ``data`` at ``batch_size`` records."""
    if mode not in MODES:
        raise ConfigError(f"padding={mode!r}; use one of {', '.join(MODES)}")
    if mode == "longest":
        return PaddingPlan(mode, {"batch_size": batch_size}, "each batch padded to its longest record")
    if mode == "buckets":
        return PaddingPlan(mode, {"batch_size": batch_size, "bucket_boundaries": "auto"},
                           'records grouped by length, padded to their bucket (bucket_boundaries="auto")')  # fmt: skip
    stats = length_stats(data)
    if mode == "fixed":
        width = int(stats.get("padded_length") or stats["max"])
        return PaddingPlan(mode, {"batch_size": batch_size, "pad_to_multiple_of": width},
                           f"every batch padded to {width} (pad_to_multiple_of={width})", max_length=width)  # fmt: skip
    length, segments, rows = packing_shape(stats, batch_size)
    kwargs = {"batch_size": rows, "packing": True, "max_length": length, "max_segments": segments}
    text = (f"packed rows of {length} tokens, up to {segments} records each, {rows} rows per batch "
            f"(~{rows * length * PACK_FILL / max(float(stats['mean']), 1e-9):.0f} records)")  # fmt: skip
    return PaddingPlan(mode, kwargs, text, max_length=length, max_segments=segments, rows=rows)


def _host(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch, wherever it lives
        return t.detach().cpu().numpy()
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def samples_in(batch: Mapping[str, Any]) -> int:
    """Records in a batch: its real segments when packed, else its rows."""
    if "segment_mask" in batch:
        return int(np.count_nonzero(_host(batch["segment_mask"])))
    first = batch[MASK] if MASK in batch else batch[COLUMN]
    return int(first.shape[0])


def batch_counts(batch: Mapping[str, Any]) -> tuple[int, int, int]:
    """(samples, real tokens, computed tokens) of a batch: packed rows count ``segment_ids > 0``,
    padded ones their ``attention_mask`` (or ``input_ids != 0``); computed tokens are all the
    positions of the batch (rows x width)."""
    if "segment_ids" in batch:
        seg = _host(batch["segment_ids"])
        return samples_in(batch), int(np.count_nonzero(seg)), int(seg.size)
    mask = _host(batch[MASK]) if MASK in batch else _host(batch[COLUMN]) != 0
    return int(mask.shape[0]), int(np.count_nonzero(mask)), int(mask.size)


def efficiency(run: Mapping[str, Any]) -> float | None:
    """Real tokens / computed tokens of ``drive``'s timed batches (None when nothing counted)."""
    real, total = sum(run.get("tokens") or []), sum(run.get("computed") or [])
    return real / total if total else None


def shape_note(pplan: PaddingPlan, batches: Sequence[Mapping[str, Any]]) -> str:
    """What a mode's batches look like: rows x width, records per batch, real tokens."""
    if not batches:
        return f"{pplan.mode}: no batches"
    counts = [batch_counts(b) for b in batches]
    rows = np.mean([b[COLUMN].shape[0] for b in batches])
    width = np.mean([b[COLUMN].shape[1] for b in batches])
    real = sum(c[1] for c in counts) / max(sum(c[2] for c in counts), 1)
    return (f"{pplan.mode} ({pplan.text}): {rows:.1f} rows x {width:.1f} tokens on average, "
            f"{np.mean([c[0] for c in counts]):.1f} records per batch, {real:.0%} real tokens")


def packing_unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` says the loader has no ``packing`` argument (a dlpipe before packing)."""
    return isinstance(exc, TypeError) and "packing" in str(exc)
