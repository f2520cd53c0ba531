"""``dlpipe bench``: measure TensorFlow and PyTorch input pipelines side by side.

For each framework, on one CPU process and on several (each pinned to its own CPU set, reading
its own share of the shards), and on every device: every stage timed alone (the constraint
ledger), the whole pipeline (samples/s), accelerator utilization with the model replaced by its
calibrated step time (MLPerf Storage's method), and the old padded-source input paths for
comparison. Each measurement runs in a fresh process (``dlpipe.benchmark.worker``), so the
frameworks never share one and CPU pinning happens before their thread pools start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

from dlpipe._deps import check_available, is_available
from dlpipe.benchmark.config import BenchConfig, FrameworkResult
from dlpipe.benchmark.ledger import Ledger
from dlpipe.benchmark.machine import cpu_sets, describe, measure_ceilings
from dlpipe.benchmark.modes import DEFAULT_MODE, PACKING_RULE, parse_modes, plan
from dlpipe.benchmark.report import render_report, write_plots
from dlpipe.benchmark.results import make_results, make_run, make_target, save
from dlpipe.benchmark.utilization import parse_model_spec, summarize_steps
from dlpipe.errors import ConfigError, DlpipeError, FormatError
from dlpipe.manifest import MANIFEST

FRAMEWORKS = ("tf", "torch")
_MODULES = {"tf": "tensorflow", "torch": "torch"}
JOB_TIMEOUT_S = 1800
EXTRA_MODE_REPEATS = 2  # repeats of the training rows of padding modes other than the default


def prepare_data(data: str | None, output: Path, *, records: int, say: Callable[[str], None]) -> tuple[str, str | None]:
    """(dlpipe dataset dir, padded source dir or None) for ``DATA``.

    None builds the DeepCAL-like corpus from real place names; a directory holding
    ``input_ids.npy`` and ``labels.npy`` is a padded source and is resharded first; a dlpipe
    dataset is used as it is (baselines then need ``--source``).
    """
    from dlpipe.reshard import reshard

    if data is None:
        from dlpipe.benchmark.corpus import build_corpus

        source = output / "corpus"
        say(f"building the DeepCAL-like corpus ({records:,} records) in {source}")
        build_corpus(source, num_records=records)
    elif os.path.isfile(os.path.join(data, MANIFEST)):
        return data, None
    elif os.path.isfile(os.path.join(data, "input_ids.npy")):
        source = Path(data)
    else:
        raise FormatError(data, "is neither a dlpipe dataset (dataset_info.json) nor a padded source "
                          "(input_ids.npy, labels.npy)", hint="run dlpipe reshard first, or omit DATA to "
                          "benchmark the built-in DeepCAL-like corpus")
    shards = output / "shards"
    specs = [f"input_ids={source / 'input_ids.npy'}"]
    if (source / "labels.npy").exists():
        specs.append(f"labels={source / 'labels.npy'}")
    summary = reshard(specs, shards, pad_id=0, num_shards=8, num_shards_multiple_of=4, progress=False)
    say(f"resharded: {summary}")
    return str(shards), str(source)


def _run_jobs(jobs: list[dict]) -> list[dict]:
    """Run worker processes concurrently; their JSON results in job order."""
    procs = []
    for job in jobs:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        if job.get("cuda_visible") is not None:
            env["CUDA_VISIBLE_DEVICES"] = job["cuda_visible"]
        p = subprocess.Popen([sys.executable, "-m", "dlpipe.benchmark.worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        p.stdin.write(json.dumps(job))
        p.stdin.close()
        procs.append(p)
    out = []
    for job, p in zip(jobs, procs):
        stdout = p.stdout.read()
        stderr = p.stderr.read()
        p.wait(timeout=JOB_TIMEOUT_S)
        try:
            result = json.loads(stdout)
        except ValueError:
            tail = stderr.strip().splitlines()[-1:] or ["no output"]
            raise DlpipeError(f"bench worker ({job['framework']}, phases {job['phases']}) died: {tail[0]}") from None
        if "error" in result:
            raise DlpipeError(f"bench worker ({job['framework']}): {result['error']}")
        out.append(result)
    return out


def _run_entry(framework: str, setting: str, parts: list[FrameworkResult], *, model: str,
               feed_steps_per_s: float | None = None) -> dict[str, Any]:
    """One results.json run from the per-process results of one setting (rates add up)."""
    first = parts[0]
    repeats = min(len(p.samples_per_s) for p in parts)
    samples = [sum(p.samples_per_s[i] for p in parts) for i in range(repeats)]
    tokens = [sum(p.tokens_per_s[i] for p in parts) for i in range(repeats)] if all(p.tokens_per_s for p in parts) else None
    ledger = Ledger.build(first.stages, median(first.samples_per_s)) if first.stages else None
    au = None
    if first.wait_s and first.compute_s and len(first.wait_s) > 1:
        au = summarize_steps(first.wait_s, first.compute_s, model=model, feed_steps_per_s=feed_steps_per_s)
    notes = list(first.notes)
    if len(parts) > 1:
        notes.append(f"{len(parts)} processes ran at once, each on its own CPU set and share of the shards; "
                     "samples/s add up, the ledger is rank 0's")
    return make_run(framework, setting, first.loader, samples, tokens_per_s=tokens, ledger=ledger, au=au,
                    notes=notes, padding=first.padding, token_efficiency=first.token_efficiency)


def run_bench(
    data: str | None = None,
    *,
    output: str | os.PathLike[str] = "bench-out",
    frameworks: Sequence[str] = FRAMEWORKS,
    cpu_procs: Sequence[int] = (1, 2),
    gpus: str = "all",
    batch_size: int = 256,
    steps: int = 100,
    repeats: int = 3,
    model: str = "deepcal",
    num_workers: int | str = "auto",
    records: int = 200_000,
    profile: bool = False,
    padding: str | Sequence[str] | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run the benchmark and write ``results.json``, ``report.md`` and plots to ``output``
    (the plots only where matplotlib, of the ``bench`` extra, is installed: a GPU box without it
    still gets its numbers, and ``say`` tells how to get the plots).

    ``padding``: the padding modes (``dlpipe.benchmark.modes``; None or "all": all four) whose
    training rows the 1-process setting of each framework measures, each with a stand-in step
    calibrated at that mode's batch shapes; modes other than the default take fewer repeats and
    steps (``_mode_run``), so the run costs about 1.3x one without them."""
    modes = parse_modes(padding)
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise ConfigError(f"framework {fw!r}; use tf and/or torch")
        check_available(_MODULES[fw], f"dlpipe bench --frameworks {fw}")  # fail early, naming pip
    if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
        raise ConfigError(f"num_workers={num_workers!r}; give auto or a count >= 0")
    if not cpu_procs or any(p < 1 for p in cpu_procs):
        raise ConfigError(f"cpu_procs={list(cpu_procs)}; give process counts >= 1, e.g. 1,2")
    spec = parse_model_spec(model)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, source = prepare_data(data, out, records=records, say=say)
    machine = describe()
    say("measuring the machine's ceilings")
    ceilings = measure_ceilings(data_dir)
    gpu_ids = _gpu_ids(gpus, machine)
    device = "cuda" if gpu_ids else "cpu"
    plans, skipped = {}, {}
    for mode in modes:
        try:
            plans[mode] = plan(mode, data_dir, batch_size).to_json()
        except ConfigError as e:
            skipped[mode] = str(e)
    modes = [m for m in modes if m in plans]

    runs, targets = [], []
    for fw in frameworks:
        base = BenchConfig(data=data_dir, source=source, batch_size=batch_size, steps=steps, repeats=repeats,
                           model="none", device=device, num_workers=num_workers,
                           profile_dir=str(out / "profile" / fw) if profile else None)
        if spec.kind == "sleep":
            base = replace(base, step_s=spec.sleep_ms / 1000)
        rates = {}
        for procs in cpu_procs:
            sets = cpu_sets(procs)
            lead_phases = ["dlpipe"]  # what rank 0 measures; the other ranks only "dlpipe"
            lead_job: dict[str, Any] = {}
            if procs == min(cpu_procs) and spec.kind != "none":
                lead_phases = (["calibrate"] if spec.kind == "deepcal" else []) + ["dlpipe"]
                lead_phases += ["calibrate-modes", "train-modes"] if modes else []
                lead_phases += ["baselines"] if source else []
                lead_job = {"modes": modes, "sleep_s": base.step_s if spec.kind == "sleep" else None,
                            "mode_runs": {m: _mode_run(base) for m in modes if m != DEFAULT_MODE}}
            jobs = [{"framework": fw, "cpus": sets[r], "cuda_visible": ",".join(map(str, gpu_ids[:1])) if gpu_ids else None,
                     "config": replace(base, world_size=procs, rank=r,
                                       profile_dir=base.profile_dir if procs == min(cpu_procs) and r == 0 else None).to_json(),
                     "phases": lead_phases if r == 0 else ["dlpipe"]} | (lead_job if r == 0 else {})
                    for r in range(procs)]  # fmt: skip
            say(f"{fw}: {procs} CPU process(es): {', '.join(lead_phases)}" + (f" (padding: {', '.join(modes)})"
                if "train-modes" in lead_phases else ""))  # fmt: skip
            results = _run_jobs(jobs)
            parts = [FrameworkResult.from_json(r["dlpipe"]) for r in results]
            setting = f"cpu-procs={procs}"
            entry = _run_entry(fw, setting, parts, model="none")
            runs.append(entry)
            rates[procs] = entry["samples_per_s"]["median"]
            lead = results[0]
            if "train-modes" in lead_phases:
                feed = entry["samples_per_s"]["median"] / batch_size
                for mode in modes:
                    if mode not in lead.get("train", {}):
                        skipped[f"{fw} {mode}"] = lead.get("mode_errors", {}).get(mode, "not measured")
                        continue
                    step_s = lead["mode_step_s"][mode]
                    label = f"train cpu-procs={procs}" + ("" if mode == DEFAULT_MODE else f" padding={mode}")
                    sleep_model = f"sleep:{step_s * 1000:.1f}"
                    run = _run_entry(fw, label, [FrameworkResult.from_json(lead["train"][mode])], model=sleep_model,
                                     feed_steps_per_s=feed if mode == DEFAULT_MODE else None)  # fmt: skip
                    runs.append(run)
                    if mode == DEFAULT_MODE and run["au"]:
                        targets.append(make_target(f"{fw}: AU with dlpipe at the DeepCAL step ({sleep_model} ms)",
                                                   run["au"]["au"], at_least=0.9))  # fmt: skip
            if "baselines" in lead_phases:
                step_s = lead.get("step_s") or base.step_s
                label = f"train cpu-procs={procs}"
                for b in lead.get("baselines", []):
                    runs.append(_run_entry(fw, label, [FrameworkResult.from_json(b)], model=f"sleep:{step_s * 1000:.1f}"))
        most = max(cpu_procs)
        if most > 1:
            # like with like: one process pinned to the CPU set each of the `most` processes got,
            # so the scaling target compares the same cores per process (a lone unpinned TF
            # process already spreads tf.data over every core)
            share = cpu_sets(most)[0]
            say(f"{fw}: 1 CPU process on one of the {most} CPU sets ({len(share)} CPU(s): {share})")
            job = {"framework": fw, "cpus": share, "cuda_visible": None, "phases": ["dlpipe"],
                   "config": replace(base, world_size=1, rank=0, profile_dir=None).to_json()}
            entry = _run_entry(fw, f"cpu-procs=1 cpus=1/{most}", [FrameworkResult.from_json(_run_jobs([job])[0]["dlpipe"])],
                               model="none")  # fmt: skip
            runs.append(entry)
            one_share = entry["samples_per_s"]["median"]
            targets.append(make_target(f"{fw}: dlpipe samples/s, {most} CPU processes / 1 process on one of their "
                                       f"CPU sets (cpu_sets: whole cores, NUMA nodes where there are enough)",
                                       rates[most] / one_share if one_share else None, at_least=1.6))  # fmt: skip
        n_dev = len(gpu_ids) if gpu_ids else 2
        say(f"{fw}: data-parallel over {n_dev} {'GPUs' if gpu_ids else 'CPU devices'}")
        dev_job = {"framework": fw, "cpus": None, "cuda_visible": ",".join(map(str, gpu_ids)) if gpu_ids else None,
                   "config": replace(base, devices=n_dev, profile_dir=None).to_json(), "phases": ["devices"]}
        dev = FrameworkResult.from_json(_run_jobs([dev_job])[0]["devices"])
        runs.append(_run_entry(fw, f"devices={n_dev}x{'gpu' if gpu_ids else 'cpu'}", [dev], model="none"))

    config = {"data": data_dir, "source": source, "frameworks": list(frameworks), "cpu_procs": list(cpu_procs),
              "gpus": gpu_ids, "batch_size": batch_size, "steps": steps, "repeats": repeats, "model": model,
              "num_workers": num_workers, "profile": profile, "padding": modes}
    padding_info = {"modes": modes, "plans": plans, "packing_rule": PACKING_RULE, "skipped": skipped}
    results = make_results(machine=machine, ceilings=ceilings, config=config, runs=runs, targets=targets,
                           shuffle=_shuffle_quality(data_dir, batch_size), padding=padding_info)
    best = next((p for p in results["parity"] if p.get("setting") == "best"), None)
    if best is not None:
        results["targets"].append(make_target("TF/PyTorch parity at the best setting of each", best["ratio"],
                                              at_least=0.8, at_most=1.25))
    write_outputs(results, out, say)
    return results


def write_outputs(results: dict[str, Any], out: Path, say: Callable[[str], None]) -> None:
    """``results.json``, ``report.md`` and, where matplotlib is installed, the plots into ``out``."""
    save(results, out)
    (out / "report.md").write_text(render_report(results))
    if is_available("matplotlib"):
        write_plots(results, out)
    else:
        say("plots skipped: matplotlib is not installed (pip install 'dlpipe[bench]'); results.json and "
            "report.md hold every figure")


def _mode_run(base: BenchConfig) -> dict[str, int]:
    """The size of a training row of a padding mode other than the default: at most
    ``EXTRA_MODE_REPEATS`` repeats of half the steps and warm-up (at least 10 and 2), so four
    modes cost about 1.3x the one row of a run without them (``fixed``'s wide step dominates)."""
    return {"repeats": min(base.repeats, EXTRA_MODE_REPEATS), "steps": max(10, base.steps // 2),
            "warmup": max(2, base.warmup // 2)}  # fmt: skip


def _shuffle_quality(data_dir: str, batch_size: int) -> dict[str, Any]:
    """The shuffled order the loaders train on, from the epoch plan both follow (seed 0, as the
    measurers use): how far it is from the file order."""
    import dlpipe
    from dlpipe.loaders.shuffle_quality import order_quality, plan_order

    ds = dlpipe.load_dataset(data_dir, "train").shuffle(seed=0)
    return {**order_quality(plan_order(ds, batch_size), ds.num_rows), "records": ds.num_rows,
            "block_records": ds.block_records, "buffer_size": ds.buffer_size, "batch_size": batch_size,
            "seed": 0}


def _gpu_ids(gpus: str, machine: dict) -> list[int]:
    found = list(range(len(machine.get("gpus") or [])))
    if gpus in ("all", ""):
        return found
    if gpus == "none":
        return []
    try:
        wanted = [int(g) for g in gpus.split(",")]
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r}; use all, none or a list like 0,1") from None
    missing = [g for g in wanted if g not in found]
    if missing:
        raise ConfigError(f"--gpus {gpus}: no GPU {missing} on this machine (found {len(found)})")
    return wanted
