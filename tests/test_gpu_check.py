"""bench/gpu_check.py, the prepared GPU run, works: the same code on CPU (gloo for NCCL)."""

from __future__ import annotations

import json
import subprocess
import sys
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
