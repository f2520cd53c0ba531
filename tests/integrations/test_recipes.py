"""Every recipe of ``examples/integrations.md`` runs as written: each ``<!-- recipe: NAME [VAR=value]
-->`` python block, in a process of its own (with those environment variables), in a folder where
``shards/`` is the integration corpus."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOC = ROOT / "examples" / "integrations.md"
NEEDS = {  # recipe -> modules it imports
    "transformers": ("torch", "transformers", "accelerate"),
    "lightning": ("torch", "lightning"),
    "keras-tensorflow": ("keras", "tensorflow"),
    "keras-torch": ("keras", "torch"),
    "dali": ("nvidia.dali",),
}
_RECIPE = re.compile(r"<!-- recipe: (\S+)((?: \w+=\S+)*) -->\n```python\n(.*?)```", re.S)


def recipes() -> dict[str, tuple[dict[str, str], str]]:
    found = {}
    for name, env, code in _RECIPE.findall(DOC.read_text()):
        found[name] = (dict(kv.split("=", 1) for kv in env.split()), code)
    return found


def test_every_recipe_is_tested():
    assert sorted(recipes()) == sorted(NEEDS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_recipe_runs(name, corpus, tmp_path):
    missing = [m for m in NEEDS[name] if not _installed(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    env_vars, code = recipes()[name]
    (tmp_path / "shards").symlink_to(corpus)
    (tmp_path / "recipe.py").write_text(code)
    env = {**os.environ, **env_vars, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "recipe.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
