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


def _module_imports() -> dict[str, set[str]]:
    """dlpipe module -> the dlpipe modules it imports (anywhere in it, lazily too; imports under
    ``if TYPE_CHECKING:`` are annotations only and do not count)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "dlpipe").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = set()
        for target in found:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target not in (name, "dlpipe"):  # the package root re-exports everything
                graph[name].add(target)
    return graph


def test_no_import_circles():
    """A circle is two modules that should be three (STYLE.md): none in dlpipe/."""
    graph = _module_imports()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
