"""bench/ scripts: every recorded result re-renders from its JSON, in the machine schema of
``dlpipe.benchmark.describe()`` or the flat one recorded before it."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlpipe.benchmark.machine import describe

BENCH = Path(__file__).resolve().parents[2] / "bench"

# results/NAME.json -> the command line that renders it
RENDERERS = {
    "loaders": ["loader_bench.py"],
    "shuffle": ["shuffle_bench.py"],
    "shuffle_baseline": ["shuffle_bench.py", "--tag", "baseline"],
    "reshard": ["reshard_bench.py"],
    "reshard_memory": ["reshard_memory.py"],
    "ray_engine": ["ray_bench.py"],
    "s3_latency": ["s3_latency_bench.py"],
    "s3_loaders": ["s3_loader_bench.py"],
}


def _results_io():
    """bench/results_io.py under a private name (bench/ is no package; tests/ has a
    fault_proxy.py of its own, so bench/ is not put on sys.path here)."""
    spec = importlib.util.spec_from_file_location("bench_results_io", BENCH / "results_io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_recorded_results_render_to_the_recorded_markdown(tmp_path, name):
    recorded = BENCH / "results" / f"{name}.json"
    if not recorded.is_file():
        pytest.skip(f"no {recorded.name} recorded")
    shutil.copy(recorded, tmp_path)
    script, *extra = RENDERERS[name]
    done = subprocess.run(
        [sys.executable, BENCH / script, *extra, "--render-only", "--results-dir", tmp_path],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    md = (tmp_path / f"{name}.md").read_text()
    assert md.startswith("# ")
    committed = recorded.with_suffix(".md")
    if committed.is_file():  # the .md is what its .json renders to (rerun --render-only if not)
        assert md == committed.read_text()


def test_machine_readers_take_both_schemas():
    rio = _results_io()
    new = {"machine": describe(["webdataset"]),
           "dlpipe_measured": {"version": "9.9", "commit": "abc1234", "uncommitted": [" M dlpipe/x.py"]}}  # fmt: skip
    m = new["machine"]
    assert rio.versions_of(m)["webdataset"] == m["versions"]["webdataset"]
    assert set(rio.versions_of(m)) >= {"dlpipe", "numpy", "tensorflow", "torch"}
    assert rio.memory_gib(m) == f"{m['memory_bytes'] / 2**30:.1f}"
    assert rio.checkout_text(new) == "dlpipe 9.9 (commit abc1234, 1 uncommitted file(s) under dlpipe/)"

    old = {"machine": {"cpu_model": "X", "cpu_count": 2, "cpus_usable": 2, "memory_gib": 23.5,
                       "platform": "Linux", "python": "3.11", "numpy": "2.4", "tensorflow": None,
                       "dlpipe": "0.1.0", "dlpipe_path": "/x/dlpipe", "git_commit": "ced470d"}}  # fmt: skip
    assert rio.versions_of(old["machine"]) == {"numpy": "2.4", "tensorflow": None, "dlpipe": "0.1.0"}
    assert rio.memory_gib(old["machine"]) == "23.5"
    assert rio.checkout_text(old) == "dlpipe 0.1.0 (commit ced470d plus uncommitted work)"
