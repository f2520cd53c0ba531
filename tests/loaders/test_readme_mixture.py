"""The README's mixture/resume example runs as written (in a process of its own)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.torch
def test_readme_mixture_example_runs(tmp_path):
    pytest.importorskip("torch")
    code = re.search(r"<!-- readme: mixture -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tmp_path / "example.py").write_text(code.group(1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    left = [int(n) for n in re.findall(r"rank \d: (\d+) records left", done.stdout)]
    assert len(left) == 2 and left[0] == left[1] > 0  # equal shares of the rest
