"""``LocalPool`` has ``ProcessPoolExecutor``'s shape: the initializer runs with the initargs in
each process before its calls, ``map`` yields results in order; this process is one of the
workers, each process takes a contiguous run of calls, an error stops the map at once and the
lowest-numbered error is raised, and a helper that dies is a DlpipeError."""

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
        assert list(pool.map(_task, [])) == []
        second = list(pool.map(_task, range(7)))  # a later map on the same helpers
        with pytest.raises(OutputError, match="^call 3 failed$"):
            list(pool.map(_fail_at, range(4)))  # a failing map, after an empty one
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


def test_one_worker_raises_the_first_error_in_call_order_as_itself():
    pool = LocalPool(1, initializer=_init, initargs=("x",))
    results = pool.map(_fail_at, range(8))
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OutputError, match="^call 3 failed$"):
        next(results)
    pool.shutdown()


def _fail_first_of_each_half(x: int) -> int:
    if x in (0, 4):
        raise OutputError(f"call {x} failed")
    time.sleep(0.005)
    return x


def test_the_lowest_numbered_error_is_raised():
    # this process fails at its first call, 0; the helper's first is 4, which fails too if it ran
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    try:
        with pytest.raises(OutputError, match="^call 0 failed$"):
            list(pool.map(_fail_first_of_each_half, range(8)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fail_at_100(x: int) -> int:
    if x == 100:
        raise OutputError("call 100 failed")
    time.sleep(0.005)
    return x


def test_an_error_stops_the_map_at_once():
    # the helper's first call (100, of 200) fails: the calls before it are not all run first
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    given = []
    try:
        with pytest.raises(OutputError, match="^call 100 failed$"):
            for x in pool.map(_fail_at_100, range(200)):
                given.append(x)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert given == list(range(len(given))) and len(given) < 90


def test_each_process_takes_a_contiguous_run_of_calls():
    # calls [0, n/2) go to this process and the rest to the helper, front to back; whoever runs
    # out first takes calls from the back of the other's run, so each process sees at most 2 runs
    pool = LocalPool(2, initializer=_init, initargs=("x",))
    try:
        pids = [pid for _, pid in pool.map(_slow_square, range(40))]
    finally:
        pool.shutdown()
    assert pids[0] == os.getpid()
    for pid in set(pids):
        mine = [i for i, p in enumerate(pids) if p == pid]
        assert sum(1 for a, b in zip(mine, mine[1:]) if b != a + 1) <= 1


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
