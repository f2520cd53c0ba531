"""Index files ("offset size" lines) parse fast and strictly: the fast path agrees with a plain
split() parse, and anything malformed is a FormatError."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dlpipe.errors import FormatError
from dlpipe.formats.index import parse_index


@given(st.lists(st.tuples(st.integers(0, 2**62), st.integers(0, 2**31)), max_size=50))
def test_lines_parse_to_their_pairs(pairs):
    data = "".join(f"{a} {b}\n" for a, b in pairs).encode()
    assert parse_index(data, "x.index").tolist() == [list(p) for p in pairs]


@given(st.binary(max_size=60) | st.text("0123456789 \n-.x", max_size=60).map(str.encode))
def test_anything_else_is_a_format_error_or_the_plain_parse(data):
    try:
        got = parse_index(data, "x.index")
    except FormatError:
        return
    assert got.tolist() == np.array(data.split(), dtype=np.int64).reshape(-1, 2).tolist()
