"""``ShardDataset.map`` and ``filter``: Python functions over records, as on HF
``datasets.IterableDataset``, run where the batches are made.

A transform sees records as HF functions do: a dict of numpy arrays per record (variable
columns unpadded), or with ``batched=True`` a dict of lists, one entry per record, which may come
back with more or fewer records than it got. Transforms run in order, lazily, while iterating:
in the framework-free iterator (``for record in ds``) over windows of records, and in the PyTorch
loader inside its DataLoader workers on each batch's records before padding, so ``num_workers``
spreads their cost. A batched function in the loader sees one loader batch of records at a time
(``batch_size`` of ``map``/``filter`` applies to the framework-free iterator). A ``filter`` there
leaves fewer records in that batch: batches are made from the epoch plan first, so resuming
stays exact, and a batch whose records are all filtered out is skipped.

tf.data runs graph functions, not Python ones: ``to_tf_dataset`` refuses a dataset with Python
transforms (``tf.py_function`` would hold the GIL per record, the slow path this project exists
to avoid) and says to use ``tf_ds.map`` with TensorFlow ops on the padded batches instead.

After transforms, ``collate_records`` pads the records under the loader's padding rule: columns
from the manifest keep their pad values and kinds; a new column is stacked when every record has
the same shape, else padded along its first axis with 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.loaders.collate import collate

__all__ = ["Transform", "apply_transforms", "collate_records", "make_transform"]

Record = dict[str, Any]


@dataclass(frozen=True)
class Transform:
    """One ``map`` (``keep`` False) or ``filter`` (``keep`` True) step."""

    function: Callable[..., Any]
    keep: bool  # True: a filter (the function says which records stay)
    batched: bool = False
    batch_size: int = 1000
    remove_columns: tuple[str, ...] = ()
    fn_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "filter" if self.keep else "map"


def make_transform(function: Any, *, keep: bool, batched: bool, batch_size: int | None,
                   remove_columns: str | Sequence[str] | None, fn_kwargs: Mapping[str, Any] | None) -> Transform:
    """A checked ``Transform`` (ConfigError naming the bad argument of ``map``/``filter``)."""
    what = "filter" if keep else "map"
    if not callable(function):
        raise ConfigError(f"{what}(function={function!r}): pass a callable taking a record dict")
    if batch_size is None:
        batch_size = 1000
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{what}(batch_size={batch_size!r}): use an int >= 1")
    removed = (remove_columns,) if isinstance(remove_columns, str) else tuple(remove_columns or ())
    return Transform(function, keep, bool(batched), batch_size, removed, dict(fn_kwargs or {}))


def _as_columns(records: list[Record]) -> dict[str, list[Any]]:
    names = list(records[0]) if records else []
    return {n: [r[n] for r in records] for n in names}


def _as_records(columns: Mapping[str, Sequence[Any]], what: str) -> list[Record]:
    sizes = {n: len(v) for n, v in columns.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"a batched {what} function returned columns of different lengths {sizes}; "
                          "return one value per record in every column")
    n = next(iter(sizes.values()), 0)
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _apply_one(t: Transform, records: list[Record]) -> list[Record]:
    name = getattr(t.function, "__name__", repr(t.function))
    if t.batched:
        columns = _as_columns(records)
        out = t.function(columns, **t.fn_kwargs)
        if t.keep:
            flags = np.asarray(out, dtype=bool).reshape(-1)
            if len(flags) != len(records):
                raise ConfigError(f"filter function {name} returned {len(flags)} flags for {len(records)} "
                                  "records; with batched=True return one bool per record")
            return [r for r, k in zip(records, flags.tolist()) if k]
        if not isinstance(out, Mapping):
            raise ConfigError(f"map function {name} returned {type(out).__name__}; with batched=True "
                              "return a dict of lists")
        kept = {k: v for k, v in columns.items() if k not in t.remove_columns and k not in out}
        produced = len(next(iter(out.values()))) if out else len(records)
        if kept and produced != len(records):
            raise ConfigError(f"map function {name} returned {produced} records for {len(records)}; pass "
                              f"remove_columns={sorted(kept)} to drop the input columns (as in HF datasets)")
        return _as_records({**kept, **out}, "map")
    if t.keep:
        return [r for r in records if t.function(r, **t.fn_kwargs)]
    result = []
    for r in records:
        out = t.function(r, **t.fn_kwargs)
        if out is None:  # HF: a function that edits the record in place may return nothing
            out = {}
        if not isinstance(out, Mapping):
            raise ConfigError(f"map function {name} returned {type(out).__name__}; return a dict "
                              "(the columns to add or replace)")
        new = {k: v for k, v in r.items() if k not in t.remove_columns}
        new.update(out)
        result.append(new)
    return result


def apply_transforms(records: list[Record], transforms: Sequence[Transform]) -> list[Record]:
    """``records`` through every transform, in order."""
    for t in transforms:
        if not records:
            break
        records = _apply_one(t, records)
    return records


def collate_records(records: list[Record], encodings: Mapping[str, ColumnEncoding],
                    pad_values: Mapping[str, Any], **padding: Any) -> dict[str, np.ndarray]:
    """Records (after transforms) as one padded batch, under ``loaders.collate.collate``'s rule
    (``padding``: its keyword arguments)."""
    columns, encs = {}, {}
    for name in (list(records[0]) if records else []):
        arrays = [np.asarray(r[name]) for r in records]
        enc = encodings.get(name)
        if enc is None or not _fits(enc, arrays):
            enc = _infer(name, arrays)
        flat = [a.reshape(-1) for a in arrays]
        splits = np.zeros(len(arrays) + 1, np.int64)
        np.cumsum([f.size for f in flat], out=splits[1:])
        columns[name], encs[name] = (np.concatenate(flat).astype(np.result_type(*arrays), copy=False), splits), enc
    pads = {n: v for n, v in pad_values.items() if n in encodings and encs.get(n) == encodings[n]}
    return collate(columns, encs, pads, **padding)


def _fits(enc: ColumnEncoding, arrays: list[np.ndarray]) -> bool:
    """Whether the manifest's description still holds for the column's (transformed) values."""
    if enc.variable:
        return all(a.ndim == len(enc.shape) and tuple(a.shape[1:]) == tuple(enc.shape[1:]) for a in arrays)
    return all(tuple(a.shape) == tuple(enc.shape) for a in arrays)


def _infer(name: str, arrays: list[np.ndarray]) -> ColumnEncoding:
    shapes = {a.shape for a in arrays}
    dtype = str(np.result_type(*arrays)) if arrays else "float32"
    if len(shapes) <= 1:
        shape = next(iter(shapes), ())
        return ColumnEncoding(name, dtype, tuple(shape), dtype)
    inner = {a.shape[1:] for a in arrays}
    if any(a.ndim == 0 for a in arrays) or len(inner) > 1:
        raise ConfigError(f"column {name!r} has records of shapes {sorted(shapes)[:4]} after map; "
                          "a column must keep one shape, or vary along its first axis only")
    return ColumnEncoding(name, dtype, (None, *next(iter(inner))), dtype)
