"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, in a subprocess.

``S3Server.kill()`` sends SIGKILL (as a crashed or unplugged server); ``start()`` brings it back
on the same port. moto keeps objects in memory, so with ``persist=True`` the server records every
request (moto's recorder) and a restart replays them: what was stored before the kill is there
again, and an upload cut off by the kill is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

CREDENTIALS = {"key": "dlpipe-test-key", "secret": "dlpipe-test-secret-do-not-log"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, workdir: str, *, persist: bool = False) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.recording = os.path.join(workdir, "moto-recording.jsonl") if persist else None
        self.log = os.path.join(workdir, "moto.log")
        self.proc: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict:
        return {**CREDENTIALS, "endpoint_url": self.endpoint, "client_kwargs": {"region_name": "us-east-1"}}

    @property
    def env(self) -> dict:
        """Environment variables that point boto/s3fs at this server (for CLI subprocesses)."""
        return {"AWS_ACCESS_KEY_ID": CREDENTIALS["key"], "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        env = dict(os.environ)
        if self.recording:
            env.update(MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=self.recording)
            self._trim_recording()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start; see {self.log}") from None
                time.sleep(0.1)
        if self.recording and os.path.getsize(self.recording):
            req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/replay-recording", method="POST")
            urllib.request.urlopen(req, timeout=120).read()

    def _trim_recording(self) -> None:
        """Keep the recording's whole requests, one per line. Moto appends each request with
        more than one write, from concurrent threads: a kill can cut the last one short, and two
        requests can share a line (a large one's newline written after a small one). What does not
        parse is dropped; the rest replays."""
        if not os.path.exists(self.recording):
            open(self.recording, "w").close()
            return
        decoder = json.JSONDecoder()
        kept = []
        with open(self.recording, encoding="utf-8", errors="replace") as f:
            for line in f:
                at, line = 0, line.strip()
                while at < len(line):
                    try:
                        entry, at = decoder.raw_decode(line, at)
                    except ValueError:
                        break
                    kept.append(json.dumps(entry))
                    while at < len(line) and line[at].isspace():
                        at += 1
        with open(self.recording, "w", encoding="utf-8") as f:
            f.writelines(entry + "\n" for entry in kept)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill()

    def make_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10).read()

    def upload(self, local_dir: str | os.PathLike, url: str, *, skip: tuple[str, ...] = ()) -> str:
        """Every file of ``local_dir`` (but ``skip``) to ``url`` (``s3://bucket/prefix``); returns it."""
        from dlpipe.storage import Location

        for name in sorted(os.listdir(local_dir)):
            if name not in skip:
                target = Location(url, self.storage_options).join(name)
                target.fs.put_file(os.path.join(local_dir, name), target.fs_path)
        return url


@contextlib.contextmanager
def running(workdir: str | os.PathLike) -> Iterator[S3Server]:
    """A started server with an empty bucket ``dlpipe``, stopped afterwards (skips the test
    where s3fs or moto is not installed)."""
    import pytest

    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    server = S3Server(str(workdir))
    server.start()
    try:
        server.make_bucket("dlpipe")
        yield server
    finally:
        server.stop()
