"""Whole-stream compression of a shard file, as a manifest's ``compression`` names it (None,
``"gzip"``, ``"zlib"``): the same for every format. GZIP and ZLIB wrap the whole stream, as
``tf.io.TFRecordOptions`` defines them and as ``.tar.gz`` readers expect; ``deflate.py`` writes and
reads them (ISA-L when installed, else zlib)."""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

import dlpipe.formats.deflate as deflate
from dlpipe.errors import ConfigError, FormatError
from dlpipe.formats.deflate import Codec, DeflateWriter

__all__ = ["decompress", "open_compressed_writer", "read_decompressed"]


def open_compressed_writer(raw: BinaryIO, compression: str | None, codec: Codec | None = None) -> BinaryIO:
    """Wrap ``raw`` so bytes written are compressed as TensorFlow's TFRecordOptions expects.

    gzip/zlib use ``codec`` (default: ``deflate.codec()``, ISA-L when installed, else zlib); the
    bytes depend only on the data and the codec's identity, never on how writes were split.
    """
    if compression is None:
        return raw
    if compression in ("gzip", "zlib"):
        return DeflateWriter(raw, compression, codec)
    raise ConfigError(f"compression={compression!r} is not one of none, gzip, zlib")


def read_decompressed(path: str | os.PathLike[str], compression: str | None) -> np.ndarray:
    """The whole (decompressed) record stream of a file; a memory map when uncompressed."""
    try:
        if compression is None:
            if os.path.getsize(path) == 0:
                return np.empty(0, dtype=np.uint8)
            return np.memmap(path, dtype=np.uint8, mode="r")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(path, f"cannot read the shard ({e.strerror or e})",
                          hint="it is missing or unreadable; run dlpipe verify, or rerun dlpipe reshard") from None
    return decompress(data, compression, os.fspath(path))


def decompress(data: bytes | memoryview, compression: str, path: str) -> np.ndarray:
    """A gzip or zlib record stream, whole, as bytes; a FormatError naming ``path`` if it is not one."""
    try:
        raw = deflate.decompress(data, compression)
    except deflate.errors() as e:
        raise FormatError(path, f"cannot decompress {compression} stream ({e})",
                          hint="the file is truncated or not compressed as stated") from None
    return np.frombuffer(raw, dtype=np.uint8)
