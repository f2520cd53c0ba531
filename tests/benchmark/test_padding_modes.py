"""``dlpipe bench``'s padding modes: plans, counting, the per-mode rows of both measurers, the
results section (fastest mode and why, parity per mode) and a whole small run."""

from __future__ import annotations

import copy
import inspect
import json
import os

import numpy as np
import pytest
from token_rows import padded_tokens  # noqa: E402

import dlpipe
from dlpipe.benchmark import load, make_results, make_run, render_report, validate
from dlpipe.benchmark.config import BenchConfig
from dlpipe.benchmark.ledger import Ledger, StageMeasurement
from dlpipe.benchmark.modes import MODES, batch_counts, packing_shape, parse_modes, plan
from dlpipe.benchmark.utilization import summarize_steps
from dlpipe.errors import ConfigError

N, WIDTH = 600, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dlpipe dataset (3 shards) of N records of lengths 0..32, about half real tokens padded."""
    src = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(5)
    ids, _ = padded_tokens(rng, N, WIDTH)
    np.save(src / "input_ids.npy", ids)
    np.save(src / "labels.npy", rng.normal(size=(N, 2)).astype(np.float32))
    out = tmp_path_factory.mktemp("shards")
    dlpipe.reshard([str(src / "input_ids.npy"), str(src / "labels.npy")], out, pad_id=0, num_shards=3,
                   workers=1, overwrite=True)  # fmt: skip
    return str(out)


def has_packing(loader: str) -> bool:
    """Whether this dlpipe's loader takes packing=... (sequence packing may land later)."""
    if loader == "torch":
        from dlpipe.loaders.torch_loader import to_torch_dataloader as fn
    else:
        from dlpipe.loaders.tf_data import to_tf_dataset as fn
    return "packing" in inspect.signature(fn).parameters


# --- plans and counting (no framework) --------------------------------------------------------


def test_parse_modes():
    assert parse_modes(None) == parse_modes("all") == list(MODES)
    assert parse_modes("packing, fixed") == ["fixed", "packing"]  # MODES order
    with pytest.raises(ConfigError, match="padding mode"):
        parse_modes("fixed,sorted")


def test_plans_follow_the_dataset_lengths(data):
    assert plan("longest", data, 64).loader_kwargs == {"batch_size": 64}
    assert plan("buckets", data, 64).loader_kwargs["bucket_boundaries"] == "auto"
    assert plan("fixed", data, 64).loader_kwargs["pad_to_multiple_of"] == WIDTH  # the source's width
    packing = plan("packing", data, 64)
    assert packing.loader_kwargs["packing"] is True
    assert packing.max_length == 32 and packing.max_length % 8 == 0
    stats = {"min": 4, "max": 125, "mean": 22.0}  # the DeepCAL-like corpus, about
    length, segments, rows = packing_shape(stats, 256)
    assert (length, rows) == (128, round(256 * 22 / (128 * 0.98)))  # 45 rows of ~5.7 records
    assert segments == min(128 // 4, int(np.ceil(2 * 128 / 22)))
    with pytest.raises(ConfigError, match="padding="):
        plan("sorted", data, 64)


def test_batch_counts_padded_and_packed():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert batch_counts({"input_ids": mask * 7, "attention_mask": mask}) == (2, 6, 8)
    assert batch_counts({"input_ids": mask * 7}) == (2, 6, 8)  # no mask: the non-pad ids
    seg = np.array([[1, 1, 2, 0], [1, 1, 1, 1]], np.int32)
    packed = {"input_ids": seg * 5, "segment_ids": seg, "segment_mask": np.array([[1, 1], [1, 0]], bool)}
    assert batch_counts(packed) == (3, 7, 8)  # 3 records in 2 rows


# --- the results section ----------------------------------------------------------------------


def mode_run(fw: str, mode: str, sps: float, eff: float, step_cap: float, constraint: str = "step") -> dict:
    stages = [StageMeasurement("parse", 1000, 1000 / 50_000), StageMeasurement("step", 1000, 1000 / step_cap)]
    if constraint == "parse":
        stages[0] = StageMeasurement("parse", 1000, 1000 / (step_cap / 2))
    au = summarize_steps([0.001] * 4, [0.01] * 4, model="sleep:10")
    setting = "train cpu-procs=1" + ("" if mode == "longest" else f" padding={mode}")
    return make_run(fw, setting, "dlpipe", [sps, sps], tokens_per_s=[sps * 22] * 2, padding=mode,
                    ledger=Ledger.build(stages, sps), au=au, token_efficiency=eff)  # fmt: skip


def mode_results(tf_packing_sps: float = 9000.0) -> dict:
    runs = [mode_run("tf", "fixed", 2000, 0.17, 2100), mode_run("tf", "longest", 5000, 0.47, 5200),
            mode_run("tf", "buckets", 8000, 0.92, 8300), mode_run("tf", "packing", tf_packing_sps, 0.97, 9400),
            mode_run("torch", "longest", 4000, 0.47, 4200),
            mode_run("torch", "packing", 6000, 0.97, 13000, constraint="parse")]  # fmt: skip
    padding = {"modes": list(MODES), "plans": {"longest": {"text": "each batch padded to its longest"}},
               "packing_rule": "rows = round(...)", "skipped": {"torch fixed": "not measured"}}  # fmt: skip
    return make_results(machine={}, ceilings={}, config={}, runs=runs, padding=padding, created="2025-01-01")


def test_summary_names_the_fastest_mode_and_why_from_the_numbers(tmp_path):
    r = mode_results()
    modes = r["padding_modes"]
    assert [(x["framework"], x["padding"]) for x in modes["rows"]][:2] == [("tf", "fixed"), ("tf", "longest")]
    tf, torch = modes["fastest"]
    assert (tf["padding"], torch["padding"]) == ("packing", "packing")
    assert tf["line"].startswith("tf: `packing` is fastest at 9k samples/s, 4.50x `fixed`")
    assert "constraint is the model's `step` in every mode" in tf["line"] and "97% real tokens" in tf["line"]
    assert "its constraint is `parse`, not the step" in torch["line"]  # packing's own constraint
    (parity,) = [p for p in modes["parity"] if p["padding"] == "packing"]
    assert parity["ratio"] == pytest.approx(1.5) and not parity["within"]
    assert [p["padding"] for p in modes["parity"]] == ["longest", "packing"]  # both frameworks only
    # the numbers decide: a slower packing row makes buckets the fastest, with packing next
    other = mode_results(tf_packing_sps=7000.0)["padding_modes"]["fastest"][0]
    assert other["padding"] == "buckets" and "Next: `packing` at 7k" in other["line"]
    text = render_report(r)
    assert "## Padding modes" in text and "**Fastest** — tf: `packing` is fastest" in text
    assert "| tf | packing | 9k | 198k | 97% | step | 10.0 ms |" in text
    assert "not measured: torch fixed" in text and "rows = round(...)" in text
    from dlpipe.benchmark import save

    assert load(save(r, tmp_path)) == r


@pytest.mark.parametrize(
    "mutate, where",
    [(lambda r: r["padding_modes"].pop("rows"), r"padding_modes.rows: missing"),
     (lambda r: r["padding_modes"]["rows"][0].update(token_efficiency="high"), r"rows\[0\].token_efficiency"),
     (lambda r: r["padding_modes"]["fastest"][0].update(line=None), r"fastest\[0\].line"),
     (lambda r: r["runs"][0].update(padding=3), r"runs\[0\].padding")],
)  # fmt: skip
def test_validate_checks_the_padding_section(mutate, where):
    r = copy.deepcopy(mode_results())
    mutate(r)
    with pytest.raises(ValueError, match=where):
        validate(r)


# --- the measurers, each mode at its real batch shapes ----------------------------------------


def check_modes(measurer, data: str, modes: list[str]) -> dict[str, object]:
    out = {}
    for mode in modes:
        cfg = BenchConfig(data=data, batch_size=32, steps=4, warmup=1, repeats=1, model="sleep:1", step_s=0.001,
                          padding=mode)  # fmt: skip
        res = measurer.measure_dlpipe(cfg)
        assert res.padding == mode
        assert 0 < res.token_efficiency <= 1
        assert [s.name for s in res.stages] == ["read", "parse", "shuffle", "batch", "h2d", "step"]
        assert all(x > 0 for x in res.samples_per_s + res.tokens_per_s)
        Ledger.build(res.stages, float(np.median(res.samples_per_s)))
        json.dumps(res.to_json())
        out[mode] = res
    fixed, longest = out["fixed"].token_efficiency, out["longest"].token_efficiency
    assert fixed < longest  # padded to the source's width vs to each batch's longest
    assert out["buckets"].token_efficiency > longest
    if "packing" in out:
        assert out["packing"].token_efficiency > longest
        assert any("segments" in n or "packed rows" in n for n in out["packing"].notes)
    return out


def test_torch_measures_every_mode(data):
    pytest.importorskip("torch")
    from dlpipe.benchmark import torch_measure

    modes = list(MODES) if has_packing("torch") else ["fixed", "longest", "buckets"]
    out = check_modes(torch_measure, data, modes)
    cal = {m: torch_measure.calibrate_step(BenchConfig(data=data, batch_size=32, steps=3, padding=m))
           for m in ("fixed", "buckets")}  # fmt: skip
    assert all(s > 0 for s in cal.values())
    assert out["fixed"].stages[-1].items > 0


@pytest.mark.tf
def test_tf_measures_every_mode(data):
    pytest.importorskip("tensorflow")
    from dlpipe.benchmark import tf_measure

    check_modes(tf_measure, data, list(MODES) if has_packing("tf") else ["fixed", "longest", "buckets"])


def test_calibration_rounds_keep_each_modes_fastest_and_skip_failing_modes():
    from dlpipe.benchmark import worker
    from dlpipe.errors import DlpipeError

    class Measurer:  # "buckets" was disturbed in its first round; "packing" cannot be measured
        times = {"fixed": [0.05, 0.05], "buckets": [0.03, 0.012], "longest": [0.019]}
        calls: list[str] = []

        def calibrate_step(self, cfg):
            self.calls.append(cfg.padding)
            if cfg.padding == "packing":
                raise DlpipeError("no packing here")
            return self.times[cfg.padding].pop(0)

    out = {"step_s": 0.02}  # the "calibrate" phase's longest: round 1 of the default mode
    job = {"modes": ["fixed", "longest", "buckets", "packing"], "sleep_s": None}
    worker._calibrate_modes(Measurer(), BenchConfig(data="unused"), job, out)
    assert Measurer.calls == ["fixed", "buckets", "packing", "longest", "fixed", "buckets"]
    assert out["mode_step_s"] == {"fixed": 0.05, "longest": 0.019, "buckets": 0.012}
    assert out["step_s"] == 0.019 and "packing" in out["mode_errors"]


# --- a whole run --------------------------------------------------------------------------------


def test_run_bench_measures_each_mode_and_names_the_fastest(data, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from dlpipe.benchmark.runner import run_bench

    r = run_bench(data, output=tmp_path, frameworks=["torch"], cpu_procs=[1], gpus="none", batch_size=32,
                  steps=3, repeats=1, model="sleep:2", padding="all")  # fmt: skip
    modes = r["padding_modes"]
    measured = {row["padding"]: row for row in modes["rows"]}
    expected = set(MODES) if has_packing("torch") else {"fixed", "longest", "buckets"}
    assert set(measured) == expected
    assert all(0 < row["token_efficiency"] <= 1 for row in measured.values())
    if "packing" in measured:
        assert measured["packing"]["token_efficiency"] > measured["longest"]["token_efficiency"]
    # sleep:2 is the step at the default mode; the others scale by their calibrated steps
    assert measured["longest"]["step_s"] == pytest.approx(0.002, rel=0.05)
    assert measured["fixed"]["step_s"] > 0
    (fastest,) = modes["fastest"]
    assert fastest["padding"] in measured and "is fastest" in fastest["line"]
    report = (tmp_path / "report.md").read_text()
    assert f"**Fastest** — torch: `{fastest['padding']}` is fastest" in report
    saved = load(tmp_path)
    assert saved["config"]["padding"] == list(MODES) and saved["config"]["num_workers"] == "auto"
    # auto: the measuring process (on every CPU here) got one DataLoader worker per CPU, or none on 1
    from dlpipe.benchmark.config import workers_for

    (loader_run,) = [run for run in saved["runs"] if run["setting"] == "cpu-procs=1"]
    workers = workers_for("auto", len(os.sched_getaffinity(0)))
    assert any(f"num_workers={workers}," in note for note in loader_run["notes"])
    with pytest.raises(ConfigError, match="padding mode"):
        run_bench(data, output=tmp_path, frameworks=["torch"], padding="sorted")


def test_schema_doc_names_every_padding_key():
    from pathlib import Path

    from dlpipe.benchmark.mode_summary import _FASTEST, _PARITY, _ROW

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bench-results-schema.md").read_text()
    keys = [*_ROW, *_FASTEST, *_PARITY, "padding_modes", "modes", "plans", "packing_rule", "skipped"]
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/bench-results-schema.md does not name {missing}"
