"""The loader benchmark's ratios, targets and markdown, from ``loaders.json`` alone (so
``loader_bench.py --render-only`` re-renders without running anything)."""

from __future__ import annotations

from typing import Any

from results_io import checkout_text, memory_gib, versions_of


def best(by_name: dict[str, dict[str, Any]], *names: str) -> tuple[str, float] | None:
    found = [(n, by_name[n]["samples_per_s"]) for n in names if n in by_name]
    return max(found, key=lambda x: x[1]) if found else None


def judge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ratio or target: what, value, goal, PASS/FAIL (INFO without a goal, n/a if missing)."""
    by = {r["name"]: r for r in rows}
    torch_best = best(by, "dlpipe-torch-w0", "dlpipe-torch-w2")
    tf = best(by, "dlpipe-tf")
    out: list[dict[str, Any]] = []

    def ratio(what: str, num: tuple[str, float] | None, den: tuple[str, float] | None,
              lo: float | None = None, hi: float | None = None) -> None:  # fmt: skip
        value = num[1] / den[1] if num and den else None
        goal = " ".join(x for x in (f"≥ {lo:g}" if lo else "", f"≤ {hi:g}" if hi else "") if x)
        if value is None:
            verdict = "n/a"
        elif lo is None and hi is None:
            verdict = "INFO"
        else:
            verdict = (
                "PASS" if (lo is None or value >= lo) and (hi is None or value <= hi) else "FAIL"
            )
        pair = f"{num[0]} ÷ {den[0]}" if num and den else ""
        out.append(
            {"what": what, "pair": pair, "value": value, "goal": goal or "info", "verdict": verdict}
        )

    ratio("dlpipe to_tf_dataset ÷ hand-written tf.data", tf, best(by, "tfdata-handwritten"), 1.0)
    ratio(
        "dlpipe torch (best of 0/2 workers) ÷ tfrecord package (best)",
        torch_best, best(by, "tfrecord-torch-w0", "tfrecord-torch-w2"), 3.0,
    )  # fmt: skip
    ratio(
        "dlpipe torch (best) ÷ HF with_format(\"torch\") (best)",
        torch_best, best(by, "hf-torch-w0", "hf-torch-w2"), 5.0,
    )  # fmt: skip
    ratio(
        "TF/PyTorch parity: dlpipe to_tf_dataset ÷ dlpipe torch (best)", tf, torch_best, 0.8, 1.25
    )
    ratio(
        "dlpipe to_tf_dataset ÷ hand-written tf.data with the same 64-record blocks",
        tf, best(by, "tfdata-handwritten-blocks64"),
    )  # fmt: skip
    ratio("dlpipe to_tf_dataset ÷ HF to_tf_dataset", tf, best(by, "hf-tf"))
    ratio(
        "dlpipe torch (best) ÷ webdataset (best)",
        torch_best,
        best(by, "wds-torch-w0", "wds-torch-w2"),
    )
    ratio("PyTorch num_workers=2 ÷ num_workers=0, no transform",
          best(by, "dlpipe-torch-w2"), best(by, "dlpipe-torch-w0"), 1.0)  # fmt: skip
    ratio("PyTorch num_workers=2 ÷ num_workers=0, a ~10 µs map per record",
          best(by, "dlpipe-torch-w2-map10us"), best(by, "dlpipe-torch-w0-map10us"), 1.5)  # fmt: skip
    ratio("packing ÷ the same loader without it (PyTorch, 0 workers)",
          best(by, "dlpipe-torch-w0-packed"), best(by, "dlpipe-torch-w0"), 0.8)  # fmt: skip
    ratio("packing ÷ the same loader without it (TF)", best(by, "dlpipe-tf-packed"), tf, 0.8)
    ratio("TF with bucket_boundaries=\"auto\" ÷ TF without", best(by, "dlpipe-tf-bucket"), tf, 0.9)
    for mode, tf_name, torch_names in (
        ("buckets", "dlpipe-tf-bucket", ("dlpipe-torch-w0-bucket", "dlpipe-torch-w2-bucket")),
        ("packing", "dlpipe-tf-packed", ("dlpipe-torch-w0-packed", "dlpipe-torch-w2-packed")),
    ):
        ratio(f"TF/PyTorch parity with {mode}: dlpipe to_tf_dataset ÷ dlpipe torch (best of 0/2 workers)",
              best(by, tf_name), best(by, *torch_names), 0.8, 1.25)  # fmt: skip
    for name in ("dlpipe-torch-w0-bucket", "dlpipe-tf-bucket"):
        eff = by[name]["padding_efficiency"] if name in by else None
        verdict = "n/a" if eff is None else ("PASS" if eff >= 0.9 else "FAIL")
        out.append({"what": "padding efficiency with bucket_boundaries=\"auto\"", "pair": name,
                    "value": eff, "goal": "≥ 0.9", "verdict": verdict})  # fmt: skip
    for name in ("dlpipe-torch-w0-packed", "dlpipe-tf-packed"):
        eff = by[name]["padding_efficiency"] if name in by else None
        verdict = "n/a" if eff is None else ("PASS" if eff >= 0.9 else "FAIL")
        out.append({"what": "real-token efficiency with packing=True", "pair": name,
                    "value": eff, "goal": "≥ 0.9", "verdict": verdict})  # fmt: skip
    return out


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


NOTES = [
    "Every run builds a fresh loader; setup s = building it plus the untimed warm-up batches"
    " (worker start-up, shuffle buffers filling).",
    "Shuffling: dlpipe's PyTorch loader shuffles shard order and records within windows of"
    " about `buffer_size` = 1000 records (its default); dlpipe's `to_tf_dataset` shuffles blocks"
    " of 64 consecutive records in a buffer of 1000 records' worth, so a batch holds a few runs"
    " of consecutive records (a coarser shuffle than a record-level buffer; the corpus itself is"
    " in random order, so it costs nothing here). `tfdata-handwritten`, tfrecord and webdataset"
    " use a 1000-record shuffle buffer; `tfdata-handwritten-blocks64` does what dlpipe does;"
    " HF shuffles globally (a random permutation of indices).",
    "Padding: dlpipe, the hand-written tf.data pipeline and the padding collates pad each batch"
    " to its longest record; the HF runs keep the corpus's padding to 128 (what a user holding"
    " the padded arrays gets), hence padding efficiency 0.17.",
    '`tfrecord-torch`: `description` from the manifest (`int64_list` → "int", raw → "byte"'
    " decoded with `np.frombuffer` in `transform`); no resharding for it.",
    "`hf-torch`: a `BatchSampler` passed as `sampler` with `batch_size=None`, so each step is one"
    " batched `dataset[list_of_256_indices]` (Arrow gather, formatted to tensors) rather than 256"
    " single-row reads.",
    "CPU own / others: CPU-s per second of this benchmark's process tree (main process, all its"
    " threads, DataLoader workers) and of everything else on the machine during the timed"
    " batches; a large *others* means other work competed for the 2 cores, so read that row"
    " with care. CPU µs/sample = own CPU time per sample, the cost less sensitive to load.",
    "PyTorch and TF contenders run in two separate child processes (the `tfrecord` package"
    " registers TF's protobuf types, after which TensorFlow cannot be imported; and a forked"
    " DataLoader worker should not inherit TF's threads).",
]


def render_markdown(res: dict[str, Any]) -> str:
    m, s, load = res["machine"], res["settings"], res["load_average"]
    v = versions_of(m)
    lines = [
        "# Loader benchmark",
        "",
        f"{res['created']}, `{res['command']}`. Corpus: {res['corpus']['num_records']:,}"
        f" DeepCAL-like records (mean length {res['corpus']['mean_length']:.1f} code points,"
        f" padded to 128); batch size {s['batch_size']}, shuffled; each run takes"
        f" {s['warmup_batches']} batches untimed, then times {s['timed_batches']}"
        f" ({s['timed_batches'] * s['batch_size']:,} samples); {s['repeat']} rounds, every"
        " contender once per round; median (min–max).",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores,"
        f" {memory_gib(m)} GiB; {m.get('platform')}; Python {m.get('python')}, numpy"
        f" {v.get('numpy')}, TF {v.get('tensorflow')}, torch {v.get('torch')}, datasets"
        f" {v.get('datasets')}, pyarrow {v.get('pyarrow')}, webdataset {v.get('webdataset')},"
        f" tfrecord {v.get('tfrecord')}; {checkout_text(res)}. Load average (1/5/15 min) before"
        f" {_loads(load['before'])}, after {_loads(load['after'])}.",
        "",
        "**This machine has 2 cores**: with `num_workers=2` the two worker processes compete"
        " with the main process (which takes the batches from their shared-memory ring and counts them), and TF's"
        " threads share the same two cores.",
        "",
        f"Shards (`dlpipe.reshard`, dlpipe's defaults, {s['num_shards']} shards; encodings as"
        " the manifest chose them): "
        + "; ".join(
            f"{fmt} ({c['compression'] or 'uncompressed'}, {c['shard_bytes'] / 1e6:.1f} MB): "
            + ", ".join(
                f"`{n}` {v['encoding']} {v['storage_dtype']}" for n, v in c["columns"].items()
            )
            for fmt, c in res["shards"].items()
        )
        + ".",
        "",
    ]
    for side, title in (("tf", "TF side"), ("torch", "PyTorch side")):
        rows = [r for r in res["runs"] if r["side"] == side]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| run | samples/s | real tokens/s | tokens/ sample | padded length | padding eff."
            " | CPU own / others | CPU µs/ sample | setup s | what |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| `{r['name']}` | {_k(r['samples_per_s'])} ({_k(r['samples_per_s_min'])}–"
                f"{_k(r['samples_per_s_max'])}) | {_k(r['tokens_per_s'])}"
                f" ({_k(r['tokens_per_s_min'])}–{_k(r['tokens_per_s_max'])})"
                f" | {r['tokens_per_sample']:.1f} | {r['mean_padded_length']:.1f}"
                f" | {r['padding_efficiency']:.3f}"
                f" | {r['own_cpu_per_s']:.2f} / {r['others_cpu_per_s']:.2f}"
                f" | {r['own_cpu_us_per_sample']:.1f} | {r['setup_seconds']:.2f} | {r['what']} |"
            )
        lines.append("")
    lines += [
        "## Ratios and targets (median samples/s)",
        "",
        "| | runs | value | goal | |",
        "|---|---|---|---|---|",
    ]
    for t in res["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['what']} | {t['pair']} | {value} | {t['goal']} | {t['verdict']} |")
    lines.append("")
    for key, title in (("failed", "Failed"), ("skipped", "Skipped")):
        if res.get(key):
            lines += [f"## {title}", ""]
            lines += [f"- `{n}`: {why}" for n, why in res[key].items()]
            lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def _loads(avg: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in avg)
