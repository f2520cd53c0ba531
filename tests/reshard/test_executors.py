"""``LocalPool`` has ``ProcessPoolExecutor``'s shape: the initializer runs with the initargs in
each process before its calls, ``map`` yields results in order; this process is one of the
workers, the first error in call order is raised, and a helper that dies is a DlpipeError."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dlpipe.errors import DlpipeError, OutputError
from dlpipe.reshard.executors import LocalPool

_TAG: str | None = None


def _init(tag: str) -> None:
    global _TAG
    _TAG = tag


def _task(x: int) -> tuple[str | None, int, int]:
    return _TAG, x * x, os.getpid()


def _slow_square(x: int) -> tuple[int, int]:
    time.sleep(0.002)
    return x * x, os.getpid()


def _fail_at(x: int) -> int:
    if x in (3, 5):
        raise OutputError(f"call {x} failed")
    return x


def _bug(x: int) -> int:
    return 1 // (x - 2)


def _die_in_helper(parent: int) -> int:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.01)  # leaves calls for the helper to claim
    return parent


def test_one_worker_runs_in_this_process():
    global _TAG
    _TAG = None
    pool = LocalPool(1, initializer=_init, initargs=("inline",))
    results = list(pool.map(_task, range(5)))
    pool.shutdown()
    assert [(t, sq) for t, sq, _ in results] == [("inline", i * i) for i in range(5)]
    assert {pid for _, _, pid in results} == {os.getpid()}


def test_helpers_and_this_process_share_the_calls_in_order():
    global _TAG
    _TAG = None
    pool = LocalPool(3, initializer=_init, initargs=("pool",))
    try:
        first = list(pool.map(_task, range(40)))
        second = list(pool.map(_task, range(7)))  # a second map on the same helpers
    finally:
        pool.shutdown()
    assert [(t, sq) for t, sq, _ in first] == [("pool", i * i) for i in range(40)]
    assert [sq for _, sq, _ in second] == [i * i for i in range(7)]


def test_helpers_of_a_closed_pool_exit_after_the_last_map():
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    try:
        results = pool.map(_slow_square, range(60))
        pool.close()  # the helper exits once it finds no call left: not an error
        out = list(results)
    finally:
        pool.shutdown()
    assert [sq for sq, _ in out] == [i * i for i in range(60)]


def test_the_first_error_in_call_order_is_raised_as_itself():
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    try:
        results = pool.map(_fail_at, range(8))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(OutputError, match="^call 3 failed$"):
            next(results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_a_bug_in_a_helper_carries_its_traceback():
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    try:
        with pytest.raises(ZeroDivisionError) as caught:
            list(pool.map(_bug, range(6)))
    finally:
        pool.shutdown()
    notes = getattr(caught.value, "__notes__", [])
    assert all("_bug" in note for note in notes)  # empty when this process hit it first


def test_a_helper_that_dies_is_a_dlpipe_error():
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    try:
        with pytest.raises(DlpipeError, match=r"worker process \(pid \d+\) died \(killed by SIGKILL\)"):
            list(pool.map(_die_in_helper, [os.getpid()] * 50))
    finally:
        pool.shutdown()
