import subprocess
import sys

import dlpipe


def test_import_dlpipe_loads_no_framework():
    code = "import sys, dlpipe, dlpipe.cli; print(' '.join(m for m in ('tensorflow', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_are_exported():
    public = {name for name in vars(dlpipe) if not name.startswith("_") and name not in {"annotations"}}
    modules = {name for name in public if type(getattr(dlpipe, name)).__name__ == "module"}
    assert public - modules == set(dlpipe.__all__) - {"__version__"}


def test_missing_extra_names_pip_command(monkeypatch):
    import importlib.util

    from dlpipe import _deps

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    try:
        _deps.require("tensorflow", "to_tf_dataset")
    except dlpipe.MissingDependencyError as e:
        assert "pip install 'dlpipe[tf]'" in str(e)
    else:
        raise AssertionError("expected MissingDependencyError")
