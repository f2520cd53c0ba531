"""``results.json``'s ``padding_modes``: the training rows per padding mode side by side, which
mode is fastest and why (a sentence made from the numbers), and TF/PyTorch parity per mode.

Derived from the runs by ``make_results`` (so it cannot disagree with them): a training row of
a mode is a dlpipe run whose setting starts with ``train`` and whose ``padding`` is set.
``render_modes`` gives the report's section; ``validate_modes`` checks the structure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dlpipe.benchmark.config import PARITY_RANGE
from dlpipe.benchmark.ledger import format_rate
from dlpipe.benchmark.utilization import parse_model_spec

__all__ = ["render_modes", "summarize_modes", "validate_modes"]

_NUM, _OPT_NUM, _OPT_STR = (int, float), (int, float, type(None)), (str, type(None))
_ROW = {"framework": str, "padding": str, "setting": str, "samples_per_s": _NUM, "tokens_per_s": _OPT_NUM,
        "token_efficiency": _OPT_NUM, "computed_tokens_per_sample": _OPT_NUM, "constraint": _OPT_STR,
        "step_capacity": _OPT_NUM, "step_s": _OPT_NUM}  # fmt: skip
_FASTEST = {"framework": str, "padding": str, "samples_per_s": _NUM, "line": str}
_PARITY = {"padding": str, "tf_samples_per_s": _NUM, "torch_samples_per_s": _NUM, "ratio": _OPT_NUM,
           "within": bool}  # fmt: skip


def _row(run: Mapping[str, Any]) -> dict[str, Any]:
    ledger, au = run.get("ledger") or {}, run.get("au") or {}
    step = next((r for r in ledger.get("rows", []) if r["name"] == "step"), None)
    sps = run["samples_per_s"]["median"]
    tps = (run.get("tokens_per_s") or {}).get("median")
    eff = run.get("token_efficiency")
    per_sample = tps / sps / eff if tps and sps and eff else None
    spec = parse_model_spec(au["model"]) if au.get("model") else None
    return {"framework": run["framework"], "padding": run["padding"], "setting": run["setting"],
            "samples_per_s": sps, "tokens_per_s": tps, "token_efficiency": eff,
            "computed_tokens_per_sample": per_sample, "constraint": ledger.get("constraint"),
            "step_capacity": step["capacity"] if step else None,
            "step_s": spec.sleep_ms / 1000 if spec is not None and spec.kind == "sleep" else None}  # fmt: skip


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _tokens(row: Mapping[str, Any]) -> str:
    eff, per = row["token_efficiency"], row["computed_tokens_per_sample"]
    return f"{_pct(eff)} real tokens" + (f", {per:.1f} computed per sample" if per else "")


def fastest_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """One framework's modes: which is fastest, by how much, and why (from the numbers)."""
    ranked = sorted(rows, key=lambda r: -r["samples_per_s"])
    best, fw = ranked[0], ranked[0]["framework"]
    text = f"{fw}: `{best['padding']}` is fastest at {format_rate(best['samples_per_s'])} samples/s"
    if len(ranked) == 1:
        return text + " (the only mode measured)."
    worst = ranked[-1]
    ratio = best["samples_per_s"] / worst["samples_per_s"] if worst["samples_per_s"] > 0 else None
    text += f", {ratio:.2f}x `{worst['padding']}` (the slowest)" if ratio else ""
    bound = [r["padding"] for r in ranked if r["constraint"] == "step"]
    if best["constraint"] == "step":
        where = "every mode" if len(bound) == len(ranked) else f"{len(bound)} of {len(ranked)} modes"
        text += (f". Why: the constraint is the model's `step` in {where}, so samples/s follow what a step "
                 f"computes: `{best['padding']}`'s batches are {_tokens(best)}, against "
                 f"{_tokens(worst)} for `{worst['padding']}`")  # fmt: skip
        if best["step_capacity"] and worst["step_capacity"]:
            text += (f"; the step alone runs {format_rate(best['step_capacity'])} against "
                     f"{format_rate(worst['step_capacity'])} samples/s")  # fmt: skip
    else:
        text += (f". Why: its constraint is `{best['constraint']}`, not the step; its batches are "
                 f"{_tokens(best)}")  # fmt: skip
    if len(ranked) > 2:
        second = ranked[1]
        text += (f". Next: `{second['padding']}` at {format_rate(second['samples_per_s'])} samples/s "
                 f"({_tokens(second)}; constraint `{second['constraint']}`")  # fmt: skip
        if second["step_capacity"]:
            text += f", its step alone {format_rate(second['step_capacity'])} samples/s"
        leaner_but_slower = (second["token_efficiency"] or 0) > (best["token_efficiency"] or 0) and (
            second["step_capacity"] or 0) < (best["step_capacity"] or 0)
        text += ": fewer wasted tokens, yet a slower step per sample)" if leaner_but_slower else ")"
    leaner = max(ranked, key=lambda r: r["token_efficiency"] or 0)
    if leaner not in (best, ranked[1]) and (leaner["token_efficiency"] or 0) > (best["token_efficiency"] or 0):
        text += (f". `{leaner['padding']}` computes the fewest wasted tokens ({_tokens(leaner)}) but reaches "
                 f"{format_rate(leaner['samples_per_s'])} samples/s: its constraint is `{leaner['constraint']}`")  # fmt: skip
        if leaner["step_capacity"]:
            text += f", its step alone {format_rate(leaner['step_capacity'])} samples/s"
    return text + "."


def summarize_modes(runs: Sequence[Mapping[str, Any]], padding: Mapping[str, Any]) -> dict[str, Any]:
    """``padding`` (``modes``, ``plans``, ``packing_rule``, ``skipped``) plus ``rows``,
    ``fastest`` and ``parity`` from the training rows of ``runs``."""
    rows = [_row(r) for r in runs if r["loader"] == "dlpipe" and r["setting"].startswith("train")
            and r.get("padding")]  # fmt: skip
    fastest = []
    for fw in dict.fromkeys(r["framework"] for r in rows):
        mine = [r for r in rows if r["framework"] == fw]
        best = max(mine, key=lambda r: r["samples_per_s"])
        fastest.append({"framework": fw, "padding": best["padding"], "samples_per_s": best["samples_per_s"],
                        "line": fastest_line(mine)})  # fmt: skip
    by = {(r["framework"], r["padding"]): r for r in rows}
    parity = []
    for mode in dict.fromkeys(r["padding"] for r in rows):
        tf, torch = by.get(("tf", mode)), by.get(("torch", mode))
        if tf and torch:
            ratio = tf["samples_per_s"] / torch["samples_per_s"] if torch["samples_per_s"] > 0 else None
            parity.append({"padding": mode, "tf_samples_per_s": tf["samples_per_s"],
                           "torch_samples_per_s": torch["samples_per_s"], "ratio": ratio,
                           "within": ratio is not None and PARITY_RANGE[0] <= ratio <= PARITY_RANGE[1]})  # fmt: skip
    return {"modes": list(padding.get("modes", [])), "plans": dict(padding.get("plans", {})),
            "packing_rule": padding.get("packing_rule", ""), "skipped": dict(padding.get("skipped", {})),
            "rows": rows, "fastest": fastest, "parity": parity}  # fmt: skip


def validate_modes(obj: dict, check_list: Callable, check_fields: Callable) -> None:
    """Check ``padding_modes`` with ``results``' own helpers (errors name the key)."""
    path = "padding_modes"
    check_fields(obj, {"modes": list, "plans": dict, "packing_rule": str, "skipped": dict}, path)
    check_list(obj, "rows", path, _ROW)
    check_list(obj, "fastest", path, _FASTEST)
    check_list(obj, "parity", path, _PARITY)


def render_modes(summary: Mapping[str, Any]) -> list[str]:
    """The report's "Padding modes" section."""
    out = ["", "## Padding modes", "",
           "The training row (the model's step stood in by a sleep calibrated at each mode's own batch "
           "shapes; the modes' calibrations take turns, twice, and each keeps its faster) per padding mode. Real-token efficiency = real tokens ÷ the tokens of the batches "
           "(rows × width), counted on the timed batches.", ""]  # fmt: skip
    plans = summary.get("plans") or {}
    out += [f"- `{m}`: {plans[m]['text']}" for m in summary["modes"] if m in plans and plans[m].get("text")]
    if summary.get("packing_rule"):
        out.append(f"- rule: {summary['packing_rule']}")
    out += ["", "| framework | padding | samples/s | real tokens/s | real-token efficiency | constraint | step stand-in |",
            "|---|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in summary["rows"]:
        step = "n/a" if r["step_s"] is None else f"{r['step_s'] * 1e3:.1f} ms"
        out.append(f"| {r['framework']} | {r['padding']} | {format_rate(r['samples_per_s'])} "
                   f"| {format_rate(r['tokens_per_s'])} | {_pct(r['token_efficiency'])} "
                   f"| {r['constraint'] or 'n/a'} | {step} |")  # fmt: skip
    out += [""] + [f"**Fastest** — {f['line']}" for f in summary["fastest"]]
    if summary["parity"]:
        lo, hi = PARITY_RANGE
        out += ["", f"TF ÷ PyTorch samples/s per mode (parity: {lo}–{hi}):", "",
                "| padding | TF samples/s | PyTorch samples/s | ratio | parity |", "|---|---:|---:|---:|---|"]  # fmt: skip
        for p in summary["parity"]:
            ratio = "n/a" if p["ratio"] is None else f"{p['ratio']:.2f}"
            out.append(f"| {p['padding']} | {format_rate(p['tf_samples_per_s'])} "
                       f"| {format_rate(p['torch_samples_per_s'])} | {ratio} | {'yes' if p['within'] else 'NO'} |")  # fmt: skip
    if summary.get("skipped"):
        out += [""] + [f"- not measured: {k}: {why}" for k, why in summary["skipped"].items()]
    return out
