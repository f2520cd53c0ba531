"""Recorded results: every benchmark writes ``results/NAME.json`` (what was measured, and on
what machine) and ``results/NAME.md`` rendered from it; ``--render-only`` re-renders the .md."""

from __future__ import annotations

import json
from collections.abc import Callable
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


def provenance(result: dict[str, Any]) -> str:
    """The line under a report's title: when, on what machine, by which command."""
    m = result["machine"]
    return (f"{result['created']} · {m.get('cpu_model') or 'CPU'} · {m.get('cpus_usable', '?')} usable CPUs · "
            f"`{result['command']}`")
