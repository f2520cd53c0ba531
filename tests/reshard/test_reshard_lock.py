"""One reshard per output: a second run is refused (one line, exit 1) while the first holds the
lock; a run killed with SIGKILL does not leave it stuck; remote outputs use a heartbeat object."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

import dlpipe
from dlpipe.cli import main
from dlpipe.errors import ConfigError, OutputError, OutputLockedError
from dlpipe.reshard.output_dir import OutputDir
from dlpipe.reshard.output_lock import LOCK_FILE, REMOTE_LOCK

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and SIGKILL are POSIX")

OPTS = dict(pad_id=0, num_shards=5, workers=1)

# A reshard that stops for good in its third shard, as a long run would be busy: it touches
# READY, then sleeps until it is killed.
HOLDER = textwrap.dedent("""
    import os, sys, time
    import dlpipe
    from dlpipe.reshard import write
    ready, out, *specs = sys.argv[1:]
    real, calls = write.to_batch, [0]
    def slow(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            open(ready, "w").close()
            time.sleep(600)
        return real(*args, **kwargs)
    write.to_batch = slow
    dlpipe.reshard(specs, out, pad_id=0, num_shards=5, workers=1)
""")


def wait_for(path, proc, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dlpipe: error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def same_tree(a, b) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        if os.path.isfile(os.path.join(a, name)):
            assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


def test_second_run_refused_while_the_first_runs_then_resumes_after_kill_9(npy_corpus, tmp_path):
    specs = npy_corpus["specs"]
    ref, out, ready = tmp_path / "ref", tmp_path / "out", tmp_path / "ready"
    dlpipe.reshard(specs, ref, **OPTS)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), str(out), *specs],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, holder)
        before = sorted(os.listdir(out))
        assert ".train-00002-of-00005.tfrecord.tmp" in before  # its shard in progress
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()

        for overwrite in (False, True):  # --overwrite would delete its shards: refused as well
            with pytest.raises(OutputLockedError) as info:
                dlpipe.reshard(specs, out, overwrite=overwrite, **OPTS)
            msg = str(info.value)
            assert msg.startswith(f"{out}: another reshard is writing there")
            assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "\n" not in msg
            assert isinstance(info.value, OutputError) and info.value.holder["pid"] == holder.pid
        assert sorted(os.listdir(out)) == before  # nothing of the running one was touched

        cli = CliRunner().invoke(main, ["reshard", *specs, "-o", str(out), "--pad-id", "0", "-j", "1"])
        assert cli.exit_code == 1
        assert_one_line_error(cli.stderr, str(out), "another reshard", f"pid {holder.pid}")
        real = subprocess.run([sys.executable, "-m", "dlpipe", "reshard", *specs, "-o", str(out),
                               "--pad-id", "0", "--num-shards", "5", "-j", "1"],
                              capture_output=True, text=True, timeout=120)
        assert real.returncode == 1
        assert_one_line_error(real.stderr, str(out), "another reshard is writing there",
                              f"held by pid {holder.pid}", "wait for it to finish")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert (out / LOCK_FILE).exists()  # left by the killed run, but nobody holds it now

    summary = dlpipe.reshard(specs, out, workers=2, pad_id=0, num_shards=5)
    assert summary.shards_reused == 2 and summary.shards_written == 3
    same_tree(ref, out)  # byte-identical, and the lock file is gone


def test_forked_pool_workers_do_not_keep_a_killed_runs_lock(tmp_path):
    """A fork of the holder (a pool worker) shares the lock file's open file description; the
    lock must still end with the process that took it."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    script = textwrap.dedent("""
        import multiprocessing, sys, time
        from dlpipe.reshard.output_dir import OutputDir
        lock = OutputDir(sys.argv[2]).lock()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
        child.start()
        print(child.pid, flush=True)
        open(sys.argv[1], "w").close()
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(ready), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        wait_for(ready, proc)
        child = int(proc.stdout.readline())
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            OutputDir(out).lock()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        os.kill(child, 0)  # the fork lives on
        with OutputDir(out).lock():  # and yet the lock is free
            pass
    finally:
        for pid in (proc.pid, child):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(30)


def test_cli_refusal_is_one_line_and_exit_1(npy_corpus, tmp_path):
    out = tmp_path / "out"
    with OutputDir(out).lock():
        result = CliRunner().invoke(main, ["reshard", *npy_corpus["specs"], "-o", str(out), "--pad-id", "0"])
        assert result.exit_code == 1
        assert_one_line_error(result.stderr, f"{out}: another reshard is writing there",
                              f"pid {os.getpid()}")
        assert os.listdir(out) == [LOCK_FILE]
    assert not out.exists()  # the lock made the directory, and took it back with it
    result = CliRunner().invoke(main, ["reshard", *npy_corpus["specs"], "-o", str(out), "--pad-id", "0"])
    assert result.exit_code == 0, result.output
    assert LOCK_FILE not in os.listdir(out)


def test_a_failed_run_releases_the_lock_and_leaves_no_directory(npy_corpus, tmp_path, monkeypatch):
    from dlpipe.reshard import api

    def bad_scan(*args, **kwargs):
        raise ConfigError("planted")

    out = tmp_path / "out"
    monkeypatch.setattr(api, "scan", bad_scan)
    with pytest.raises(ConfigError, match="planted"):
        dlpipe.reshard(npy_corpus["specs"], out, **OPTS)
    assert not out.exists()
    monkeypatch.undo()
    dlpipe.reshard(npy_corpus["specs"], out, **OPTS)
    with OutputDir(out).lock():  # released at the end of the run
        pass


def test_existing_directory_and_stale_lock_file(npy_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere"}')  # left by a crash: unlocked
    dlpipe.reshard(npy_corpus["specs"], out, **OPTS)
    assert out.is_dir() and LOCK_FILE not in os.listdir(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with OutputDir(empty).lock():
        pass
    assert empty.is_dir()  # not made by the lock: kept


# ---------------------------------------------------------------------------------------------
# object storage


def _lock_record(**fields) -> bytes:
    now = time.time()
    return json.dumps({"host": "other-host", "pid": 4242, "started": now - 60, "heartbeat": now,
                       **fields}).encode()


def test_remote_lock_object(s3_server, npy_corpus, monkeypatch):
    from dlpipe.storage import Location

    so = s3_server.storage_options
    url = "s3://dlpipe/locked"
    lock_obj = Location(f"{url}/{REMOTE_LOCK}", so)

    held = OutputDir(url, so).lock()  # a run of this process
    record = json.loads(lock_obj.read_bytes())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(OutputLockedError) as info:
        dlpipe.reshard(npy_corpus["specs"], url, storage_options=so, **OPTS)
    msg = str(info.value)
    assert msg.startswith(f"{url}: another reshard is writing there (held by pid {os.getpid()}")
    assert f"deleting {url}/{REMOTE_LOCK} frees it now" in msg
    held.release()
    assert not lock_obj.exists()

    # a live run elsewhere (fresh heartbeat) keeps it; a stale heartbeat, or a dead process of
    # this host, gives it up
    lock_obj.write_bytes(_lock_record())
    with pytest.raises(OutputLockedError, match="pid 4242 on other-host.*last heartbeat 0 s ago"):
        dlpipe.reshard(npy_corpus["specs"], url, storage_options=so, **OPTS)
    lock_obj.write_bytes(_lock_record(heartbeat=time.time() - 3600))
    dlpipe.reshard(npy_corpus["specs"], url, storage_options=so, **OPTS)
    assert not lock_obj.exists() and ".dlpipe-lock" not in Location(url, so).listdir()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_obj.write_bytes(_lock_record(host=socket.gethostname(), pid=dead.pid))
    summary = dlpipe.reshard(npy_corpus["specs"], url, storage_options=so, overwrite=True,
                             **{**OPTS, "num_shards": 2})
    assert summary.num_shards == 2 and not lock_obj.exists()

    # the holder's heartbeat moves while it runs
    from dlpipe.reshard import output_lock

    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.05)
    with OutputDir(url, so).lock():
        first = json.loads(lock_obj.read_bytes())["heartbeat"]
        deadline = time.monotonic() + 30
        while json.loads(lock_obj.read_bytes())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
    assert not lock_obj.exists()
