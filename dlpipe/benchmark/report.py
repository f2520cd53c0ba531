"""``results.json`` for people: a markdown report and two plots.

Rendering reads only the results dict, so a report can be re-made from a saved file
(``render_report(load(path))``) on a machine without TensorFlow, PyTorch or a GPU.
matplotlib is imported inside ``write_plots`` only (it is a ``bench`` extra, not a core one),
and through ``matplotlib.figure.Figure``, never pyplot: PNGs render with Agg without changing
the process's global backend or keeping figures alive.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dlpipe._deps import require
from dlpipe._units import format_bytes
from dlpipe.benchmark.ledger import Ledger, format_rate
from dlpipe.benchmark.results import PARITY_RANGE

__all__ = ["render_report", "write_plots"]

HOW_TO_READ = """\
## How to read this

Each stage of a pipeline was timed alone; its **capacity** is the samples/s it sustains by
itself. The whole pipeline cannot run faster than its slowest stage, the **constraint**;
speeding up any other stage changes nothing until the constraint's **headroom** (how much
faster it must get before the next stage becomes the constraint) is used up.
**Utilization** is the pipeline's throughput ÷ a stage's capacity: 100% at the constraint of
a well-overlapped pipeline. A pipeline far below its constraint's capacity means the stages
get in each other's way (shared cores, the GIL, copies between them). **Queue depth** near
100% means the consumer of that queue is the slower side; near 0% the producer is. **AU**
(accelerator utilization) is the share of wall time a stand-in model (`sleep:MS`) spent
computing rather than waiting for data, first step excluded; ≥ 90% means the input is not
the bottleneck. **Parity** is TF ÷ PyTorch samples/s; 0.8–1.25 counts as parity.
"""


def _machine_lines(machine: Mapping[str, Any], ceilings: Mapping[str, Any]) -> list[str]:
    def get(key: str) -> Any:
        value = machine.get(key)
        return "?" if value is None else value

    gpus = machine.get("gpus") or []
    gpu_text = ", ".join(f"{g.get('name')} ({g.get('memory_mib')} MiB)" for g in gpus) or "none"
    mem = machine.get("memory_bytes")
    versions = machine.get("versions") or {}
    lines = [
        "## Machine",
        "",
        f"- CPU: {get('cpu_model')} — {get('cpus_usable')} usable of "
        f"{get('cpu_count')}, {get('sockets')} socket(s), "
        f"{get('numa_nodes')} NUMA node(s)",
        f"- memory: {format_bytes(mem) if mem else 'n/a'}; GPUs: {gpu_text}",
        "; ".join(
            [f"- Python {get('python')}"]
            + [", ".join(f"{k} {v}" for k, v in versions.items() if v)]
        ).rstrip("; "),
    ]
    ceiling_names = {
        "page_cache_read_bytes_per_s": "page-cache read",
        "memcpy_bytes_per_s": "memcpy",
        "crc32c_bytes_per_s": "CRC32C (1 core)",
    }
    got = [f"{label} {format_bytes(ceilings[k])}/s" for k, label in ceiling_names.items()
           if isinstance(ceilings.get(k), (int, float))]  # fmt: skip
    if got:
        lines.append("- ceilings: " + ", ".join(got))
    return lines


def _rate_cell(rate: Mapping[str, Any] | None) -> str:
    if not rate:
        return "n/a"
    return f"{format_rate(rate['median'])} ({format_rate(rate['min'])}–{format_rate(rate['max'])})"


def _au_line(au: Mapping[str, Any]) -> str:
    feed = au.get("feed_steps_per_s")
    feed_text = f"; it could feed up to {feed:.1f} steps/s" if feed else ""
    if au["model"] == "none":
        return f"model `none`: the input pipeline alone delivers {au['steps_per_s']:.1f} steps/s"
    verdict = (
        "the input pipeline keeps the model fed"
        if au["meets"]
        else "the model waits for data: the input pipeline is the bottleneck"
    )
    sign = "≥" if au["meets"] else "<"
    return (
        f"AU {au['au']:.0%} {sign} {au['threshold']:.0%} (model `{au['model']}`, "
        f"{au['steps']} steps after the first): {verdict}{feed_text}"
    )


def _run_title(run: Mapping[str, Any]) -> str:
    return f"{run['framework']} · {run['setting']} · {run['loader']}"


def render_report(results: Mapping[str, Any]) -> str:
    """The markdown report: machine, runs with their ledgers, parity, speedups, AU, targets."""
    out = [
        f"# dlpipe bench — {results['created']}",
        "",
        f"dlpipe {results['dlpipe_version']}, results schema {results['schema_version']}.",
        "",
        *_machine_lines(results["machine"], results["ceilings"]),
        "",
        "## Throughput",
        "",
        "| framework | setting | loader | samples/s median (min–max) | tokens/s median |",
        "|---|---|---|---:|---:|",
    ]
    for run in results["runs"]:
        tokens = run.get("tokens_per_s")
        out.append(
            f"| {run['framework']} | {run['setting']} | {run['loader']} "
            f"| {_rate_cell(run['samples_per_s'])} "
            f"| {format_rate(tokens['median']) if tokens else 'n/a'} |"
        )

    if results["parity"]:
        lo, hi = PARITY_RANGE
        out += ["", "## Parity (TF ÷ PyTorch, dlpipe loaders)", "",
                f"Parity means a ratio within {lo}–{hi}.", "",
                "| setting | TF samples/s | PyTorch samples/s | ratio | parity |",
                "|---|---:|---:|---:|---|"]  # fmt: skip
        for p in results["parity"]:
            setting = p["setting"]
            if setting == "best":
                setting = f"best of each (TF {p['tf_setting']}, PyTorch {p['torch_setting']})"
            ratio = "n/a" if p["ratio"] is None else f"{p['ratio']:.2f}"
            out.append(
                f"| {setting} | {format_rate(p['tf_samples_per_s'])} "
                f"| {format_rate(p['torch_samples_per_s'])} | {ratio} "
                f"| {'yes' if p['within'] else 'NO'} |"
            )

    if results["parity"] and results["config"].get("num_workers") == "auto":
        out += ["", "PyTorch's DataLoader had `num_workers=auto`: one worker per CPU of a process's share "
                "when it has two or more, the CPUs a tf.data pipeline spreads its parse over; none on a "
                "single CPU, where a worker would only add a hand-off to the main process."]  # fmt: skip
    out += _scaling_lines(results["runs"])

    if results.get("padding_modes"):
        from dlpipe.benchmark.mode_summary import render_modes

        out += render_modes(results["padding_modes"])

    shuffle = results.get("shuffle")
    if shuffle:
        out += ["", "## Shuffle quality", "",
                f"The shuffled order both loaders train on (seed {shuffle['seed']}; the same epoch plan in "
                "TF and PyTorch), against the file order: rank correlation "
                f"{shuffle['rank_correlation']:+.3f} (1 = file order, ~0 = mixed), mean displacement "
                f"{shuffle['mean_displacement']:.3f} of the split (~0.333 for a uniform shuffle), every record "
                f"{'once' if shuffle['exactly_once'] else 'NOT exactly once'}; blocks of "
                f"{shuffle['block_records'] or 'whole shards'} records permuted across "
                f"{shuffle['records']:,} records, then a {shuffle['buffer_size']}-record buffer."]  # fmt: skip

    if results["speedups"]:
        out += ["", "## Baseline vs optimized", "",
                "| framework | setting | baseline | baseline samples/s | dlpipe samples/s | speedup |",
                "|---|---|---|---:|---:|---:|"]  # fmt: skip
        for s in results["speedups"]:
            speedup = "n/a" if s["speedup"] is None else f"{s['speedup']:.2f}x"
            out.append(
                f"| {s['framework']} | {s['setting']} | {s['baseline']} "
                f"| {format_rate(s['baseline_samples_per_s'])} "
                f"| {format_rate(s['optimized_samples_per_s'])} | {speedup} |"
            )

    staged = [r for r in results["runs"] if r.get("ledger") or r.get("au")]
    if staged:
        out += ["", "## Stage ledgers"]
    for run in staged:
        out += ["", f"### {_run_title(run)}", ""]
        if run.get("ledger"):
            ledger = Ledger.from_json(run["ledger"])
            summary = ledger.summary()
            out += [summary[0].upper() + summary[1:] + ".", "", ledger.render_markdown().rstrip()]
        if run.get("au"):
            out += ["", _au_line(run["au"]) + "."]
        out += [f"- note: {n}" for n in run.get("notes", [])]

    if results["targets"]:
        out += ["", "## Targets", "", "| target | value | goal | result |", "|---|---:|---|---|"]
        for t in results["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.4g} {t['unit']}".rstrip()
            verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]
            goal = f"{t['goal']} {t['unit']}".rstrip()
            out.append(f"| {t['name']} | {value} | {goal} | {verdict} |")

    out += ["", HOW_TO_READ]
    return "\n".join(out).rstrip() + "\n"


def _scaling_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """2 CPU processes ÷ 1, per framework: against one process pinned to one of the two CPU sets
    (the target: the same cores per process) and, for information, one process on all CPUs."""
    rate = {(r["framework"], r["setting"]): r["samples_per_s"]["median"] for r in runs
            if r["loader"] == "dlpipe" and r["samples_per_s"]}  # fmt: skip
    rows = []
    for fw in dict.fromkeys(r["framework"] for r in runs):
        two, pinned, whole = (rate.get((fw, s)) for s in ("cpu-procs=2", "cpu-procs=1 cpus=1/2", "cpu-procs=1"))
        if two and (pinned or whole):
            ratio = [f"{two / one:.2f}" if one else "n/a" for one in (pinned, whole)]
            rows.append(f"| {fw} | {format_rate(two)} | {ratio[0]} | {ratio[1]} |")
    if not rows:
        return []
    return ["", "## Scaling (2 CPU processes ÷ 1)", "",
            "Each of the 2 processes is pinned to its own CPU set. The target (>= 1.6) divides by one "
            "process pinned to one of those sets: the same cores per process. Divided by one process "
            "on all CPUs it says less: a lone process already spreads its pipeline over every CPU "
            "(tf.data's parallel map, PyTorch's workers), so 2 processes add no cores.", "",
            "| framework | 2 processes samples/s | ÷ 1 process on one set | ÷ 1 process on all CPUs |",
            "|---|---:|---:|---:|", *rows]  # fmt: skip


def _label(run: Mapping[str, Any]) -> str:
    return f"{run['framework']} {run['loader']}"


_FRAMEWORK_COLORS = {"tf": "tab:orange", "torch": "tab:blue"}


def _plot_throughput(results: Mapping[str, Any], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    runs = results["runs"]
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    series = list(dict.fromkeys(_label(r) for r in runs))
    by = {(r["setting"], _label(r)): r["samples_per_s"] for r in runs}
    width = 0.8 / max(len(series), 1)
    fig = Figure(figsize=(max(6.0, 1.6 * len(settings) * max(len(series), 2) / 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(settings))
    for j, name in enumerate(series):
        rates = [by.get((s, name)) for s in settings]
        med = np.array([r["median"] if r else np.nan for r in rates])
        err = np.array([[r["median"] - r["min"], r["max"] - r["median"]] if r else [0, 0]
                        for r in rates]).T  # fmt: skip
        pos = x - 0.4 + width * (j + 0.5)
        fw, _, loader = name.partition(" ")
        baseline = loader != "dlpipe"  # same colour per framework; baselines pale and hatched
        bars = ax.bar(pos, med, width, yerr=err, capsize=3, label=name,
                      color=_FRAMEWORK_COLORS.get(fw, "tab:gray"), alpha=0.45 if baseline else 1.0,
                      hatch="//" if baseline else None, edgecolor="black", linewidth=0.5)  # fmt: skip
        labels = [format_rate(m) if np.isfinite(m) else "" for m in med]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
    ax.set_xticks(x, settings)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_rate(v)))
    ax.set_ylabel("samples/s (median; bars: min–max)")
    ax.set_title("Input pipeline throughput by configuration")
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_ledgers(runs: list[Mapping[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    ledgers = [(run, Ledger.from_json(run["ledger"])) for run in runs]
    heights = [0.45 * len(ledger.rows) + 1.0 for _, ledger in ledgers]
    fig = Figure(figsize=(8, sum(heights)))
    axes = fig.subplots(
        len(ledgers), 1, squeeze=False, sharex=True, gridspec_kw={"height_ratios": heights}
    )
    values = [r.capacity for _, ledger in ledgers for r in ledger.rows]
    values += [ledger.pipeline_items_per_s for _, ledger in ledgers if ledger.pipeline_items_per_s]
    log = max(values) / max(min(values), 1e-12) > 30
    # one scale for every run so they compare; on a log axis bars start just below the smallest
    lo, hi = (min(values) / 2, max(values) * 4) if log else (0.0, max(values) * 1.2)
    for ax, (run, ledger) in zip(axes[:, 0], ledgers):
        names = [r.name for r in ledger.rows][::-1]  # pipeline order top to bottom
        caps = [r.capacity for r in ledger.rows][::-1]
        colors = ["tab:red" if r.constraint else "tab:blue" for r in ledger.rows][::-1]
        bars = ax.barh(names, caps, color=colors)
        ax.bar_label(bars, labels=[format_rate(c) for c in caps], padding=3, fontsize=8)
        ax.axvline(ledger.pipeline_items_per_s, color="black", linestyle="--", linewidth=1.2)
        ax.set_title(
            f"{_run_title(run)} — constraint: {ledger.constraint}; "
            f"pipeline (dashed): {format_rate(ledger.pipeline_items_per_s)} samples/s",
            fontsize=10,
        )
        if log:
            ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_rate(v)))
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("capacity alone, samples/s (red: the constraint)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_plots(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG plots of the results into ``out_dir``; returns their paths (none if nothing to plot).

    ``throughput.png``: samples/s per setting, a bar per framework and loader, min–max error
    bars. ``ledger.png``: each run's stage capacities, the constraint in red, the pipeline's
    throughput as a dashed line.
    """
    require("matplotlib", "dlpipe bench plots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if results["runs"]:
        written.append(out / "throughput.png")
        _plot_throughput(results, written[-1])
    staged = [r for r in results["runs"] if r.get("ledger")]
    if staged:
        written.append(out / "ledger.png")
        _plot_ledgers(staged, written[-1])
    return written
