"""Sequence packing: several records per row of ``max_length`` tokens; numpy only.

Padded batches of the DeepCAL-like corpus are about half padding; packed rows are 99.5% real
tokens there (windows of 4096 records). ``pack_lengths`` assigns a window's records to rows from
their lengths (a ``RowPlan``); ``build_rows`` lays rows out as a batch: variable columns
``[B, L, ...]``, ``segment_ids`` (0 = padding, 1..k the row's records) and ``position_ids`` (0 at
each record's start) ``[B, L]`` int32, per-record (fixed-shape) columns ``[B, S, ...]`` with
``segment_mask [B, S]`` (S = ``max_segments``); ``build_flat`` the flattened form of varlen
attention (FlashAttention's ``cu_seqlens``, HF ``DataCollatorWithFlattening``).
``SequencePacker`` does both, window by window.

The packer plans *templates*: records of one length are interchangeable, so a row is planned as
a multiset of lengths, given to as many rows as the counts allow (dozens, typically). A template
takes the longest record that fits (never leaving a gap shorter than the shortest record) while
over ``THRESHOLD_MEDIANS`` median lengths are free, then completes the row exactly with up to
``COMPLETE_DEPTH`` records (a bounded depth-first search, longest first), else by best fit.
Best-fit decreasing, without the exact completion, fills 98% here (rows like 4 x 30 tokens + 8
free). Python work is per template: ~60 for 4096 DeepCAL records, up to one per row where
lengths are many and distinct (long documents). Records are matched to the planned slots by one
sort. The plan is a function of the lengths and their order alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.loaders.collate import Ragged, take_rows

Batch = dict[str, np.ndarray]
LAYOUTS = ("rows", "flat")
DEFAULT_SEGMENTS = 32
THRESHOLD_MEDIANS = 3.0  # free space (in median lengths) below which a row is completed exactly
COMPLETE_DEPTH = 4  # records an exact completion may use
COMPLETE_BUDGET = 256  # search steps per completion, so no window can stall the loader


@dataclass(frozen=True)
class PackingOptions:
    """Rows of ``max_length`` tokens of ``column``, at most ``max_segments`` records each;
    ``rows_per_batch`` rows per batch, or ``max_tokens // max_length`` (a token budget).

    ``truncate=False`` refuses records longer than ``max_length``; ``True`` cuts them to their
    first ``max_length`` tokens (all variable columns alike). ``layout="flat"`` gives each
    batch's rows in the flattened form (``[1, T]`` + ``cu_seqlens``) instead of ``[B, L]``.
    ``carry=True`` keeps the ``rows % batch_rows`` least filled new rows of a window back and
    fills them further from the next one, so every batch but an epoch's last is full; with
    ``False`` each window is packed on its own (its last batch may be short), so a window's
    batches depend on that window alone.
    """

    max_length: int
    max_segments: int = DEFAULT_SEGMENTS
    rows_per_batch: int | None = None
    max_tokens: int | None = None
    column: str = "input_ids"
    truncate: bool = False
    layout: str = "rows"
    carry: bool = True

    def __post_init__(self) -> None:
        for name in ("max_length", "max_segments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r}; must be an int >= 1")
        rows, tokens = self.rows_per_batch, self.max_tokens
        if (rows is None) == (tokens is None):
            raise ConfigError(f"rows_per_batch={rows!r}, max_tokens={tokens!r}; give one of them")
        if rows is not None and rows < 1:
            raise ConfigError(f"rows_per_batch={rows!r}; must be >= 1")
        if tokens is not None and tokens < self.max_length:
            raise ConfigError(f"max_tokens={tokens!r}; must be >= max_length={self.max_length}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout={self.layout!r}; use 'rows' or 'flat'")

    @property
    def batch_rows(self) -> int:
        return self.rows_per_batch or self.max_tokens // self.max_length  # type: ignore[operator]

    def check_columns(self, encodings: Mapping[str, ColumnEncoding]) -> None:
        """Raise ConfigError unless ``column`` is a variable-length column of ``encodings``."""
        enc = encodings.get(self.column)
        if enc is None:
            raise ConfigError(f"column={self.column!r} is not loaded; columns: {sorted(encodings)}")
        if not enc.variable:
            raise ConfigError(
                f"column={self.column!r} has no length (fixed shape {tuple(enc.shape)}); "
                "pack by a variable-length column such as 'input_ids'"
            )


@dataclass(frozen=True)
class RowPlan:
    """Row r holds records ``records[row_splits[r]:row_splits[r + 1]]``, in segment order."""

    records: np.ndarray
    row_splits: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_splits) - 1

    def take(self, rows: np.ndarray) -> RowPlan:
        """These rows only, in this order."""
        return RowPlan(*take_rows((self.records, self.row_splits), np.asarray(rows, np.int64)))


def pack_lengths(lengths: np.ndarray, max_length: int, max_segments: int = DEFAULT_SEGMENTS, *,
                 truncate: bool = False, open_rows: RowPlan | None = None,
                 column: str = "input_ids") -> RowPlan:  # fmt: skip
    """Every record (``lengths[i]`` tokens) in a row of at most ``max_length`` tokens and
    ``max_segments`` records (see the module docstring). ``truncate`` counts longer records as
    ``max_length`` long, else they are refused.

    ``open_rows``: rows begun before, of records of this ``lengths`` too (held over from the
    last window). They are the plan's first rows, their records first, and gain records where
    these fit; new rows follow in template order.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > max_length:
        if not truncate:
            raise ConfigError(f"a record of {lengths.max()} tokens in column {column!r} is longer than "
                              f"max_length={max_length}; raise max_length to that or pass truncate=True")  # fmt: skip
        lengths = np.minimum(lengths, max_length)
    opened = open_rows or RowPlan(np.zeros(0, np.int64), np.zeros(1, np.int64))
    n_open, held = opened.num_rows, np.diff(opened.row_splits)
    free = np.ones(len(lengths), bool)
    free[opened.records] = False
    todo = np.flatnonzero(free)
    caps = max_length - np.bincount(np.repeat(np.arange(n_open), held),
                                    lengths[opened.records], n_open).astype(np.int64)  # fmt: skip
    by_room = np.lexsort((np.arange(n_open), -caps))  # open rows grouped, roomiest first
    keys = zip(caps[by_room].tolist(), (max_segments - held[by_room]).tolist())
    groups = [[cap, slots, len(list(run))] for (cap, slots), run in groupby(keys)]
    counts = np.bincount(lengths[todo], minlength=max_length + 1).tolist()
    median = float(np.median(lengths[todo])) if len(todo) else 0.0
    firsts, ks, items, new_rows = _templates(counts, groups, n_open, max_length, max_segments,
                                             max(THRESHOLD_MEDIANS * median, 1.0))  # fmt: skip
    # template t gives its lengths to the rows at positions firsts[t] .. firsts[t] + ks[t] - 1
    ks, sizes = np.array(ks, np.int64), np.array([len(i) for i in items], np.int64)
    positions = _runs(np.array(firsts, np.int64), ks)
    row_ids = np.concatenate([by_room, n_open + np.arange(new_rows)])[positions]
    per_row = np.repeat(sizes, ks)
    flat = np.array([n for i in items for n in i], np.int64)
    slot_len = flat[_runs(np.repeat(np.cumsum(sizes) - sizes, ks), per_row)]
    slot_rec = np.empty(len(slot_len), np.int64)  # the records of each length, in their order
    slot_rec[_stable_order(slot_len)] = todo[_stable_order(lengths[todo])]
    rows = np.concatenate([np.repeat(np.arange(n_open), held), np.repeat(row_ids, per_row)])
    splits = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_open + new_rows))])
    order = _stable_order(rows)  # a row's held records first, then its new ones
    return RowPlan(np.concatenate([opened.records, slot_rec])[order], splits.astype(np.int64))


def _stable_order(a: np.ndarray) -> np.ndarray:
    """``np.argsort(a, kind="stable")``; small non-negative ints sort ~5x faster as int16."""
    return np.argsort(a.astype(np.int16) if a.max(initial=0) < 2**15 else a, kind="stable")


def _runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``starts[i], starts[i] + 1, ..`` (``counts[i]`` of them) for every i, concatenated."""
    ends = np.cumsum(counts, dtype=np.int64)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


def _templates(counts, groups, n_open, max_length, max_segments, threshold):
    """(first row position, rows, lengths each gains) per template, and the new rows: ``groups``
    of open rows ([free tokens, free segments, rows], at positions 0..n_open-1 in order) first,
    then new rows (positions from n_open), until ``counts`` (records left per length) is spent."""
    avail = [n for n in range(1, len(counts)) if counts[n]]  # lengths left, ascending
    firsts, ks, items = [], [], []
    position, next_new = 0, n_open
    while avail or counts[0]:
        cap, slots, rows = groups[0] if groups else (max_length, max_segments, None)
        found = _fill(cap, slots, counts, avail, threshold) if slots > 0 else []
        uses = {n: found.count(n) for n in set(found)}
        k = min([counts[n] // u for n, u in uses.items()] + ([rows] if groups else []))
        if found:
            firsts.append(position if groups else next_new)
            ks.append(k)
            items.append(found)
        if groups:  # an open row nothing fits in keeps what it has (a new row always gains)
            k = k if found else rows
            position, groups[0][2] = position + k, rows - k
            groups = groups[1:] if k == rows else groups
        else:
            next_new += k
        for n, u in uses.items():
            counts[n] -= k * u
            if n and not counts[n]:
                avail.pop(bisect.bisect_left(avail, n))
    return firsts, ks, items, next_new - n_open


def _fill(cap: int, slots: int, counts: list[int], avail: list[int], threshold: float) -> list[int]:
    """The lengths a row with ``cap`` free tokens and ``slots`` free segments gains."""
    rem = counts.copy()  # what is left once this row's records are taken
    found: list[int] = []

    def longest(c: int, gap: int) -> int:  # longest <= c leaving 0 or >= gap free; 0: none
        i = bisect.bisect_right(avail, c) - 1
        while i >= 0 and not (rem[avail[i]] and (avail[i] == c or c - avail[i] >= gap)):
            i -= 1
        return avail[i] if i >= 0 else 0

    shortest = next((n for n in avail if rem[n]), 0)
    while shortest and len(found) < slots - 1 and cap > threshold:
        n = longest(cap, shortest) or longest(cap, 0)
        if not n:
            break
        found.append(n)
        rem[n], cap = rem[n] - 1, cap - n
    if cap and len(found) < slots and avail:
        exact = _exact(cap, min(slots - len(found), COMPLETE_DEPTH), avail, rem)
        found += exact
        while not exact and len(found) < slots and (n := longest(cap, 0)):
            found.append(n)  # best fit: no exact completion within the search budget
            rem[n], cap = rem[n] - 1, cap - n
    return found + [0] * min(slots - len(found), counts[0])  # empty records: a segment each


def _exact(target: int, depth: int, avail: list[int], rem: list[int]) -> list[int]:
    """Up to ``depth`` lengths summing to ``target``, longest first, taken from ``rem``; []
    when there are none or ``COMPLETE_BUDGET`` steps do not find them."""
    path: list[int] = []
    steps, shortest = 0, avail[0]

    def search(rest: int, depth: int, top: int) -> bool:
        nonlocal steps
        i = bisect.bisect_right(avail, rest if rest < top else top) - 1
        while depth and i >= 0 and steps < COMPLETE_BUDGET and avail[i] * depth >= rest:
            n, steps = avail[i], steps + 1
            if rem[n] and (n == rest or (rest - n >= shortest and depth > 1)):
                rem[n] -= 1
                path.append(n)
                if n == rest or search(rest - n, depth - 1, n):
                    return True
                path.pop()
                rem[n] += 1
            i -= 1
        return False

    return path if search(target, depth, target) else []


# ---------------------------------------------------------------------------------------------
# batches


def build_rows(columns: Mapping[str, Ragged], encodings: Mapping[str, ColumnEncoding],
               plan: RowPlan, options: PackingOptions, pad_values: Mapping[str, float | int] | None = None,
               num_rows: int | None = None) -> Batch:  # fmt: skip
    """The plan's rows as one batch (see the module docstring), with empty rows up to
    ``num_rows``. Records are cut to ``max_length``; every variable column must be as long as
    ``options.column`` in every record."""
    held = np.diff(plan.row_splits)
    rows = plan.num_rows if num_rows is None else num_rows
    if rows < plan.num_rows or (len(held) and held.max() > options.max_segments):
        raise ConfigError(f"num_rows={num_rows}, max_segments={options.max_segments}; the plan "
                          f"has {plan.num_rows} rows of up to {held.max(initial=0)} records")  # fmt: skip
    rec_row = np.repeat(np.arange(plan.num_rows), held)
    seg = np.arange(len(plan.records)) - plan.row_splits[rec_row]
    return _lay_out(columns, encodings, plan.records, rec_row, seg, rows, options, pad_values)


def build_flat(columns: Mapping[str, Ragged], encodings: Mapping[str, ColumnEncoding],
               records: np.ndarray, options: PackingOptions,
               pad_values: Mapping[str, float | int] | None = None) -> Batch:  # fmt: skip
    """``records`` back to back, cut to ``max_length``: variable columns ``[1, T, ...]``,
    ``position_ids [1, T]`` and ``cu_seqlens [n + 1]`` int32 (record i is tokens
    ``cu_seqlens[i]:cu_seqlens[i + 1]``), ``max_seqlen`` (0-d int32), per-record columns
    ``[n, ...]``."""
    n = len(records)
    out = _lay_out(columns, encodings, np.asarray(records, np.int64), np.zeros(n, np.int64),
                   np.arange(n), None, options, pad_values)  # fmt: skip
    steps = np.bincount(out.pop("segment_ids")[0], minlength=n + 1)[1:]
    del out["segment_mask"]
    out.update({name: out[name][0] for name, enc in encodings.items() if not enc.variable})
    out["cu_seqlens"] = np.concatenate([[0], np.cumsum(steps)]).astype(np.int32)
    out["max_seqlen"] = np.asarray(steps.max(initial=0), np.int32)
    return out


def _lay_out(columns, encodings, records, rec_row, seg, rows, options, pad_values) -> Batch:
    """Records (row-major) into ``rows`` rows of ``max_length`` tokens, each row's back to back
    from its start (``rows`` None: one row of them all, as long as they are)."""
    options.check_columns(encodings)
    column, pads = options.column, pad_values or {}
    full = (np.diff(columns[column][1]) // encodings[column].inner)[records]
    steps = np.minimum(full, options.max_length)
    pos = _runs(np.zeros(len(steps), np.int64), steps)  # the records' tokens, back to back
    flat, fill = rows is None, None
    rows, width = (1, len(pos)) if flat else (rows, options.max_length)
    segments = len(steps) if flat else options.max_segments
    if not flat:  # each row: its records' tokens, then padding
        row_tokens = np.bincount(rec_row, steps, minlength=rows).astype(np.int64)
        if row_tokens.max(initial=0) > width:
            raise ConfigError(f"a row holds {row_tokens.max()} tokens; max_length={width}")
        fill = np.arange(width) < row_tokens[:, None]

    def lay(stream: np.ndarray, pad: float | int) -> np.ndarray:
        if fill is None:
            return stream[None]
        out = np.full((rows, width, *stream.shape[1:]), pad, stream.dtype)
        out[fill] = stream
        return out

    slot = rec_row * segments + seg
    out: Batch = {}
    for name, (values, splits) in columns.items():
        enc, first = encodings[name], splits[records]
        if not enc.variable:
            data = np.zeros((rows * segments, enc.inner), values.dtype)
            data[slot] = values[first[:, None] + np.arange(enc.inner)]
            out[name] = data.reshape((rows, segments, *enc.shape))
            continue
        if name != column and not np.array_equal((splits[records + 1] - first) // enc.inner, full):
            raise ConfigError(f"column {name!r} is not as long as column {column!r} in every "
                              "record; only such columns can be packed with it")  # fmt: skip
        src = (np.repeat(first, steps) + pos * enc.inner)[:, None] + np.arange(enc.inner)
        out[name] = lay(values[src].reshape((len(pos), *enc.shape[1:])), pads.get(name, 0))
    out["segment_ids"] = lay(np.repeat((seg + 1).astype(np.int32), steps), 0)
    out["position_ids"] = lay(pos.astype(np.int32), 0)
    mask = np.zeros(rows * segments, bool)
    mask[slot] = True
    out["segment_mask"] = mask.reshape(rows, segments)
    return out


def packing_efficiency(batches: Mapping[str, np.ndarray] | Iterable[Mapping]) -> float:
    """Real tokens / all tokens of one batch or many: ``segment_ids > 0`` of packed rows, else
    the ``attention_mask`` of padded ones; a flattened batch (no mask) is all real tokens."""
    real = size = 0
    for batch in [batches] if isinstance(batches, Mapping) else batches:
        mask = batch.get("segment_ids", batch.get("attention_mask"))
        mask = np.ones_like(batch["position_ids"]) if mask is None else mask
        real, size = real + int(np.count_nonzero(mask)), size + mask.size
    return real / size if size else 0.0


class SequencePacker:
    """Packs windows of records (ragged columns, as ``ShardReader.read`` returns them) into
    batches of ``options.batch_rows`` rows.

    ``pack(columns, rng)`` returns the batches a window completes, its rows shuffled by ``rng``
    when given. With ``options.carry`` it holds its ``rows % batch_rows`` least filled new rows
    back (under ``batch_rows * max_length`` tokens) for the next window to fill further: a
    record waits one window (more only past windows of under ``batch_rows`` new rows).
    ``flush()`` returns them as a last, short batch.
    """

    def __init__(self, options: PackingOptions, encodings: Mapping[str, ColumnEncoding],
                 pad_values: Mapping[str, float | int] | None = None) -> None:  # fmt: skip
        options.check_columns(encodings)
        self.options, self.encodings = options, dict(encodings)
        self.pad_values = dict(pad_values or {})
        self._held: tuple[dict[str, Ragged], RowPlan] | None = None

    @property
    def held_rows(self) -> int:
        """Rows held back for the next window."""
        return 0 if self._held is None else self._held[1].num_rows

    def pack(self, columns: Mapping[str, Ragged], rng: np.random.Generator | None = None) -> list[Batch]:  # fmt: skip
        opts = self.options
        cols = {name: columns[name] for name in self.encodings}
        held, opened = self._held or (None, None)
        if held is not None:
            cols = {name: _concat(held[name], col) for name, col in cols.items()}
        lengths = np.diff(cols[opts.column][1]) // self.encodings[opts.column].inner
        plan = pack_lengths(lengths, opts.max_length, opts.max_segments, truncate=opts.truncate,
                            open_rows=opened, column=opts.column)  # fmt: skip
        self._held = None
        rows = np.arange(plan.num_rows) if rng is None else rng.permutation(plan.num_rows)
        keep = plan.num_rows % opts.batch_rows if opts.carry else 0
        if keep:  # the least filled rows, of those not held back before
            tokens = np.minimum(lengths, opts.max_length)[plan.records]
            tokens = np.add.reduceat(tokens, plan.row_splits[:-1])[rows]
            back = np.zeros(len(rows), bool)
            back[np.lexsort((tokens, rows < (opened.num_rows if opened else 0)))[:keep]] = True
            kept = plan.take(rows[back])
            kept_cols = {name: take_rows(col, kept.records) for name, col in cols.items()}
            self._held = kept_cols, RowPlan(np.arange(len(kept.records)), kept.row_splits)
            rows = rows[~back]
        return self._batches(cols, plan.take(rows))

    def flush(self) -> list[Batch]:
        """The rows held back, as one short batch ([] when none are)."""
        held, self._held = self._held, None
        return [] if held is None else self._batches(*held)

    def _batches(self, cols: dict[str, Ragged], plan: RowPlan) -> list[Batch]:
        opts, b, n = self.options, self.options.batch_rows, plan.num_rows
        if opts.layout == "rows":
            out = build_rows(cols, self.encodings, plan, opts, self.pad_values)
            return [{name: value[i : i + b] for name, value in out.items()} for i in range(0, n, b)]
        out = build_flat(cols, self.encodings, plan.records, opts, self.pad_values)
        cu, bounds = out.pop("cu_seqlens"), plan.row_splits[np.r_[0:n:b, n]].tolist()
        fixed = {name for name, enc in self.encodings.items() if not enc.variable}
        batches = []
        for r0, r1 in zip(bounds[:-1], bounds[1:]):  # the records of batch_rows rows
            batch = {k: v[r0:r1] if k in fixed else v[:, cu[r0] : cu[r1]] for k, v in out.items() if v.ndim}  # fmt: skip
            batch["cu_seqlens"] = cu[r0 : r1 + 1] - cu[r0]
            batch["max_seqlen"] = np.asarray(np.diff(batch["cu_seqlens"]).max(initial=0), np.int32)
            batches.append(batch)
        return batches


def _concat(a: Ragged, b: Ragged) -> Ragged:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1][1:] + a[1][-1]])
