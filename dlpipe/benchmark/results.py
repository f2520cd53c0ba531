"""``results.json``: the stable record of one ``dlpipe bench`` run, read by unattended jobs.

Every field is documented in ``docs/bench-results-schema.md``. ``make_results`` derives the
parity and speedup tables from the runs so that they cannot disagree with them; ``validate``
is a hand-written structural check (no jsonschema dependency) that names the bad key;
``save`` refuses to write what ``validate`` rejects, and ``load`` checks what it reads.
Bump ``SCHEMA_VERSION`` on any change a reader could trip over (a removed or retyped field).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dlpipe.benchmark.config import PARITY_RANGE
from dlpipe.benchmark.ledger import Ledger
from dlpipe.benchmark.utilization import AUSummary
from dlpipe.errors import ConfigError

__all__ = [
    "PARITY_RANGE",
    "RESULTS_FILENAME",
    "SCHEMA_VERSION",
    "load",
    "make_results",
    "make_run",
    "make_target",
    "save",
    "validate",
]

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"
FRAMEWORKS = ("tf", "torch")
OPTIMIZED_LOADER = "dlpipe"


def _stats(values: Sequence[float] | None, name: str) -> dict[str, Any] | None:
    if values is None:
        return None
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) and v >= 0 for v in vals):
        raise ConfigError(f"{name}={values!r} must be one or more finite numbers >= 0")
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "repeats": vals,
    }


def make_run(
    framework: str,
    setting: str,
    loader: str,
    samples_per_s: Sequence[float],
    *,
    tokens_per_s: Sequence[float] | None = None,
    ledger: Ledger | Mapping[str, Any] | None = None,
    au: AUSummary | Mapping[str, Any] | None = None,
    notes: Sequence[str] | str = (),
    padding: str | None = None,
    token_efficiency: float | None = None,
) -> dict[str, Any]:
    """One (framework, setting, loader) measurement; rates are one value per repeat.
    ``padding``: the padding mode of its batches (``dlpipe.benchmark.modes``);
    ``token_efficiency``: real tokens / computed tokens, counted on its batches."""
    if framework not in FRAMEWORKS:
        raise ConfigError(f"framework={framework!r} must be one of {FRAMEWORKS}")
    if not setting:
        raise ConfigError("setting must be non-empty, e.g. 'cpu-procs=1' or 'gpus=0,1'")
    if loader != OPTIMIZED_LOADER and not loader.startswith("baseline"):
        raise ConfigError(f"loader={loader!r} must be 'dlpipe' or start with 'baseline-'")
    return {
        "framework": framework,
        "setting": setting,
        "loader": loader,
        "samples_per_s": _stats(samples_per_s, "samples_per_s"),
        "tokens_per_s": _stats(tokens_per_s, "tokens_per_s"),
        "ledger": ledger.to_json() if isinstance(ledger, Ledger) else ledger,
        "au": au.to_json() if isinstance(au, AUSummary) else au,
        "notes": [notes] if isinstance(notes, str) else list(notes),
        "padding": padding,
        "token_efficiency": None if token_efficiency is None else float(token_efficiency),
    }


def make_target(
    name: str,
    value: float | None,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    unit: str = "",
) -> dict[str, Any]:
    """A PASS/FAIL line; ``pass`` is None when the value was not measured."""
    if at_least is None and at_most is None:
        raise ConfigError(f"target {name!r} needs at_least, at_most or both")
    parts = ([f">= {at_least:g}"] if at_least is not None else []) + (
        [f"<= {at_most:g}"] if at_most is not None else []
    )
    passed = None
    if value is not None:
        passed = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return {"name": name, "value": value, "goal": " and ".join(parts), "unit": unit, "pass": passed}


def _median(run: Mapping[str, Any]) -> float:
    return run["samples_per_s"]["median"]


def _parity(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """TF ÷ PyTorch samples/s for dlpipe's loaders: per shared setting, then each at its best."""
    # input-pipeline runs only: "train ..." runs stand each framework's own model step in, so
    # their samples/s compare the models, not the loaders
    mine = {
        (r["framework"], r["setting"]): r
        for r in runs
        if r["loader"] == OPTIMIZED_LOADER and not r["setting"].startswith("train")
    }
    settings = list(dict.fromkeys(s for _, s in mine))
    rows = []

    def row(setting: str, tf: Mapping[str, Any], torch: Mapping[str, Any]) -> dict[str, Any]:
        ratio = _median(tf) / _median(torch) if _median(torch) > 0 else None
        within = ratio is not None and PARITY_RANGE[0] <= ratio <= PARITY_RANGE[1]
        return {
            "setting": setting,
            "tf_setting": tf["setting"],
            "torch_setting": torch["setting"],
            "tf_samples_per_s": _median(tf),
            "torch_samples_per_s": _median(torch),
            "ratio": ratio,
            "within": within,
        }

    for s in settings:
        if ("tf", s) in mine and ("torch", s) in mine:
            rows.append(row(s, mine["tf", s], mine["torch", s]))
    best = {
        fw: max((r for (f, _), r in mine.items() if f == fw), key=_median, default=None)
        for fw in FRAMEWORKS
    }
    if best["tf"] is not None and best["torch"] is not None:
        rows.append(row("best", best["tf"], best["torch"]))
    return rows


def _speedups(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """dlpipe ÷ each baseline, same framework and setting (the same stand-in model step)."""
    mine = {(r["framework"], r["setting"]): r for r in runs if r["loader"] == OPTIMIZED_LOADER}
    rows = []
    for r in runs:
        opt = mine.get((r["framework"], r["setting"]))
        if r["loader"] == OPTIMIZED_LOADER or opt is None:
            continue
        rows.append(
            {
                "framework": r["framework"],
                "setting": r["setting"],
                "baseline": r["loader"],
                "optimized": OPTIMIZED_LOADER,
                "baseline_samples_per_s": _median(r),
                "optimized_samples_per_s": _median(opt),
                "speedup": _median(opt) / _median(r) if _median(r) > 0 else None,
            }
        )
    return rows


def _plain(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, paths and tuples turned into plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return _plain(obj.tolist())
    return obj


def make_results(
    *,
    machine: Mapping[str, Any],
    ceilings: Mapping[str, Any],
    config: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]] = (),
    created: str | None = None,
    shuffle: Mapping[str, Any] | None = None,
    padding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole ``results.json`` dict, parity and speedups derived from ``runs``; validated.

    numpy numbers and arrays, paths and tuples anywhere in the inputs become plain JSON types,
    so ``config`` can hold the parsed arguments as they are. ``padding`` (the modes measured,
    their plans, the packing rule, modes skipped) becomes ``padding_modes`` with its per-mode
    rows, fastest-mode lines and parity derived from the runs (``mode_summary``).
    """
    from dlpipe._version import __version__
    from dlpipe.benchmark.mode_summary import summarize_modes

    runs = _plain(runs)
    results = {
        "schema_version": SCHEMA_VERSION,
        "dlpipe_version": __version__,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _plain(machine),
        "ceilings": _plain(ceilings),
        "config": _plain(config),
        "runs": runs,
        "parity": _parity(runs),
        "speedups": _speedups(runs),
        "targets": _plain(targets),
    }
    if shuffle is not None:
        results["shuffle"] = _plain(shuffle)
    if padding is not None:
        results["padding_modes"] = summarize_modes(runs, _plain(padding))
    validate(results)
    return results


# --- validation -------------------------------------------------------------------------

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_OPT_BOOL = (bool, type(None))


def _check(obj: Any, key: str, types: tuple[type, ...] | type, path: str) -> Any:
    """obj[key], which must exist and be one of ``types`` (bool is not a number here)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path or 'results'}: expected an object, got {type(obj).__name__}")
    where = f"{path}.{key}" if path else key
    if key not in obj:
        raise ValueError(f"{where}: missing")
    value = obj[key]
    types = types if isinstance(types, tuple) else (types,)
    is_num_bool = isinstance(value, bool) and bool not in types
    if is_num_bool or not isinstance(value, types):
        names = "/".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"{where}: expected {names}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not valid JSON; use null")
    return value


def _check_fields(obj: Any, spec: Mapping[str, Any], path: str) -> None:
    for key, types in spec.items():
        _check(obj, key, types, path)


def _check_rate(obj: Any, key: str, path: str, *, optional: bool = False) -> None:
    value = _check(obj, key, (dict, type(None)) if optional else dict, path)
    if value is not None:
        where = f"{path}.{key}"
        _check_fields(value, {"median": _NUM, "min": _NUM, "max": _NUM, "repeats": list}, where)
        for i, v in enumerate(value["repeats"]):
            _check({"v": v}, "v", _NUM, f"{where}.repeats[{i}]")


_LEDGER_ROW = {
    "name": str, "items": int, "seconds": _NUM, "capacity": _NUM, "utilization": _NUM,
    "batches": int, "p50_latency_s": _OPT_NUM, "p95_latency_s": _OPT_NUM,
    "queue_depth": _OPT_NUM, "top_stall": _OPT_STR, "top_stall_count": int, "constraint": bool,
}  # fmt: skip
_AU = {
    "au": _NUM, "threshold": _NUM, "meets": bool, "steps": int, "skipped_steps": int,
    "compute_s": _NUM, "wait_s": _NUM, "wall_s": _NUM, "steps_per_s": _NUM, "model": str,
    "feed_steps_per_s": _OPT_NUM,
}  # fmt: skip
_PARITY = {
    "setting": str, "tf_setting": str, "torch_setting": str, "tf_samples_per_s": _NUM,
    "torch_samples_per_s": _NUM, "ratio": _OPT_NUM, "within": bool,
}  # fmt: skip
_SPEEDUP = {
    "framework": str, "setting": str, "baseline": str, "optimized": str,
    "baseline_samples_per_s": _NUM, "optimized_samples_per_s": _NUM, "speedup": _OPT_NUM,
}  # fmt: skip
_TARGET = {"name": str, "value": _OPT_NUM, "goal": str, "unit": str, "pass": _OPT_BOOL}


def _check_list(obj: Any, key: str, path: str, spec: Mapping[str, Any]) -> list:
    items = _check(obj, key, list, path)
    for i, item in enumerate(items):
        _check_fields(item, spec, f"{path + '.' if path else ''}{key}[{i}]")
    return items


def _check_ledger(ledger: dict, path: str) -> None:
    _check_fields(
        ledger,
        {"pipeline_items_per_s": _NUM, "constraint": str, "next_stage": _OPT_STR,
         "headroom": _OPT_NUM, "notes": list},
        path,
    )  # fmt: skip
    rows = _check_list(ledger, "rows", path, _LEDGER_ROW)
    if not rows:
        raise ValueError(f"{path}.rows: empty")
    if ledger["constraint"] not in {r["name"] for r in rows}:
        raise ValueError(f"{path}.constraint: {ledger['constraint']!r} is not a row")


def validate(results: Any) -> None:
    """Raise ValueError naming the first missing or ill-typed key (e.g. ``runs[2].loader``)."""
    _check_fields(
        results,
        {"schema_version": int, "dlpipe_version": str, "created": str, "machine": dict,
         "ceilings": dict, "config": dict},
        "",
    )  # fmt: skip
    if results["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"schema_version: {results['schema_version']} is not {SCHEMA_VERSION}, "
            "the version this dlpipe reads"
        )
    runs = _check_list(
        results, "runs", "", {"framework": str, "setting": str, "loader": str, "notes": list}
    )
    for i, run in enumerate(runs):
        path = f"runs[{i}]"
        if run["framework"] not in FRAMEWORKS:
            raise ValueError(f"{path}.framework: {run['framework']!r} is not one of {FRAMEWORKS}")
        _check_rate(run, "samples_per_s", path)
        _check_rate(run, "tokens_per_s", path, optional=True)
        if _check(run, "ledger", (dict, type(None)), path) is not None:
            _check_ledger(run["ledger"], f"{path}.ledger")
        if _check(run, "au", (dict, type(None)), path) is not None:
            _check_fields(run["au"], _AU, f"{path}.au")
        for key, types in (("padding", _OPT_STR), ("token_efficiency", _OPT_NUM)):  # optional
            if key in run:
                _check(run, key, types, path)
    _check_list(results, "parity", "", _PARITY)
    _check_list(results, "speedups", "", _SPEEDUP)
    _check_list(results, "targets", "", _TARGET)
    if "padding_modes" in results:
        from dlpipe.benchmark.mode_summary import validate_modes

        validate_modes(_check(results, "padding_modes", dict, ""), _check_list, _check_fields)


def save(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Validate and write ``out_dir/results.json`` atomically; returns its path."""
    validate(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILENAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``results.json`` (or the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILENAME
    results = json.loads(p.read_text())
    validate(results)
    return results
