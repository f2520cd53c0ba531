"""bench/gpu_check.py, the prepared GPU run, works: the same code on CPU (gloo for NCCL)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.torch
def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, ROOT / "bench" / "gpu_check.py", "--out", tmp_path, "--quick",
                           "--skip", "bench"],  # dlpipe bench on CPU: tests/test_torch_bench.py
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.loads((tmp_path / "results.json").read_text())["checks"]
    assert set(checks) == {"device", "data", "ddp", "h2d", "prefetch", "step"} and all(c["ok"] for c in checks.values())
    assert checks["ddp"]["backend"] == "gloo" and checks["ddp"]["steps"] == 5
    assert checks["prefetch"]["same_batches"] and checks["prefetch"]["prefetch"]["steps"] == 6
    assert checks["h2d"]["pinned"]["bytes"] == checks["h2d"]["pageable"]["bytes"] > 0
    assert "| ddp | yes |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.torch
def test_gpu_run_script_packs_the_results(tmp_path):
    # bench/gpu_run.sh as on the GPU machine: here the venv already has dlpipe's dependencies,
    # so no wheel is needed; the results come back as files under $OUT/gpu-check
    pytest.importorskip("torch")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", ROOT / "bench" / "gpu_run.sh", "--quick", "--skip", "bench"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "gpu-check"
    assert json.loads((out / "results.json").read_text())["checks"]["ddp"]["ok"]
    with tarfile.open(out / "gpu-check.tgz") as tar:
        assert {"run/results.json", "run/results.md"} <= set(tar.getnames())


def test_gpu_run_script_names_what_the_interpreter_lacks(tmp_path):
    bare = tmp_path / "python-without-site"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": str(bare)}
    done = subprocess.run(["bash", ROOT / "bench" / "gpu_run.sh"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    # (google_crc32c and click too, unless .gpu-wheels is there)
    assert re.search(r"gpu_run.sh: [\w ]*numpy torch not importable", done.stderr), done.stderr
    assert "make gpu-wheels" in done.stderr
