"""Padded token rows for test corpora, shared by the test modules (a module of its own, not
``conftest``: each test folder may have a conftest, and only one module can be called that)."""

from __future__ import annotations

import numpy as np


def padded_tokens(rng: np.random.Generator, n: int, width: int, *, pad_id: int = 0, max_len: int | None = None,
                  vocab: int = 120, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) right-padded token rows with no pad id at the end of real content, and lengths."""
    max_len = width if max_len is None else max_len
    lengths = rng.integers(0, max_len + 1, n)
    ids = rng.integers(1, vocab, (n, width)).astype(dtype)
    ids[ids == pad_id] = pad_id + 1
    ids[np.arange(width)[None, :] >= lengths[:, None]] = pad_id
    return ids, lengths


def numbered_shards(src, out, n: int, number_column: str, *, num_shards: int = 4, seed: int = 5) -> str:
    """``out``: ``num_shards`` uncompressed TFRecord shards of ``n`` padded token rows (width 24),
    each with its own number in ``number_column``, resharded from .npy files written to ``src``."""
    import dlpipe

    ids, _ = padded_tokens(np.random.default_rng(seed), n, 24)
    np.save(src / "input_ids.npy", ids)
    np.save(src / f"{number_column}.npy", np.arange(n, dtype=np.int64))
    dlpipe.reshard([str(src / "input_ids.npy"), str(src / f"{number_column}.npy")], out, pad_id=0,
                   num_shards=num_shards, workers=1, overwrite=True, progress=False)
    return str(out)
