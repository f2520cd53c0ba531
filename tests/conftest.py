from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from token_rows import padded_tokens

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# PyPI's CUDA build of torch brings triton, whose libtriton.so carries its own LLVM. Loaded after
# TensorFlow (as the first torch optimizer or torch.compile after any TF test would load it), its
# static initialisers resolve LLVM globals to TensorFlow's copy and the process dies with SIGSEGV
# (issue 15). Loaded first, both work. `make` installs the CPU build (no triton) by default; this
# keeps the suite usable where a CUDA build was installed. dlpipe's own benchmark never mixes the
# two: each framework runs in a worker process of its own.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Copies of remote files go to a cache of the test run's own, not ~/.cache/dlpipe (set in
    the environment, so CLI subprocesses and Ray workers see it too)."""
    old = os.environ.get("DLPIPE_CACHE_DIR")
    os.environ["DLPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dlpipe-cache"))
    yield
    if old is None:
        os.environ.pop("DLPIPE_CACHE_DIR", None)
    else:
        os.environ["DLPIPE_CACHE_DIR"] = old


@pytest.fixture
def npy_corpus(tmp_path):
    """A small padded corpus as .npy columns: input_ids int64 (n, 32) padded with 0, labels float32 (n, 2)."""
    rng = np.random.default_rng(1)
    ids, lengths = padded_tokens(rng, 500, 32)
    labels = rng.normal(size=(500, 2)).astype(np.float32)
    np.save(tmp_path / "input_ids.npy", ids)
    np.save(tmp_path / "labels.npy", labels)
    return {"dir": tmp_path, "ids": ids, "lengths": lengths, "labels": labels,
            "specs": [str(tmp_path / "input_ids.npy"), str(tmp_path / "labels.npy")]}


@pytest.fixture(scope="session")
def tf():
    tf = pytest.importorskip("tensorflow")
    return tf


@pytest.fixture
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with an empty bucket ``dlpipe``; killed afterwards."""
    from s3_server import running

    with running(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def persistent_s3_server(tmp_path_factory):
    """Like s3_server, but a kill and restart keeps what was stored (moto's recorder + replay)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3_server import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3")), persist=True)
    server.start()
    server.make_bucket("dlpipe")
    yield server
    server.stop()
