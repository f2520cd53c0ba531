"""Recorded results: every benchmark writes ``results/NAME.json`` (what was measured, and on
what machine) and ``results/NAME.md`` rendered from it; ``--render-only`` re-renders the .md.

``result["machine"]`` is ``dlpipe.benchmark.machine.describe()``, the schema ``dlpipe bench``
writes too (``memory_bytes``, package versions under ``versions``); ``result["dlpipe_measured"]``
says which dlpipe code ran (``dlpipe_checkout``). The readers below (``versions_of``,
``memory_gib``, ``checkout_text``) also accept the flat machine dicts of results recorded
before (``memory_gib``, versions and ``git_commit`` as top-level keys), so old files still
render.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def record(results_dir: Path, name: str, run: Callable[[], dict[str, Any]],
           render: Callable[[dict[str, Any]], str], *, render_only: bool = False) -> int:
    """Run (or, with ``render_only``, reload) the results, write both files, print the .md."""
    json_path = results_dir / f"{name}.json"
    if render_only:
        result = json.loads(json_path.read_text())
    else:
        result = run()
        results_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    json_path.with_suffix(".md").write_text(md)
    print(md)
    return 0


# --- writing -----------------------------------------------------------------------------------


def _git(path: Path, *cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), *cmd], capture_output=True, text=True,
                             check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def dlpipe_checkout() -> dict[str, Any]:
    """Which dlpipe ran: the imported package's version, path, commit and uncommitted files
    under ``dlpipe/`` (commit and files None/[] outside a git checkout)."""
    import dlpipe

    pkg = Path(dlpipe.__path__[0]).resolve()
    root = pkg.parent
    status = _git(root, "status", "--short", "--", "dlpipe/")
    return {
        "version": getattr(dlpipe, "__version__", None),
        "path": str(pkg),
        "commit": _git(root, "rev-parse", "--short", "HEAD"),
        "commit_subject": _git(root, "log", "-1", "--format=%s"),
        "uncommitted": status.splitlines() if status else [],
    }


# --- reading -----------------------------------------------------------------------------------

# the non-version keys of the flat machine dicts recorded before ``describe()`` was used
_OLD_MACHINE_KEYS = {"cpu_model", "cpu_count", "cpus_usable", "memory_gib", "platform", "python",
                     "dlpipe_path", "git_commit"}  # fmt: skip


def versions_of(machine: Mapping[str, Any]) -> dict[str, Any]:
    """Package -> version as recorded (``machine["versions"]``; old files: the flat keys)."""
    if "versions" in machine:
        return dict(machine["versions"])
    return {k: v for k, v in machine.items() if k not in _OLD_MACHINE_KEYS}


def memory_gib(machine: Mapping[str, Any]) -> str:
    """Total memory in GiB, one decimal, or "?"."""
    if machine.get("memory_bytes"):
        return f"{machine['memory_bytes'] / 2**30:.1f}"
    return str(machine.get("memory_gib", "?"))


def checkout_text(result: Mapping[str, Any]) -> str:
    """``dlpipe V (commit C[, N uncommitted file(s) under dlpipe/])`` for a report."""
    if "dlpipe_measured" not in result:  # recorded before: the commit, uncommitted files unknown
        m = result["machine"]
        return f"dlpipe {m.get('dlpipe')} (commit {m.get('git_commit')} plus uncommitted work)"
    measured = result["dlpipe_measured"]
    dirty = measured.get("uncommitted") or []
    extra = f", {len(dirty)} uncommitted file(s) under dlpipe/" if dirty else ""
    return f"dlpipe {measured.get('version')} (commit {measured.get('commit')}{extra})"


def provenance(result: Mapping[str, Any]) -> str:
    """The line under a report's title: when, on what machine, by which command."""
    m = result["machine"]
    return (f"{result['created']} · {m.get('cpu_model') or 'CPU'} · {m.get('cpus_usable', '?')} usable CPUs · "
            f"`{result['command']}`")
