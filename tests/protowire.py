"""Protobuf wire helpers for tests, written out by hand so tests can produce what TensorFlow
never writes: unpacked lists, keys after values, unknown fields, repeated and merged fields."""


def varint(x: int) -> bytes:
    x &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((x & 0x7F) | (0x80 if x > 0x7F else 0))
        x >>= 7
        if not x:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload
