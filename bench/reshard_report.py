"""Ratios, PASS/FAIL targets and the markdown table of a reshard benchmark result.

Kept apart from the measuring so ``reshard.md`` can be re-rendered from ``reshard.json``
(``python bench/reshard_bench.py --render-only``) and the targets read in one place.
"""

from __future__ import annotations

import statistics
from typing import Any

from results_io import memory_gib, versions_of

# (name, description, ratio key, comparison, threshold)
TARGETS: list[tuple[str, str, str, str, float]] = [
    (
        "speed vs TF loop",
        "dlpipe TFRecord (1 worker) records/s / TF loop records/s",
        "speedup_tfrecord_w1_vs_tf_loop",
        ">=",
        10.0,
    ),
    (
        "2-worker scaling",
        "dlpipe TFRecord 2 workers / 1 worker records/s",
        "scaling_tfrecord_w2_vs_w1",
        ">=",
        1.7,
    ),
    (
        "size vs TF loop",
        "dlpipe TFRecord bytes/record / TF loop bytes/record",
        "size_tfrecord_vs_tf_loop",
        "<=",
        1.0,
    ),
    (
        "shrink vs padded",
        "padded source bytes / dlpipe TFRecord bytes",
        "shrink_source_vs_tfrecord",
        ">=",
        10.0,
    ),
    (
        "WebDataset overhead",
        "dlpipe WebDataset (default compression) bytes / dlpipe TFRecord bytes",
        "size_webdataset_vs_tfrecord",
        "<=",
        2.0,
    ),
    (
        "WebDataset speed",
        "dlpipe WebDataset (default compression) / dlpipe TFRecord records/s, 2 workers",
        "speed_webdataset_vs_tfrecord_w2",
        ">=",
        0.4,
    ),
]


def compute_ratios(runs: list[dict[str, Any]], corpus: dict[str, Any]) -> dict[str, float | None]:
    """The headline ratios; None where a run needed for one is missing."""
    by = {run["name"]: run for run in runs}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def get(name: str, key: str) -> float | None:
        return by[name][key] if name in by else None

    return {
        "speedup_tfrecord_w1_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-w1", "records_per_s"), get("tf-loop", "records_per_s")
        ),
        "speedup_tfrecord_w2_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-w2", "records_per_s"), get("tf-loop", "records_per_s")
        ),
        "speedup_webdataset_w2_vs_wds_loop": ratio(
            get("dlpipe-webdataset-w2", "records_per_s"), get("wds-loop", "records_per_s")
        ),
        "scaling_tfrecord_w2_vs_w1": ratio(
            get("dlpipe-tfrecord-w2", "records_per_s"), get("dlpipe-tfrecord-w1", "records_per_s")
        ),
        "size_tfrecord_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-w2", "bytes_per_record"), get("tf-loop", "bytes_per_record")
        ),
        "shrink_source_vs_tfrecord": ratio(
            corpus["bytes"], get("dlpipe-tfrecord-w2", "output_bytes")
        ),
        "size_webdataset_vs_tfrecord": ratio(
            get("dlpipe-webdataset-w2", "output_bytes"), get("dlpipe-tfrecord-w2", "output_bytes")
        ),
        "size_webdataset_plain_vs_tfrecord": ratio(
            get("dlpipe-webdataset-plain-w2", "output_bytes"),
            get("dlpipe-tfrecord-w2", "output_bytes"),
        ),
        "size_webdataset_gzip_vs_tfrecord": ratio(
            get("dlpipe-webdataset-gzip-w2", "output_bytes"),
            get("dlpipe-tfrecord-w2", "output_bytes"),
        ),
        "speed_webdataset_vs_tfrecord_w2": ratio(
            get("dlpipe-webdataset-w2", "records_per_s"), get("dlpipe-tfrecord-w2", "records_per_s")
        ),
        "speed_webdataset_zlib_vs_tfrecord_w2": ratio(
            get("dlpipe-webdataset-zlib-w2", "records_per_s"),
            get("dlpipe-tfrecord-w2", "records_per_s"),
        ),
        "speed_webdataset_vs_zlib_w2": ratio(
            get("dlpipe-webdataset-w2", "records_per_s"),
            get("dlpipe-webdataset-zlib-w2", "records_per_s"),
        ),
        "size_webdataset_vs_zlib": ratio(
            get("dlpipe-webdataset-w2", "output_bytes"),
            get("dlpipe-webdataset-zlib-w2", "output_bytes"),
        ),
        "size_tfrecord_int64list_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-int64list-w2", "bytes_per_record"),
            get("tf-loop", "bytes_per_record"),
        ),
        "speedup_tfrecord_int64list_w2_vs_tf_loop": ratio(
            get("dlpipe-tfrecord-int64list-w2", "records_per_s"),
            get("tf-loop", "records_per_s"),
        ),
    }


def judge_targets(ratios: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row per target: value, threshold, PASS/FAIL (or n/a when not measured)."""
    rows = []
    for name, description, key, op, threshold in TARGETS:
        value = ratios.get(key)
        if value is None:
            verdict = "n/a"
        else:
            ok = value >= threshold if op == ">=" else value <= threshold
            verdict = "PASS" if ok else "FAIL"
        rows.append(
            {
                "name": name,
                "description": description,
                "ratio": key,
                "value": value,
                "target": f"{op} {threshold:g}",
                "verdict": verdict,
            }
        )
    return rows


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _cpu_cell(run: dict[str, Any]) -> str:
    """Median CPU seconds of the run and, in brackets, of other processes meanwhile."""
    if "cpu_seconds" not in run:
        return "–"
    own = statistics.median(run["cpu_seconds"])
    others = statistics.median(run["other_processes_cpu_seconds"])
    return f"{own:.2f} ({others:.2f})"


def _deflate_name(deflate: dict[str, Any]) -> str:
    return f"{deflate['implementation']} {deflate['level']}"


def _compression_cell(run: dict[str, Any]) -> str:
    """The compression, and for gzip/zlib the deflate implementation and level."""
    kind = run.get("compression", "none")
    return f"{kind} ({_deflate_name(run['deflate'])})" if run.get("deflate") else kind


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one ``reshard.json``."""
    m, c = result["machine"], result["corpus"]
    v = versions_of(m)
    lines = [
        "# Reshard benchmark",
        "",
        f"{result['created']} · {m['cpu_model']} · {m['cpus_usable']} usable CPUs ({m['cpu_count']} total) · "
        f"{memory_gib(m)} GiB · Python {m['python']} · numpy {v.get('numpy')} · TF {v.get('tensorflow')} · "
        f"webdataset {v.get('webdataset')} · dlpipe {v.get('dlpipe')}",
        "",
        f"Corpus: {c['num_records']:,} records ({c['source']}), {c['encoding']}; mean length "
        f"{c['mean_length']:.1f}, max {c['max_length']}, {c['truncated_records']} truncated; "
        f"input {format_bytes(c['bytes'])} (`input_ids.npy` + `labels.npy`).",
        "",
        f"Each run {result['settings']['repeat']}x{_warmup(result['settings'])}, wall clock, median (min–max); CPU-s: CPU seconds "
        "of the run's processes (of all other processes meanwhile). Bytes are the "
        "shards themselves; index and metadata files (`*.index`, `dataset_info.json`) are listed "
        "apart and left out of the ratios.",
        "",
        "| run | compression | records/s | seconds | CPU-s (others) | bytes/record | output | + index/meta | input/output |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        note = " ¹" if run["extrapolated"] else ""
        lines.append(
            f"| {run['name']}{note} | {_compression_cell(run)} | {_si(run['records_per_s'])} ({_si(run['records_per_s_min'])}–"
            f"{_si(run['records_per_s_max'])}) | {run['seconds_full_corpus']:.2f} | {_cpu_cell(run)} | "
            f"{run['bytes_per_record']:.1f} | {format_bytes(run['output_bytes'])} | "
            f"{format_bytes(run['side_file_bytes'])} | {c['bytes'] / run['output_bytes']:.1f}x |"
        )
    ceiling = result.get("cpu_scaling_ceiling_2_workers")
    if ceiling is not None:
        lines += [
            "",
            f"This machine runs a CPU-bound task {ceiling:.2f}x faster on 2 processes than on 1 "
            "(calibration, fork): the ceiling for any 2-worker scaling measured here. Load average "
            f"before/after: {result['load_average']['before'][0]:.2f}/{result['load_average']['after'][0]:.2f}.",
        ]
    codecs = {
        _deflate_name(run["deflate"]): run["deflate"] for run in result["runs"] if run.get("deflate")
    }
    if codecs:
        named = "; ".join(
            f"{name}: {d['implementation']} {d['version']}, level {d['level']}" for name, d in codecs.items()
        )
        lines += [
            "",
            f"Deflate (gzip/zlib) implementations used: {named}. Both write standard gzip; "
            "`dlpipe-webdataset-zlib-w2` is the same run with `DLPIPE_DEFLATE=zlib`, as without "
            "`isal` installed.",
        ]
    if any(run["extrapolated"] for run in result["runs"]):
        lines += [
            "",
            "¹ timed on the first records only; seconds and output size extrapolated to the full corpus.",
        ]
    if result.get("skipped"):
        lines += ["", f"Not run: {result['skipped']}"]
    lines += ["", "| target | value | goal | |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['description']} | {value} | {t['target']} | {t['verdict']} |")
    r = result["ratios"]
    extra = [
        (
            "dlpipe TFRecord (2 workers) / TF loop records/s",
            r.get("speedup_tfrecord_w2_vs_tf_loop"),
        ),
        (
            "dlpipe WebDataset (2 workers) / webdataset loop records/s",
            r.get("speedup_webdataset_w2_vs_wds_loop"),
        ),
        (
            "dlpipe WebDataset uncompressed bytes / dlpipe TFRecord bytes",
            r.get("size_webdataset_plain_vs_tfrecord"),
        ),
        (
            "dlpipe WebDataset gzip bytes / dlpipe TFRecord bytes",
            r.get("size_webdataset_gzip_vs_tfrecord"),
        ),
        (
            "dlpipe WebDataset with zlib's deflate / dlpipe TFRecord records/s, 2 workers",
            r.get("speed_webdataset_zlib_vs_tfrecord_w2"),
        ),
        (
            "dlpipe WebDataset (default deflate) / with zlib's deflate, records/s",
            r.get("speed_webdataset_vs_zlib_w2"),
        ),
        (
            "dlpipe WebDataset (default deflate) / with zlib's deflate, bytes",
            r.get("size_webdataset_vs_zlib"),
        ),
        (
            "dlpipe TFRecord int64_list bytes/record / TF loop bytes/record",
            r.get("size_tfrecord_int64list_vs_tf_loop"),
        ),
        (
            "dlpipe TFRecord int64_list (2 workers) / TF loop records/s",
            r.get("speedup_tfrecord_int64list_w2_vs_tf_loop"),
        ),
    ]
    for label, value in extra:
        if value is not None:
            lines.append(f"| {label} | {value:.2f} | | info |")
    return "\n".join(lines) + "\n"


def _warmup(settings: dict) -> str:
    """How the runs were warmed up, as the results say (older results do not)."""
    records = settings.get("warmup_peer_records")
    if records is None:
        return ""
    return f" after one untimed warm-up run (the Python loops: on their first {records:,} records)"
