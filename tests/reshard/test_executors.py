"""The local executors have ``ProcessPoolExecutor``'s shape: the initializer runs with the
initargs in each worker before its tasks, and ``map`` yields results in order."""

from __future__ import annotations

import os

from dlpipe.reshard.executors import InlineExecutor, process_pool

_TAG: str | None = None


def _init(tag: str) -> None:
    global _TAG
    _TAG = tag


def _task(x: int) -> tuple[str | None, int, int]:
    return _TAG, x * x, os.getpid()


def test_inline_executor_runs_in_this_process():
    global _TAG
    _TAG = None
    pool = InlineExecutor(initializer=_init, initargs=("inline",))
    results = list(pool.map(_task, range(5)))
    pool.shutdown()
    assert [(t, sq) for t, sq, _ in results] == [("inline", i * i) for i in range(5)]
    assert {pid for _, _, pid in results} == {os.getpid()}


def test_process_pool_runs_the_initializer_in_each_worker():
    global _TAG
    _TAG = None
    pool = process_pool(2, initializer=_init, initargs=("pool",))
    try:
        results = list(pool.map(_task, range(20)))
    finally:
        pool.shutdown()
    assert [(t, sq) for t, sq, _ in results] == [("pool", i * i) for i in range(20)]
    assert os.getpid() not in {pid for _, _, pid in results} and _TAG is None
