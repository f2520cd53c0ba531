"""The dlpipe command: errors are one line with exit code 1 and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dlpipe.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dlpipe: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_reshard_inspect_verify(npy_corpus, tmp_path):
    out = tmp_path / "out"
    result = run("reshard", *npy_corpus["specs"], "-o", out, "--pad-id", "0", "--num-shards", "2", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "500 records in 2 shards" in result.stdout and "records/s" in result.stdout
    result = run("inspect", out)
    assert "split train: 500 records in 2 shards" in result.stdout
    result = run("verify", out)
    assert result.exit_code == 0 and "OK" in result.stdout
    result = run("inspect", *npy_corpus["specs"])
    assert "padding waste" in result.stdout and "input_ids padded to 32" in result.stdout


def test_verify_finds_corruption(npy_corpus, tmp_path):
    out = tmp_path / "out"
    run("reshard", *npy_corpus["specs"], "-o", out, "--pad-id", "0", "--num-shards", "2", "-j", "1")
    shard = out / "train-00001-of-00002.tfrecord"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run("verify", out)
    assert result.exit_code == 1
    assert "train-00001-of-00002.tfrecord" in result.stderr and "SHA-256" in result.stderr


@pytest.fixture
def bad_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    ids = np.zeros((10, 8), np.int64)
    ids[:, :3] = 5
    np.save(d / "ids.npy", ids)
    (d / "empty.npy").write_bytes(b"")
    full = (d / "ids.npy").read_bytes()
    (d / "cut.npy").write_bytes(full[:-20])
    np.save(d / "short.npy", np.zeros((7, 2), np.float32))
    np.save(d / "nopad.npy", np.ones((10, 8), np.int64))
    (d / "data.bin").write_bytes(np.arange(10 * 8 + 3, dtype=np.int32).tobytes())
    return d


def test_missing_file(bad_inputs, tmp_path):
    assert_one_line_error(run("reshard", bad_inputs / "nope.npy", "-o", tmp_path / "o"), "nope.npy", "no such file")
    assert not (tmp_path / "o").exists()


def test_empty_file(bad_inputs, tmp_path):
    assert_one_line_error(run("reshard", bad_inputs / "empty.npy", "-o", tmp_path / "o"), "empty.npy", "empty")


def test_truncated_npy(bad_inputs, tmp_path):
    r = run("reshard", bad_inputs / "cut.npy", "-o", tmp_path / "o", "--pad-id", "0")
    assert_one_line_error(r, "cut.npy", "truncated", "at byte")
    assert not (tmp_path / "o").exists()


def test_row_counts_disagree(bad_inputs, tmp_path):
    r = run("reshard", f"input_ids={bad_inputs / 'ids.npy'}", f"labels={bad_inputs / 'short.npy'}", "-o",
            tmp_path / "o", "--pad-id", "0")
    assert_one_line_error(r, "short.npy", "7 rows", "10")


def test_raw_layout_that_does_not_fit(bad_inputs, tmp_path):
    r = run("reshard", bad_inputs / "data.bin", "--layout", "input_ids:int32[8]", "-o", tmp_path / "o",
            "--pad-id", "0")
    assert_one_line_error(r, "data.bin", "at byte 320", "--layout")
    r = run("reshard", bad_inputs / "data.bin", "--layout", "input_ids:int33[8]", "-o", tmp_path / "o")
    assert_one_line_error(r, "int33")


def test_no_way_to_find_padding(bad_inputs, tmp_path):
    r = run("reshard", bad_inputs / "ids.npy", "-o", tmp_path / "o")
    assert_one_line_error(r, "ids.npy", "cannot find the padding", "--pad-id")
    r = run("reshard", bad_inputs / "nopad.npy", "-o", tmp_path / "o2", "--no-strip")
    assert r.exit_code == 0, r.output


def test_a_bad_mask_is_named_by_its_own_file(tmp_path):
    # the error names the file that holds the bad values, not the first source file
    ids = np.array([[5, 6, 0, 0], [7, 0, 0, 0], [8, 9, 4, 0]])
    mask = (ids != 0).astype(np.int8)
    np.save(tmp_path / "ids.npy", ids)
    for name, bad, why in (("holes.npy", (2, 1), "not one contiguous run"), ("twos.npy", (1, 0), "other than 0 and 1")):
        broken = mask.copy()
        broken[bad] = 0 if why.startswith("not") else 2
        np.save(tmp_path / name, broken)
        r = run("reshard", f"input_ids={tmp_path / 'ids.npy'}", f"attention_mask={tmp_path / name}",
                "-o", tmp_path / f"out-{name}", "-j", "2")
        assert_one_line_error(r, f"{tmp_path / name} (record {bad[0]})", why)
        assert not (tmp_path / f"out-{name}").exists()


def test_output_exists_with_other_content(bad_inputs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run("reshard", bad_inputs / "ids.npy", "-o", out, "--pad-id", "0")
    assert_one_line_error(r, str(out), "not empty", "--overwrite")
    assert os.listdir(out) == ["notes.txt"]


def test_unwritable_output(bad_inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("reshard", bad_inputs / "ids.npy", "-o", blocker / "sub", "--pad-id", "0")
    assert_one_line_error(r, "cannot write")


@pytest.mark.tf
def test_tfrecord_source_with_bad_crc(tf, tmp_path):
    path = tmp_path / "padded.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(5):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=[i + 1] * 3 + [0] * 5))}))
            w.write(ex.SerializeToString())
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    r = run("reshard", path, "-o", tmp_path / "o", "--pad-id", "0")
    assert_one_line_error(r, "padded.tfrecord", "(record 4)", "CRC")
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(bad_inputs, tmp_path):
    r = run("--debug", "reshard", bad_inputs / "nope.npy", "-o", tmp_path / "o")
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_real_subprocess(npy_corpus, tmp_path):
    exe = [sys.executable, "-m", "dlpipe"]
    out = tmp_path / "out"
    done = subprocess.run([*exe, "reshard", *npy_corpus["specs"], "-o", str(out), "--pad-id", "0",
                           "--format", "tfrecord", "-j", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar in a pipe
    bad = subprocess.run([*exe, "reshard", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
