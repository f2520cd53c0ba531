"""On-disk shard formats, one object each (``base.ShardFormat``): ``tfrecord/`` (framed
``tf.train.Example`` records) and ``webdataset/`` (tar samples of ``.npy`` members). Shared by
both: ``compression.py`` (gzip/zlib around the whole stream, via ``deflate.py``), ``index.py``
(the ``.index`` file of record spans) and ``pieces.py`` (building many records at once).

``get_format(name)`` is the one place a format's name (a manifest's ``format``, a ``--format``
option) becomes its object.
"""

from __future__ import annotations

from dlpipe.errors import ConfigError
from dlpipe.formats.base import ShardFormat
from dlpipe.formats.tfrecord import TFRECORD
from dlpipe.formats.webdataset import WEBDATASET

__all__ = ["FORMATS", "ShardFormat", "get_format"]

FORMATS: dict[str, ShardFormat] = {f.name: f for f in (TFRECORD, WEBDATASET)}


def get_format(name: str) -> ShardFormat:
    """The format called ``name``; a ConfigError naming the known ones otherwise."""
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ConfigError(f"format={name!r}; use one of {', '.join(FORMATS)}")
    return fmt
