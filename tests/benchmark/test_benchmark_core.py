"""dlpipe.benchmark: ledger arithmetic, AU, results schema, report, plots, machine, CPU sets."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlpipe.benchmark import (
    Ledger,
    SleepModel,
    StageMeasurement,
    accelerator_utilization,
    cpu_sets,
    feed_rate,
    load,
    make_results,
    make_run,
    make_target,
    meets,
    min_step_time_s,
    parse_model_spec,
    render_report,
    save,
    summarize_steps,
    validate,
    write_plots,
)
from dlpipe.benchmark import machine as machine_mod
from dlpipe.benchmark.config import workers_for
from dlpipe.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stage(name: str, capacity: float, items: int = 10_000, **kw) -> StageMeasurement:
    return StageMeasurement(name, items, items / capacity, **kw)


def test_ledger_constraint_headroom_utilization_and_latency():
    lat = np.arange(1, 101, dtype=float) / 1000  # 1..100 ms
    stages = [
        stage("read", 95_000, batch_latencies_s=lat, stalls={"retry": 2, "empty": 7}),
        stage("parse", 40_000, queue_depth_samples=[2, 4, 6], queue_capacity=8),
        stage("batch", 400_000),
    ]
    ledger = Ledger.build(stages, 36_000)
    assert ledger.constraint == "parse"
    assert ledger.next_stage == "read"
    assert ledger.headroom == pytest.approx(95_000 / 40_000)
    parse, read = ledger.row("parse"), ledger.row("read")
    assert parse.constraint and not read.constraint
    assert parse.capacity == pytest.approx(40_000)
    assert parse.utilization == pytest.approx(0.9)
    assert read.utilization == pytest.approx(36_000 / 95_000)
    assert read.p50_latency_s == pytest.approx(np.percentile(lat, 50))
    assert read.p95_latency_s == pytest.approx(0.09505)
    assert read.batches == 100
    assert parse.p50_latency_s is None and parse.batches == 0
    assert parse.queue_depth == pytest.approx(0.5)
    assert read.queue_depth is None
    assert (read.top_stall, read.top_stall_count) == ("empty", 7)
    assert [r.name for r in ledger.rows] == ["read", "parse", "batch"]  # pipeline order kept
    assert ledger.notes == []
    assert ledger.summary() == (
        "the constraint is `parse` at 40k samples/s; next is `read` with 2.4x headroom"
    )


def test_ledger_tie_goes_to_first_stage_with_headroom_one():
    ledger = Ledger.build([stage("a", 1000), stage("b", 500), stage("c", 500)], 480)
    assert ledger.constraint == "b" and ledger.next_stage == "c"
    assert ledger.headroom == 1.0
    assert any(n.startswith("tie: b, c") for n in ledger.notes)


def test_ledger_single_stage_has_no_headroom():
    ledger = Ledger.build([stage("only", 2000)], 1900)
    assert ledger.constraint == "only"
    assert ledger.next_stage is None and ledger.headroom is None
    assert "next is" not in ledger.summary()


def test_ledger_interference_and_over_unity_notes():
    slow = Ledger.build([stage("read", 1000), stage("parse", 2000)], 500)
    assert any("interfere" in n for n in slow.notes)
    fast = Ledger.build([stage("read", 1000)], 1200)
    row = fast.row("read")
    assert row.utilization == pytest.approx(1.2) and row.utilization_display == 1.0
    assert any("above 1" in n for n in fast.notes)
    assert "raw 1.20" in fast.render_markdown()


def test_ledger_pipeline_queue_samples_replace_stage_samples():
    s = stage("read", 1000, queue_depth_samples=[8, 8], queue_capacity=8)
    ledger = Ledger.build([s], 900, pipeline_queue_samples={"read": [0, 2]})
    assert ledger.row("read").queue_depth == pytest.approx(0.125)
    with pytest.raises(ConfigError, match="unknown stages"):
        Ledger.build([s], 900, pipeline_queue_samples={"nope": [1]})


def test_ledger_json_round_trip_and_markdown_marks_constraint():
    ledger = Ledger.build(
        [stage("read", 3000, batch_latencies_s=[0.01, 0.02]), stage("parse", 1000)], 950
    )
    again = Ledger.from_json(json.dumps(ledger.to_json()))
    assert again == ledger
    assert Ledger.from_json(ledger.to_json()) == ledger
    table = ledger.render_markdown()
    marked = [line for line in table.splitlines() if "◀ constraint" in line]
    assert len(marked) == 1 and "parse" in marked[0]


@pytest.mark.parametrize(
    "kwargs", [{"items": 0}, {"seconds": 0.0}, {"seconds": float("inf")}, {"queue_capacity": 0}]
)
def test_stage_measurement_rejects_bad_values(kwargs):
    args = {"name": "read", "items": 10, "seconds": 1.0} | kwargs
    with pytest.raises(ConfigError):
        StageMeasurement(**args)


def test_ledger_rejects_empty_and_duplicate_stages():
    with pytest.raises(ConfigError):
        Ledger.build([], 1.0)
    with pytest.raises(ConfigError, match="unique"):
        Ledger.build([stage("a", 10), stage("a", 20)], 1.0)


def test_au_excludes_first_step():
    wait = [5.0, 0.1, 0.0, 0.1]  # the first step waits for start-up
    compute = [1.0, 0.9, 1.0, 0.9]
    au = accelerator_utilization(wait, compute)
    assert au == pytest.approx(2.8 / 3.0)
    assert accelerator_utilization(wait, compute, skip_first=0) == pytest.approx(3.8 / 9.0)
    assert meets(au) and not meets(au, threshold=0.95)
    s = summarize_steps(wait, compute, model="sleep:1000")
    assert s.steps == 3 and s.skipped_steps == 1 and s.meets
    assert s.wall_s == pytest.approx(3.0) and s.steps_per_s == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        accelerator_utilization([1.0], [1.0])  # nothing left after the first step
    with pytest.raises(ConfigError):
        accelerator_utilization([1.0, 2.0], [1.0])


def test_feed_rate_and_min_step_time():
    assert feed_rate([9.0, 0.01, 0.01, 0.02]) == pytest.approx(3 / 0.04)
    assert min_step_time_s(100.0, 0.9) == pytest.approx(0.009)
    s = summarize_steps([1.0, 0.01, 0.01], [0.0, 0.0, 0.0], model="none")
    assert s.feed_steps_per_s == pytest.approx(100.0)


def test_model_spec_parsing():
    assert parse_model_spec("sleep:25").sleep_ms == 25.0
    assert str(parse_model_spec("SLEEP:2.5")) == "sleep:2.5"
    assert parse_model_spec("deepcal").kind == "deepcal"
    assert parse_model_spec(" none ").kind == "none"
    assert parse_model_spec("none").make_sleep_model() is None
    for bad in ("sleep:", "sleep:-1", "sleep:0", "sleep:x", "resnet", ""):
        with pytest.raises(ConfigError, match="--model"):
            parse_model_spec(bad)


def test_sleep_model_takes_its_time():
    import time

    model = parse_model_spec("sleep:5").make_sleep_model()
    t0 = time.perf_counter()
    for _ in range(4):
        model(None)
    elapsed = (time.perf_counter() - t0) / 4
    assert 0.005 <= elapsed < 0.02
    SleepModel(0)()  # returns at once
    with pytest.raises(ConfigError):
        SleepModel(-1)


# --- results ---------------------------------------------------------------------------


def sample_results() -> dict:
    ledger = Ledger.build(
        [stage("read", 95_000, batch_latencies_s=[0.002, 0.003]), stage("parse", 41_000)], 39_000
    )
    au = summarize_steps([2.0, 0.001, 0.001], [0.025, 0.025, 0.025], model="sleep:25")
    runs = [
        make_run("tf", "cpu-procs=1", "dlpipe", [39_000, 40_000, 38_000], ledger=ledger, au=au),
        make_run(
            "torch",
            "cpu-procs=1",
            "dlpipe",
            [35_000, 36_000, 34_000],
            tokens_per_s=[700_000, 720_000, 680_000],
        ),  # fmt: skip
        make_run("tf", "cpu-procs=2", "dlpipe", [70_000]),
        make_run("torch", "cpu-procs=2", "dlpipe", [40_000]),
        make_run("tf", "cpu-procs=1", "baseline-tfrecorddataset", [10_000, 9_000, 11_000]),
    ]
    return make_results(
        machine={"cpu_count": np.int64(2)},
        ceilings={"memcpy_bytes_per_s": np.float32(1e10)},
        config={"model": "sleep:25", "data": Path("/data/shards"), "gpus": (0, 1)},
        runs=runs,
        targets=[make_target("parity", 1.1, at_least=0.8, at_most=1.25)],
        created="2025-01-01T00:00:00+00:00",
    )


def test_results_parity_speedups_and_targets():
    r = sample_results()
    assert r["runs"][0]["samples_per_s"] == {
        "median": 39_000.0, "min": 38_000.0, "max": 40_000.0,
        "repeats": [39_000.0, 40_000.0, 38_000.0],
    }  # fmt: skip
    parity = {p["setting"]: p for p in r["parity"]}
    assert parity["cpu-procs=1"]["ratio"] == pytest.approx(39 / 35)
    assert parity["cpu-procs=1"]["within"]
    assert not parity["cpu-procs=2"]["within"]  # 70k / 40k = 1.75
    assert parity["best"]["tf_setting"] == "cpu-procs=2"
    assert parity["best"]["torch_setting"] == "cpu-procs=2"
    (speedup,) = r["speedups"]
    assert speedup["baseline"] == "baseline-tfrecorddataset"
    assert speedup["speedup"] == pytest.approx(3.9)
    assert r["targets"][0]["pass"] is True
    assert make_target("x", None, at_least=1)["pass"] is None
    assert make_target("x", 0.5, at_least=1)["pass"] is False


def test_results_round_trip(tmp_path):
    r = sample_results()
    path = save(r, tmp_path / "out")
    assert path.name == "results.json"
    assert load(path) == r
    assert r["config"] == {"model": "sleep:25", "data": "/data/shards", "gpus": [0, 1]}
    assert type(r["machine"]["cpu_count"]) is int
    assert load(path.parent) == r
    assert Ledger.from_json(load(path)["runs"][0]["ledger"]).constraint == "parse"


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda r: r.pop("machine"), "machine: missing"),
        (lambda r: r.update(schema_version="1"), "schema_version: expected int"),
        (lambda r: r["runs"][1].pop("loader"), r"runs\[1\].loader: missing"),
        (lambda r: r["runs"][0]["samples_per_s"].update(median="fast"),
         r"runs\[0\].samples_per_s.median: expected"),
        (lambda r: r["runs"][0]["ledger"]["rows"][0].update(capacity=None),
         r"runs\[0\].ledger.rows\[0\].capacity"),
        (lambda r: r["runs"][0]["ledger"].update(constraint="nope"), "is not a row"),
        (lambda r: r["runs"][0]["au"].update(meets=1), r"runs\[0\].au.meets: expected bool"),
        (lambda r: r["runs"][0].update(framework="jax"), r"runs\[0\].framework"),
        (lambda r: r["parity"][0].update(ratio=float("nan")), r"parity\[0\].ratio"),
        (lambda r: r["targets"][0].update(**{"pass": "yes"}), r"targets\[0\].pass"),
        (lambda r: r.update(runs={}), "runs: expected list"),
    ],
)  # fmt: skip
def test_validate_names_the_bad_key(mutate, where):
    r = copy.deepcopy(sample_results())
    mutate(r)
    with pytest.raises(ValueError, match=where):
        validate(r)


def test_save_refuses_invalid_results(tmp_path):
    r = sample_results()
    r["runs"][0]["samples_per_s"]["median"] = True  # a bool is not a number
    with pytest.raises(ValueError, match="median"):
        save(r, tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_make_run_checks_arguments():
    with pytest.raises(ConfigError, match="framework"):
        make_run("jax", "cpu-procs=1", "dlpipe", [1.0])
    with pytest.raises(ConfigError, match="loader"):
        make_run("tf", "cpu-procs=1", "mine", [1.0])
    with pytest.raises(ConfigError, match="samples_per_s"):
        make_run("tf", "cpu-procs=1", "dlpipe", [])


# --- report and plots ------------------------------------------------------------------


def test_report_names_the_constraint_and_tables():
    text = render_report(sample_results())
    assert "The constraint is `parse` at 41k samples/s; next is `read` with 2.3x headroom." in text
    assert "AU 96% ≥ 90%" in text and "keeps the model fed" in text
    assert "## Parity" in text and "| cpu-procs=2 | 70k | 40k | 1.75 | NO |" in text
    assert "| tf | cpu-procs=1 | baseline-tfrecorddataset | 10k | 39k | 3.90x |" in text
    assert "| parity | 1.1 | >= 0.8 and <= 1.25 | PASS |" in text
    assert "## How to read this" in text


def test_report_scaling_divides_by_the_pinned_and_the_whole_machine_process():
    r = sample_results()
    r["runs"].append(make_run("tf", "cpu-procs=1 cpus=1/2", "dlpipe", [35_000]))
    text = render_report(r)
    assert "## Scaling (2 CPU processes ÷ 1)" in text
    assert "| tf | 70k | 2.00 | 1.79 |" in text  # 70k / 35k pinned, 70k / 39k on all CPUs
    assert "| torch | 40k | n/a | 1.14 |" in text  # no pinned run: that ratio is not made up


@pytest.mark.parametrize(("value", "cpus", "replicas", "want"),
                         [("auto", 2, 1, 2), ("auto", 1, 1, 0), ("auto", 2, 2, 0), ("auto", 16, 2, 8),
                          (0, 2, 1, 0), (3, 1, 1, 3)])  # fmt: skip
def test_workers_for_auto_gives_a_replica_its_cpus(value, cpus, replicas, want):
    assert workers_for(value, cpus, replicas) == want


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_plots(sample_results(), tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "ledger.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("plots", [True, False])
def test_a_run_without_matplotlib_still_writes_its_results(tmp_path, monkeypatch, plots):
    # a GPU box without the bench extra keeps the numbers it measured; the plots are a nicety
    from dlpipe.benchmark import runner

    if plots:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setattr(runner, "is_available", lambda module: module != "matplotlib")
    said = []
    runner.write_outputs(sample_results(), tmp_path, said.append)
    assert (tmp_path / "results.json").exists() and (tmp_path / "report.md").exists()
    assert (tmp_path / "throughput.png").exists() == plots
    if plots:
        assert said == []
    else:
        assert len(said) == 1 and "pip install 'dlpipe[bench]'" in said[0]


# --- machine -----------------------------------------------------------------------------


def test_describe_imports_no_framework():
    code = (
        "import sys; from dlpipe.benchmark import machine; d = machine.describe(); "
        "assert d['cpu_count'] >= 1; "
        "print(' '.join(m for m in ('tensorflow', 'torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_library_versions_one_collector():
    got = machine_mod.library_versions(["numpy", "dlpipe", "no-such-package-xyz"])
    assert got["numpy"] == np.__version__
    from dlpipe._version import __version__

    assert got["dlpipe"] == __version__  # the dlpipe running, not whatever is installed
    assert got["no-such-package-xyz"] is None
    versions = machine_mod.describe(["no-such-package-xyz", "numpy"])["versions"]
    assert list(versions) == [*machine_mod.CORE_VERSIONS, "no-such-package-xyz"]  # no duplicates


def test_gpus_absent_is_empty(monkeypatch):
    monkeypatch.setattr(machine_mod.shutil, "which", lambda name: None)
    assert machine_mod.gpus() == []


def test_parse_cpu_list():
    assert machine_mod.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert machine_mod.parse_cpu_list("") == []


def _check_partition(sets, available):
    flat = [c for s in sets for c in s]
    assert len(flat) == len(set(flat)), "sets overlap"
    assert set(flat) == set(available), "sets do not cover the CPUs"
    assert all(sets)


@pytest.mark.parametrize("n", [1, 2])
def test_cpu_sets_on_this_host(n):
    available = os.sched_getaffinity(0)
    if len(available) < n:
        pytest.skip("not enough CPUs")
    _check_partition(cpu_sets(n), available)


def test_cpu_sets_numa_aligned_and_core_aligned():
    nodes = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert cpu_sets(2, available=range(8), nodes=nodes) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    cores = [[0, 4], [1, 5], [2, 6], [3, 7]]  # SMT siblings i and i+4
    sets = cpu_sets(2, available=range(8), nodes={0: range(8)}, cores=cores)
    assert sets == [[0, 1, 4, 5], [2, 3, 6, 7]]
    sets = cpu_sets(3, available=range(8), nodes=nodes, cores=cores)
    _check_partition(sets, range(8))
    sets = cpu_sets(3, available=[0, 1, 2], nodes={}, cores=[[0, 1, 2]])  # fewer cores than procs
    assert sets == [[0], [1], [2]]
    # affinity narrower than the nodes: only usable CPUs, still disjoint and covering
    _check_partition(cpu_sets(2, available=[1, 2, 5, 6], nodes=nodes), [1, 2, 5, 6])
    with pytest.raises(ConfigError, match="n_procs"):
        cpu_sets(3, available=[0, 1])
    with pytest.raises(ConfigError, match="n_procs"):
        cpu_sets(0)


def test_pin_and_restore():
    available = os.sched_getaffinity(0)
    first = min(available)
    old = machine_mod.pin([first])
    try:
        assert os.sched_getaffinity(0) == {first}
    finally:
        machine_mod.pin(old)
    assert os.sched_getaffinity(0) == available
    with pytest.raises(ConfigError):
        machine_mod.pin([])


def test_measure_ceilings_small(tmp_path):
    c = machine_mod.measure_ceilings(
        tmp_path, file_bytes=4 << 20, copy_bytes=4 << 20, crc_bytes=1 << 20
    )
    for key in ("page_cache_read_bytes_per_s", "memcpy_bytes_per_s", "crc32c_bytes_per_s"):
        assert c[key] > 0
    assert list(tmp_path.iterdir()) == []  # the temp file is gone
