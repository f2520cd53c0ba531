"""The shuffle benchmark's markdown, from ``shuffle*.json`` alone (``--render-only``)."""

from __future__ import annotations

import math
from typing import Any

from results_io import memory_gib, provenance, versions_of


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


PEER_NOTE = (
    "Peers are converted from the same source arrays with their own writers (padding stripped,"
    " so every contender pads each batch to its longest record) and run with their default"
    " shuffle settings; seed 0 is passed where the API takes one. Conversion time is listed"
    " apart and not in samples/s. litdata's `optimize` ran with its default 2 workers (one per"
    " core), each writing its own chunk(s); its shuffle permutes chunks, then blocks of 256"
    " items within a chunk, then the items of a block."
)

NOTES = [
    "rank corr. r: Spearman's r between yield position and source position (`record_id`);"
    " 1.00 = source order, ~0 = no trace of it. mean displacement: mean |yield position -"
    " source position| / N; a uniform random permutation gives ~1/3. next = prev + 1: share of"
    " consecutive yields that are consecutive source records (runs left by a block or window"
    " shuffle); ~1/N for a uniform permutation.",
    "exactly once: the epoch yielded every record_id 0..N-1 once (no pads, drops or repeats)."
    " same order: the warm-up epoch and every timed epoch (each a fresh loader, epoch 0,"
    " seed 0) yielded the same order.",
    "samples/s: records in the epoch ÷ seconds from `iter(loader)` to the last item (worker"
    " start-up and drawing the epoch's order included; building the loader object is setup s),"
    " after one untimed warm-up epoch; median (min–max) of the timed epochs. CPU own / others:"
    " CPU-s per second of this benchmark's process tree and of the rest of the machine; a"
    " large *others* means something else competed for the 2 cores.",
    "The dlpipe rows read one shard written with dlpipe's default reshard options (no"
    " `--shuffle`), so the source order is the shard order: only the loader's shuffle can"
    " move records. Shuffle quality does not depend on the corpus content.",
    "Each group runs in its own child process with the same Python (TensorFlow and torch never"
    " share one).",
]


def render_markdown(res: dict[str, Any]) -> str:
    m, s, st, rs = res["machine"], res["settings"], res["dlpipe_measured"], res["reshard"]
    v = versions_of(m)
    dirty = st["uncommitted"]
    lines = [
        "# Shuffle benchmark" + (f" ({res['tag']})" if res.get("tag") not in (None, "current") else ""),
        "",
        provenance(res),
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, {memory_gib(m)}"
        f" GiB; {m.get('platform')}; Python {m.get('python')}, numpy {v.get('numpy')}, torch"
        f" {v.get('torch')}, TF {v.get('tensorflow')}, litdata {v.get('litdata')}, grain"
        f" {v.get('grain')}. Load average (1/5/15 min) before"
        f" {' / '.join(f'{x:.2f}' for x in res['load_average']['before'])}, after"
        f" {' / '.join(f'{x:.2f}' for x in res['load_average']['after'])}; whole run"
        f" {res['total_seconds']:.0f} s.",
        "",
        f"dlpipe measured: `{st['path']}` at commit {st['commit']} ({st['commit_subject']})"
        + (f", with uncommitted changes in {len(dirty)} file(s) under dlpipe/"
           f" ({', '.join('`' + d.split()[-1] + '`' for d in dirty)})" if dirty
           else ", no uncommitted changes under dlpipe/")
        + ".",
        "",
        f"Corpus: {res['corpus']['num_records']:,} DeepCAL-like records (`corpus.py`, seed"
        f" {res['corpus']['seed']}) plus `record_id` = 0..N-1; resharded with `{rs['call']}`"
        f" (dlpipe's defaults: {rs['num_shards']} shard(s), {rs['format']},"
        f" {rs['compression'] or 'uncompressed'}, split {', '.join(rs['splits'])}). Batch size"
        f" {s['batch_size']}, seed {s['seed']}; {s['warmup']}, then {s['repeat']} timed"
        " epochs, each a fresh loader.",
        "",
        "| run | records | samples/s | rank corr. r | mean displacement (share of N) |"
        " next = prev + 1 | exactly once | same order | setup s | CPU own / others | what |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|",
    ]
    for r in [*res["runs"], res["reference"]]:
        speed = (f"{_k(r['samples_per_s'])} ({_k(r['samples_per_s_min'])}–"
                 f"{_k(r['samples_per_s_max'])})" if "samples_per_s" in r else "—")  # fmt: skip
        once = "yes" if r["exactly_once"] else (
            f"no ({r['yielded']:,} yielded, {r['missing']} missing, {r['repeated']} repeated)"
            if r.get("missing") is not None else f"no ({r['yielded']:,} yielded, ids out of range)"
        )  # fmt: skip
        same = {True: "yes", False: "no", None: "—"}[r.get("same_order_every_epoch")]
        cpu = (f"{r['own_cpu_per_s']:.2f} / {r['others_cpu_per_s']:.2f}"
               if "own_cpu_per_s" in r else "—")  # fmt: skip
        setup = _f(r.get("setup_seconds"), ".2f")
        lines.append(
            f"| `{r['name']}` | {r['records']:,} | {speed} | {_f(r['rank_correlation'], '+.4f')}"
            f" | {_f(r['mean_displacement'], '.4f')} | {_f(r['next_is_prev_plus_1'], '.4f')}"
            f" | {once} | {same} | {setup} | {cpu} | {r['what']} |"
        )
    lines.append("")
    if res.get("peer_conversion"):
        lines += ["Peer conversions (not in samples/s):", ""]
        for peer, c in res["peer_conversion"].items():
            where = f"{c['files']} file(s), {c['bytes'] / 1e6:.1f} MB" if c["files"] else (
                f"in memory, {c['bytes'] / 1e6:.1f} MB")  # fmt: skip
            lines.append(f"- {peer}: {c['seconds']:.1f} s, {where}")
        lines.append("")
    for key, title in (("failed", "Failed"), ("left_out", "Left out")):
        if res.get(key):
            lines += [f"## {title}", ""] + [f"- `{n}`: {why}" for n, why in res[key].items()] + [""]
    peers = any(not r["name"].startswith("dlpipe-") for r in res["runs"])
    notes = [*NOTES, PEER_NOTE] if peers else NOTES
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
