"""The vectorized Example encoder against TensorFlow's own parser."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dlpipe.formats.pieces import varint_bytes
from dlpipe.formats.tfrecord.example_encode import encode_examples, int64_payload, raw_payload

pytestmark = pytest.mark.tf


@st.composite
def batches(draw):
    n = draw(st.integers(0, 12))
    width = draw(st.integers(0, 9))
    ints = draw(hnp.arrays(np.int64, (n, width), elements=st.integers(-(2**63), 2**63 - 1)))
    lengths = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, width)))
    floats = draw(hnp.arrays(np.float32, (n, 2), elements=st.floats(-1e6, 1e6, width=32)))
    return n, ints, lengths, floats


@settings(max_examples=40, deadline=None)
@given(batches())
def test_tensorflow_parses_what_we_encode(tf, batch):
    n, ints, lengths, floats = batch
    feats = [
        int64_payload("ids", ints, lengths),
        raw_payload("raw", ints, lengths),
        raw_payload("xy", floats, None, kind="float"),
    ]
    buf, offsets = encode_examples(feats, n)
    for i in range(n):
        ex = tf.train.Example.FromString(buf[offsets[i] : offsets[i + 1]].tobytes())
        f = ex.features.feature
        assert list(f["ids"].int64_list.value) == ints[i, : lengths[i]].tolist()
        assert f["raw"].bytes_list.value[0] == ints[i, : lengths[i]].astype("<i8").tobytes()
        assert np.array_equal(np.array(f["xy"].float_list.value, np.float32), floats[i])
        # dlpipe writes exactly what protobuf would (keys sorted, packed lists)
        assert ex.SerializeToString(deterministic=True) == buf[offsets[i] : offsets[i + 1]].tobytes()


def test_varints_match_protobuf_rules():
    values = np.array([0, 1, 127, 128, 300, 2**35, -1], dtype=np.int64)
    block, size = varint_bytes(values)
    assert size.tolist() == [1, 1, 1, 2, 2, 6, 10]
    assert bytes(block[4, :2]) == b"\xac\x02"
    assert bytes(block[6, :10]) == b"\xff" * 9 + b"\x01"
