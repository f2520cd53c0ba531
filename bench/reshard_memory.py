"""Peak memory of ``dlpipe reshard``: bounded, whatever the input size.

Builds a multi-GB padded corpus with ``corpus.py`` (default 4M records, about 4.1 GB) and a
small one (200k records), runs ``dlpipe reshard`` on each as a subprocess, and samples every
0.1 s the anonymous resident memory (``RssAnon`` in ``/proc/PID/status``) of the main
process and of every child. RssAnon leaves out the page cache and the memory-mapped input
pages, which the kernel can drop at will; it is the memory a reshard really holds.

Results go to ``bench/results/reshard_memory.json`` and ``reshard_memory.md``. Target: every
process stays under 1 GiB RssAnon. The big corpus is deleted afterwards unless ``--keep``.

    python bench/reshard_memory.py [--records 4000000] [--small-records 200000] [--keep]

Linux only (``/proc``). A child that lives less than one sampling interval can be missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from results_io import dlpipe_checkout, memory_gib, record

from dlpipe.benchmark.corpus import SEQ_LEN, build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"
LIMIT_BYTES = 1 << 30
RECORD_BYTES = SEQ_LEN * 8 + 2 * 4  # int64 ids + float32 labels
_STATUS_FIELDS = ("RssAnon", "RssFile", "VmHWM")


def read_status(pid: int) -> dict[str, int] | None:
    """RssAnon, RssFile and VmHWM of ``pid`` in bytes, or None once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _STATUS_FIELDS:
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values if "RssAnon" in values else None


def dlpipe_command() -> list[str]:
    """The installed ``dlpipe`` script beside this Python, else ``python -m dlpipe``."""
    script = Path(sys.executable).parent / "dlpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dlpipe"]


def run_sampled(cmd: list[str], interval: float = 0.1) -> dict[str, Any]:
    """Run ``cmd`` and sample the memory of it and all its descendants until it exits."""
    peaks: dict[int, dict[str, Any]] = {}
    peak_total_anon = 0
    samples = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total_anon = 0
            for p in family:
                status = read_status(p.pid)
                if status is None:
                    continue
                total_anon += status["RssAnon"]
                entry = peaks.get(p.pid)
                if entry is None:
                    entry = peaks[p.pid] = {
                        "pid": p.pid,
                        "role": "main" if p.pid == proc.pid else "child",
                        "cmdline": _short_cmdline(p),
                        "samples": 0,
                        **{f"max_{k}": 0 for k in _STATUS_FIELDS},
                    }
                entry["samples"] += 1
                for k in _STATUS_FIELDS:
                    entry[f"max_{k}"] = max(entry[f"max_{k}"], status.get(k, 0))
            peak_total_anon = max(peak_total_anon, total_anon)
            samples += 1
            time.sleep(interval)
    finally:
        stdout, stderr = proc.communicate()
    return {
        "command": cmd,
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 2),
        "samples": samples,
        "peak_total_rss_anon": peak_total_anon,
        "processes": sorted(peaks.values(), key=lambda e: (e["role"] != "main", e["pid"])),
        "stdout_tail": stdout[-2000:],
        "stderr_tail": stderr[-2000:],
    }


def _short_cmdline(p: psutil.Process) -> str:
    try:
        args = p.cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(args))
    return text if len(text) <= 120 else text[:117] + "..."


def measure(
    corpus_dir: Path, out_dir: Path, workers: int, num_records: int, seed: int
) -> dict[str, Any]:
    """Build (or reuse) a corpus, reshard it to TFRecord while sampling memory."""
    corpus = build_corpus(corpus_dir, num_records, seed)
    how = "reused" if corpus["reused"] else f"built in {corpus['build_seconds']} s"
    print(f"corpus {num_records:,} records, {corpus['bytes'] / 1e9:.2f} GB, {how}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        *dlpipe_command(), "reshard",
        f"input_ids={corpus_dir / 'input_ids.npy'}", f"labels={corpus_dir / 'labels.npy'}",
        "--output", str(out_dir), "--format", "tfrecord", "--pad-id", "0",
        "--workers", str(workers), "--overwrite",
    ]  # fmt: skip
    run = run_sampled(cmd)
    output_bytes = (
        sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()) if out_dir.exists() else 0
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    max_anon = max((p["max_RssAnon"] for p in run["processes"]), default=0)
    print(
        f"  rc={run['returncode']} {run['seconds']} s, {len(run['processes'])} processes, "
        f"max RssAnon {max_anon / 2**20:.0f} MiB",
        flush=True,
    )
    if run["returncode"] != 0:
        print(run["stderr_tail"], file=sys.stderr)
    return {
        "num_records": num_records,
        "input_bytes": corpus["bytes"],
        "output_bytes": output_bytes,
        "max_rss_anon": max_anon,
        **run,
    }


def check_disk(cache_dir: Path, num_records: int) -> None:
    """Refuse to start when the corpus plus its output would not fit with 2 GB to spare."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    need = num_records * RECORD_BYTES * 1.25 + 2e9  # corpus + output (well under 25%) + slack
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        raise SystemExit(
            f"not enough disk in {cache_dir}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB "
            f"needed for {num_records:,} records; pass a smaller --records or another --cache-dir"
        )


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one ``reshard_memory.json``."""
    m = result["machine"]
    lines = [
        "# Reshard peak memory",
        "",
        f"{result['created']} · {m['cpu_model']} · {m['cpu_count']} CPUs · {memory_gib(m)} GiB · "
        f"Python {m['python']} · `{result['settings']['cli']} reshard ... --format tfrecord "
        f"--workers {result['settings']['workers']}`",
        "",
        "Peak anonymous RSS (`RssAnon`, /proc/PID/status), sampled every "
        f"{result['settings']['interval_s']} s; file-backed pages (page cache, memory-mapped input) excluded.",
        "",
        "| input | records | seconds | process | peak RssAnon | peak RssFile | samples |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for i, p in enumerate(run["processes"]):
            head = f"{run['input_bytes'] / 1e9:.2f} GB | {run['num_records']:,} | {run['seconds']}"
            lines.append(
                f"| {head if i == 0 else ' | | '} | {p['role']} (pid {p['pid']}) | "
                f"{p['max_RssAnon'] / 2**20:.0f} MiB | {p['max_RssFile'] / 2**20:.0f} MiB | {p['samples']} |"
            )
        lines.append(
            f"| | | | all together (peak of the sum) | {run['peak_total_rss_anon'] / 2**20:.0f} MiB | | |"
        )
    lines += ["", "| target | value | goal | |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['description']} | {t['value']} | {t['target']} | {t['verdict']} |")
    return "\n".join(lines) + "\n"


def judge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process under 1 GiB RssAnon; and, for information, big/small peak ratio."""
    ok_runs = all(r["returncode"] == 0 for r in runs)
    worst = max(r["max_rss_anon"] for r in runs)
    rows = [
        {
            "description": "largest RssAnon of any process (all inputs)",
            "value": f"{worst / 2**20:.0f} MiB",
            "target": "< 1024 MiB",
            "verdict": "PASS" if ok_runs and worst < LIMIT_BYTES else "FAIL",
        }
    ]
    if len(runs) == 2 and runs[1]["max_rss_anon"]:
        big, small = runs[0], runs[1]
        rows.append(
            {
                "description": f"peak RssAnon {big['input_bytes'] / 1e9:.1f} GB input / "
                f"{small['input_bytes'] / 1e9:.1f} GB input (input ratio "
                f"{big['input_bytes'] / small['input_bytes']:.0f}x)",
                "value": f"{big['max_rss_anon'] / small['max_rss_anon']:.2f}",
                "target": "≈ 1",
                "verdict": "info",
            }
        )
    if not ok_runs:
        rows.append({"description": "reshard exit codes", "value": str([r["returncode"] for r in runs]),
                     "target": "0", "verdict": "FAIL"})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--records",
        type=int,
        default=4_000_000,
        help="records in the big corpus (default 4M, about 4.1 GB)",
    )
    parser.add_argument(
        "--small-records", type=int, default=200_000, help="records in the small corpus"
    )
    parser.add_argument("--workers", type=int, default=2, help="dlpipe reshard --workers")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    parser.add_argument("--keep", action="store_true", help="keep the big corpus for the next run")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpora and scratch output"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=DEFAULT_RESULTS, help="where the json/md go"
    )
    parser.add_argument("--render-only", action="store_true", help="rebuild the .md from the .json")
    args = parser.parse_args(argv)  # fmt: skip

    return record(args.results_dir, "reshard_memory", lambda: run_all(args), render_markdown,
                  render_only=args.render_only)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    big_dir = args.cache_dir / f"corpus-{args.records}"
    if not (big_dir / "corpus.json").exists():
        check_disk(args.cache_dir, args.records)
    runs = []
    try:
        for n in (args.records, args.small_records):
            runs.append(
                measure(
                    args.cache_dir / f"corpus-{n}",
                    args.cache_dir / f"memory-out-{n}",
                    args.workers,
                    n,
                    args.seed,
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(big_dir, ignore_errors=True)
    return {
        "benchmark": "reshard_memory",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe(),
        "dlpipe_measured": dlpipe_checkout(),
        "settings": {
            "cli": " ".join(Path(a).name for a in dlpipe_command()),
            "workers": args.workers,
            "interval_s": 0.1,
            "limit_bytes": LIMIT_BYTES,
        },
        "runs": runs,
        "targets": judge(runs),
    }


if __name__ == "__main__":
    raise SystemExit(main())
