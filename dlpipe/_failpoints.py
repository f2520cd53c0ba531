"""Fault injection for crash tests (as etcd's gofail and TiKV's fail-rs do), off unless the
environment asks for it.

``DLPIPE_FAILPOINTS="NAME=KEY@MARKER"`` makes ``failpoint(NAME, KEY)`` kill its own process with
SIGKILL the first time it runs for KEY; the MARKER file records that it fired, so a retried task
(a Ray retry, a rerun) goes on normally. Several are separated by ``;``.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str, key: str) -> None:
    spec = os.environ.get("DLPIPE_FAILPOINTS")
    if not spec:
        return
    for item in spec.split(";"):
        fp_name, _, rest = item.partition("=")
        fp_key, _, marker = rest.partition("@")
        if fp_name != name or fp_key != key or not marker:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
