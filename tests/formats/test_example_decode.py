"""The vectorized tf.train.Example decoder against TensorFlow and against hand-built encodings."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protowire import ld, varint

from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.tfrecord import example_decode, example_layout
from dlpipe.formats.tfrecord.example_decode import DecodedFeature, decode_examples

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("int64", "float", "bytes")
FIELD = {"bytes": 1, "float": 2, "int64": 3}  # Feature.kind oneof members


def encode_list(kind: str, values, packed: bool = True) -> bytes:
    if kind == "bytes":
        return b"".join(ld(1, v) for v in values)
    if kind == "float":
        raw = [struct.pack("<f", v) for v in values]
        return ld(1, b"".join(raw)) if packed else b"".join(b"\x0d" + r for r in raw)
    raw = [varint(int(v)) for v in values]
    return ld(1, b"".join(raw)) if packed else b"".join(b"\x08" + r for r in raw)


def encode_example(
    features: dict, *, packed=True, value_first=False, unknown=False, rng=None
) -> bytes:
    """features: name -> (kind, values). ``rng`` shuffles the map entries."""
    entries = []
    for name, (kind, values) in features.items():
        feature = ld(FIELD[kind], encode_list(kind, values, packed))
        key, value = ld(1, name.encode()), ld(2, feature)
        entry = value + key if value_first else key + value
        if unknown:
            entry += b"\x18\x96\x01" + b"\x25\x00\x00\x00\x00"  # field 3 varint, field 4 fixed32
        entries.append(ld(1, entry))
    if rng is not None:
        rng.shuffle(entries)
    body = ld(1, b"".join(entries))
    return body + (b"\x11" + bytes(8) if unknown else b"")  # field 2 fixed64, unknown to Example


def decode_list(records: list[bytes], gap: int = 3, **kw) -> dict[str, DecodedFeature]:
    """Decode records laid out with junk bytes between them (spans must be respected)."""
    buf, starts, ends = bytearray(b"\xff" * gap), [], []
    for r in records:
        starts.append(len(buf))
        buf += r
        ends.append(len(buf))
        buf += b"\xff" * gap
    return decode_examples(
        np.frombuffer(bytes(buf), np.uint8),
        np.array(starts, np.int64),
        np.array(ends, np.int64),
        **kw,
    )


def rows_of(feat: DecodedFeature, i: int):
    a, b = feat.row_splits[i], feat.row_splits[i + 1]
    if feat.kind == "bytes":
        return [
            bytes(feat.values[feat.value_splits[j] : feat.value_splits[j + 1]]) for j in range(a, b)
        ]
    return feat.values[a:b].tolist()


def check(decoded: dict[str, DecodedFeature], records: list[dict]) -> None:
    names = {n for r in records for n in r}
    assert set(decoded) == names
    for name, feat in decoded.items():
        assert feat.row_splits.dtype == np.int64 and len(feat.row_splits) == len(records) + 1
        assert feat.present.tolist() == [name in r for r in records]
        for i, r in enumerate(records):
            if name in r:
                kind, values = r[name]
                assert feat.kind == kind
                want = [float(np.float32(v)) for v in values] if kind == "float" else list(values)
                assert rows_of(feat, i) == want
            else:
                assert rows_of(feat, i) == []


values_of = {
    "int64": st.lists(
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-200, 200)), max_size=6
    ),
    "float": st.lists(st.floats(width=32, allow_nan=False), max_size=6),
    "bytes": st.lists(st.binary(max_size=6), max_size=4),
}


@st.composite
def datasets(draw):
    """Records of 0-4 features; each name keeps one kind, may be absent, lists of any length."""
    names = draw(st.lists(st.text("abcxyz_/é", min_size=0, max_size=5), max_size=4, unique=True))
    kinds = {n: draw(st.sampled_from(KINDS)) for n in names}
    n = draw(st.sampled_from([0, 1, 2, 5, 17]))
    records = []
    for _ in range(n):
        present = [name for name in names if draw(st.booleans()) or len(names) == 1]
        records.append({name: (kinds[name], draw(values_of[kinds[name]])) for name in present})
    return records


@given(datasets(), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**32))
@SETTINGS
def test_hand_encoded_records_decode_as_written(records, packed, value_first, unknown, seed):
    rng = random.Random(seed)
    raw = [
        encode_example(r, packed=packed, value_first=value_first, unknown=unknown, rng=rng)
        for r in records
    ]
    check(decode_list(raw), records)


def uniform(records: list[dict]) -> list[dict]:
    """The same features in the same order in every record, so the layout plan applies."""
    if not records:
        return records
    template = records[0]
    return [{n: r.get(n, v) for n, v in template.items()} for r in records]


@given(datasets())
@SETTINGS
def test_uniform_records_decode_as_written(records):
    records = uniform(records)
    check(decode_list([encode_example(r) for r in records], gap=0), records)


@pytest.fixture
def no_general_walk(monkeypatch):
    """Fail if the general walk runs: uniform records must stay on the fast path."""

    def boom(*args):
        raise AssertionError("general walk used")

    monkeypatch.setattr(example_decode, "_walk", boom)


def test_many_records_with_multibyte_varints_cross_decode_chunks(no_general_walk):
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**40), 2**40, size=(3000, 64))
    ids[::7] = rng.integers(0, 30000, size=64)
    records = [{"ids": ("int64", row.tolist()), "y": ("float", [0.5])} for row in ids]
    out = decode_list([encode_example(r) for r in records], gap=0)
    assert np.array_equal(out["ids"].values.reshape(3000, 64), ids)
    assert np.array_equal(out["y"].values, np.full(3000, 0.5, np.float32))


def test_same_bytes_layout_and_equal_length_records(no_general_walk):
    ids = np.arange(200 * 128).reshape(200, 128) % 128
    records = [
        {"a": ("int64", r.tolist()), "b": ("bytes", [bytes([i % 256]) * 4])}
        for i, r in enumerate(ids)
    ]
    out = decode_list([encode_example(r) for r in records], gap=0)
    assert np.array_equal(out["a"].values.reshape(200, 128), ids)
    flat, offsets = out["b"].single_bytes()
    assert offsets.tolist() == list(range(0, 804, 4))
    assert bytes(flat[8:12]) == b"\x02" * 4


def test_spans_in_any_order_and_repeated():
    raw = [encode_example({"x": ("int64", [i, -i])}) for i in range(4)]
    buf = np.frombuffer(b"".join(raw), np.uint8)
    lens = np.array([len(r) for r in raw])
    ends = np.cumsum(lens)
    starts = ends - lens
    order = np.array([3, 0, 0, 2])
    out = decode_examples(buf, starts[order], ends[order])
    assert out["x"].values.tolist() == [3, -3, 0, 0, 0, 0, 2, -2]


def test_repeated_key_and_merged_fields_follow_protobuf_rules():
    def entry(name: bytes, *features: bytes) -> bytes:
        return ld(1, ld(1, name) + b"".join(ld(2, f) for f in features))

    ints = lambda vals: ld(3, encode_list("int64", vals))  # noqa: E731
    rec = ld(1, entry(b"k", ints([1])) + entry(b"k", ints([2, 3])))  # a later map entry replaces
    rec += ld(1, entry(b"m", ints([7]), ints([8])))  # a message field given twice merges
    rec += ld(1, entry(b"o", ints([1]) + ld(2, encode_list("float", [2.0]))))  # last oneof wins
    out = decode_list([rec])
    assert rows_of(out["k"], 0) == [2, 3]
    assert rows_of(out["m"], 0) == [7, 8]
    assert out["o"].kind == "float" and rows_of(out["o"], 0) == [2.0]


def test_empty_records_and_unset_kind():
    empty_feature = ld(1, ld(1, ld(1, b"e") + ld(2, b"")))
    out = decode_list([b"", empty_feature, encode_example({"e": ("float", [1.0])})])
    assert out["e"].kind == "float"
    assert out["e"].present.tolist() == [False, True, True]
    assert out["e"].row_splits.tolist() == [0, 0, 0, 1]
    assert decode_list([]) == {}


def test_single_bytes_rejects_other_counts():
    out = decode_list([encode_example({"b": ("bytes", [b"ab", b"c"])})])
    with pytest.raises(FormatError, match="holds 2 bytes values"):
        out["b"].single_bytes()


def _error(records, **kw) -> FormatError:
    with pytest.raises(FormatError) as info:
        decode_list(records, path="in.tfrecord", **kw)
    return info.value


def test_errors_name_path_record_and_offset():
    good = encode_example({"x": ("int64", [300, 5])})
    cut = good[:-1]  # the packed list now ends inside a varint... and lengths run past the end
    e = _error([good, good, cut])
    assert e.path == "in.tfrecord" and e.record == 2 and e.offset == 3 + 2 * (len(good) + 3)
    assert "in.tfrecord at byte" in str(e)
    e = _error([good, cut], frame_offsets=np.array([100, 200, 300]))
    assert e.offset == 200 and e.record == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"\x0a\x05\x0a\x03", "runs past the end"),
        (b"\x08" + b"\xff" * 3, "truncated varint"),
        (b"\x08" + b"\xff" * 11 + b"\x01", "longer than 10 bytes"),
        (b"\x08\x01", None),  # Example.features with a varint wire type
        (ld(1, ld(1, ld(1, b"k") + ld(2, ld(3, b"\x0d\x00\x00\x00\x00")))), "wire type 5"),
        (
            ld(1, ld(1, ld(1, b"k") + ld(2, ld(2, ld(1, b"\x00\x00\x00"))))),
            "packed float list of 3",
        ),
        (ld(1, ld(1, ld(1, b"k") + ld(2, ld(3, ld(1, b"\x80"))))), "truncated varint"),
        (ld(1, ld(1, ld(1, b"k") + ld(2, b"\x08\x01"))), "wrong wire type"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x00", "field number 0"),
    ],
)
def test_malformed_records_raise_format_error(record, message):
    e = _error([encode_example({"g": ("int64", [1])}), record])
    assert e.record == 1
    if message:
        assert message in str(e)


def test_kind_differs_between_records():
    e = _error([encode_example({"k": ("int64", [1])}), encode_example({"k": ("float", [1.0])})])
    assert e.record == 1 and "'k' is float here but int64" in str(e)


def test_bad_spans_are_config_errors():
    with pytest.raises(ConfigError, match="len\\(buf\\)"):
        decode_examples(np.zeros(4, np.uint8), np.array([0]), np.array([5]))
    with pytest.raises(ConfigError, match="uint8"):
        decode_examples(np.zeros(4, np.int32), np.array([0]), np.array([1]))


# Real TensorFlow: what it writes must decode, and the hand encoder must agree with it.


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def tf_example(tf, record: dict) -> bytes:
    feature = {}
    for name, (kind, values) in record.items():
        if kind == "int64":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        elif kind == "float":
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        else:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.mark.tf
@given(datasets())
@SETTINGS
def test_tensorflow_written_records_decode_as_written(tf, records):
    check(decode_list([tf_example(tf, r) for r in records]), records)


@pytest.mark.tf
@given(datasets(), st.booleans())
@SETTINGS
def test_hand_encoder_agrees_with_tensorflow(tf, records, value_first):
    for r in records:
        ours = encode_example(r, packed=False, value_first=value_first)
        assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(tf_example(tf, r))


def _decode_general(records: list[bytes]) -> dict[str, DecodedFeature] | FormatError:
    plan = example_layout.plan
    example_layout.plan = lambda rec: None
    try:
        return decode_list(records)
    except FormatError as e:
        return e
    finally:
        example_layout.plan = plan


@given(datasets(), st.data())
@SETTINGS
def test_corrupted_records_raise_format_error_or_decode_like_the_general_walk(records, data):
    if data.draw(st.booleans()):
        records = uniform(records)
    raw = [bytearray(encode_example(r)) for r in records]
    for r in raw:
        for _ in range(data.draw(st.integers(0, 2))):
            if r:
                r[data.draw(st.integers(0, len(r) - 1))] = data.draw(st.integers(0, 255))
        del r[len(r) - data.draw(st.integers(0, 2)) :]
    raw = [bytes(r) for r in raw]
    general = _decode_general(raw)
    try:
        fast = decode_list(raw)
    except FormatError as e:
        assert isinstance(general, FormatError) and e.record == general.record
        return
    assert not isinstance(general, FormatError)
    assert fast.keys() == general.keys()
    for name, feat in fast.items():
        other = general[name]
        assert feat.kind == other.kind
        for field in ("values", "row_splits", "value_splits", "present"):
            a, b = getattr(feat, field), getattr(other, field)
            assert (a is None and b is None) or np.array_equal(a.view(np.uint8), b.view(np.uint8))
