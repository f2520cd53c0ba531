"""Building many records at once (``formats/pieces.py``) against a join record by record."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlpipe.formats import pieces
from dlpipe.formats.index import index_lines
from dlpipe.formats.pieces import (
    Piece,
    RaggedPiece,
    assemble,
    constant,
    optional,
    varint,
    varint_bytes,
    varint_stream,
)
from dlpipe.formats.tfrecord.framing import length_crcs, masked_crc32c


def _varints(values) -> list[bytes]:
    block, size = varint_bytes(np.asarray(values))
    return [bytes(block[i, : size[i]]) for i in range(len(size))]


def _record_bytes(piece, i: int) -> bytes:
    if isinstance(piece, RaggedPiece):
        start = int(piece.lengths[:i].sum())
        return piece.flat[start : start + int(piece.lengths[i])].tobytes()
    size = piece.block.shape[1] if piece.size is None else int(np.broadcast_to(piece.size, len(piece.block))[i])
    return piece.block[i, :size].tobytes()


@st.composite
def piece_lists(draw):
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["constant", "varint", "optional", "fixed", "ragged", "prefix"]))
        if kind == "constant":
            out.append(constant(rng.integers(0, 256, int(rng.integers(0, 5)), dtype=np.uint8).tobytes(), n))
        elif kind in ("varint", "optional"):
            hi = int(rng.choice([2, 128, 300, 2**20, 2**40]))
            piece = varint(rng.integers(0, hi, n))
            out.append(optional(piece, rng.random(n) < 0.6) if kind == "optional" else piece)
        elif kind == "fixed":
            out.append(Piece(rng.integers(0, 256, (n, int(rng.integers(0, 6))), dtype=np.uint8)))
        elif kind == "prefix":
            w = int(rng.integers(0, 6))
            out.append(pieces.prefix(rng.integers(0, 256, (n, w), dtype=np.uint8), rng.integers(0, w + 1, n)))
        else:
            lengths = rng.integers(0, 7, n).astype(np.int64)
            out.append(RaggedPiece(rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8), lengths))
    return n, out


@pytest.mark.parametrize("max_layouts", [32, 0])  # 0: every record layout through the masked path
@settings(max_examples=60, deadline=None)
@given(case=piece_lists())
def test_assemble_joins_each_records_pieces_in_order(case, max_layouts):
    n, parts = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pieces, "_MAX_LAYOUTS", max_layouts)
        buf, offsets = assemble(parts, n)
    want = [b"".join(_record_bytes(p, i) for p in parts) for i in range(n)]
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([len(w) for w in want])]).tolist()
    assert buf.tobytes() == b"".join(want)


def test_assemble_of_no_records_and_of_ragged_only():
    buf, offsets = assemble([constant(b"ab", 0)], 0)
    assert len(buf) == 0 and offsets.tolist() == [0]
    flat = np.frombuffer(b"abcdef", np.uint8)
    buf, offsets = assemble([RaggedPiece(flat, np.array([2, 0, 3]))], 3)
    assert buf.tobytes() == b"abcde" and offsets.tolist() == [0, 2, 2, 5]


VALUE_CASES = [
    ("small", lambda r, m: r.integers(0, 128, m)),
    ("two bytes", lambda r, m: r.integers(0, 300, m)),
    ("mostly small", lambda r, m: np.where(r.random(m) < 0.05, r.integers(0, 2**40, m), r.integers(0, 128, m))),
    ("tokens", lambda r, m: r.integers(0, 50257, m)),
    ("negative", lambda r, m: r.integers(-5, 2**20, m)),
    ("int64 range", lambda r, m: r.integers(-(2**63), 2**63 - 1, m, dtype=np.int64)),
    ("uint64 range", lambda r, m: r.integers(0, 2**64 - 1, m, dtype=np.uint64)),
    ("uint16", lambda r, m: r.integers(0, 2**16, m).astype(np.uint16)),
    ("int32", lambda r, m: r.integers(0, 2**31 - 1, m).astype(np.int32)),
    ("int8", lambda r, m: r.integers(0, 128, m).astype(np.int8)),
]


@pytest.mark.parametrize("name,make", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_varint_stream_is_each_values_varint_back_to_back(name, make):
    rng = np.random.default_rng(len(name))
    for m in (0, 1, 7, 500):
        values = make(rng, m)
        cuts = np.sort(rng.integers(0, m + 1, 6))
        counts = np.diff(np.concatenate([[0], cuts, [m]]))  # some records empty
        flat, nbytes = varint_stream(values, counts)
        each = _varints(values)
        assert flat.tobytes() == b"".join(each)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        assert nbytes.tolist() == [sum(len(v) for v in each[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("name,make", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_varint_piece_holds_each_records_varint(name, make):
    values = make(np.random.default_rng(1), 300)
    piece = varint(values)
    assert [_record_bytes(piece, i) for i in range(len(values))] == _varints(values)


def test_index_lines_are_printf_lines():
    rng = np.random.default_rng(3)
    for hi in (1, 10, 1000, 10**6, 10**12):
        for base in (0, 1, 9, 10, 99_999, 2**32 - 5, 10**15):
            offsets = np.concatenate([[0], np.cumsum(rng.integers(0, hi, int(rng.integers(1, 40))))])
            starts, sizes = offsets[:-1] + base, np.diff(offsets)
            assert index_lines(offsets, base) == "".join(f"{a} {b}\n" for a, b in zip(starts, sizes))
    assert index_lines(np.array([7]), 3) == ""
    assert index_lines(np.array([0, 0, 0])) == "0 0\n0 0\n"
    assert index_lines(np.array([5, 3])) == "5 -2\n"  # not an index, but written as printf would


def test_length_crcs_are_each_lengths_masked_crc():
    for lengths in (np.array([0, 5, 5, 300, 1, 0]), np.array([2**40, 3, 2**40 + 1]), np.arange(70_000)[::-7]):
        want = [masked_crc32c(int(x).to_bytes(8, "little")) for x in lengths]
        assert length_crcs(lengths).tolist() == want
