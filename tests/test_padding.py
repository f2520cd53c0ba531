import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.errors import ConfigError, PaddingError
from dlpipe.padding import left_align, record_lengths, resolve_padding
from dlpipe.sources.base import Column


def cols(**shapes):
    return {n: Column(n, np.dtype(d), s) for n, (d, s) in shapes.items()}


@st.composite
def padded(draw):
    n = draw(st.integers(1, 20))
    width = draw(st.integers(1, 16))
    lengths = np.array(draw(st.lists(st.integers(0, width), min_size=n, max_size=n)))
    left = draw(st.booleans())
    ids = np.array(draw(st.lists(st.integers(1, 50), min_size=n * width, max_size=n * width))).reshape(n, width)
    pos = np.arange(width)[None, :]
    mask = (pos >= width - lengths[:, None]) if left else (pos < lengths[:, None])
    return ids * mask, mask.astype(np.int64), lengths, left


@settings(max_examples=80, deadline=None)
@given(padded())
def test_mask_lengths_and_alignment(case):
    ids, mask, lengths, left = case
    width = ids.shape[1]
    spec = resolve_padding(cols(input_ids=("int64", (width,)), attention_mask=("int64", (width,))))
    assert spec.method == "mask" and spec.dropped == ("attention_mask",)
    got, is_left = record_lengths({"input_ids": ids, "attention_mask": mask}, spec, path="p", first_record=0)
    assert got.tolist() == lengths.tolist()
    aligned = left_align(ids, got, is_left)
    for i in range(len(ids)):
        real = ids[i][mask[i].astype(bool)]
        assert aligned[i, : got[i]].tolist() == real.tolist()


@settings(max_examples=80, deadline=None)
@given(padded())
def test_pad_id_lengths(case):
    ids, mask, lengths, left = case
    spec = resolve_padding(cols(input_ids=("int64", (ids.shape[1],))), pad_id=0,
                           padding_side="left" if left else "right")
    got, _ = record_lengths({"input_ids": ids}, spec, path="p", first_record=0)
    assert got.tolist() == lengths.tolist()


def test_pad_id_inside_a_sequence_is_data():
    ids = np.array([[5, 0, 7, 0, 0], [0, 0, 3, 0, 0]])
    spec = resolve_padding(cols(input_ids=("int64", (5,))), pad_id=0)
    got, _ = record_lengths({"input_ids": ids}, spec, path="p", first_record=0)
    assert got.tolist() == [3, 3]


def test_non_contiguous_mask_is_ambiguous():
    spec = resolve_padding(cols(input_ids=("int64", (4,)), attention_mask=("int64", (4,))))
    chunk = {"input_ids": np.ones((2, 4), int), "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 1, 0]])}
    with pytest.raises(PaddingError, match=r"data.bin \(record 11\).*ambiguous"):
        record_lengths(chunk, spec, path="data.bin", first_record=10)


def test_mask_and_pad_id_disagree():
    spec = resolve_padding(cols(input_ids=("int64", (3,)), attention_mask=("int64", (3,))), pad_id=0)
    chunk = {"input_ids": np.array([[4, 4, 9]]), "attention_mask": np.array([[1, 1, 0]])}
    with pytest.raises(PaddingError, match="ambiguous"):
        record_lengths(chunk, spec, path="p", first_record=0)


def test_no_way_to_find_padding_says_what_to_pass():
    with pytest.raises(PaddingError, match="--pad-id"):
        resolve_padding(cols(input_ids=("int64", (8,)), labels=("float32", (2,))))


def test_fixed_columns_stay_fixed():
    spec = resolve_padding(cols(input_ids=("int64", (8,)), labels=("float32", (2,)), score=("int32", ())), pad_id=0)
    assert spec.sequence_columns == ("input_ids",)


def test_lengths_column_validated():
    spec = resolve_padding(cols(input_ids=("int64", (4,)), n=("int32", ())), lengths_column="n")
    with pytest.raises(PaddingError, match="outside 0..4"):
        record_lengths({"input_ids": np.zeros((1, 4), int), "n": np.array([5])}, spec, path="p", first_record=0)
    with pytest.raises(ConfigError, match="not a column"):
        resolve_padding(cols(input_ids=("int64", (4,))), lengths_column="nope")
