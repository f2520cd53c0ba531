"""What read-ahead buys when object storage is far away: the PyTorch loader over S3 with a
round-trip delay added to every request, read-ahead on (the default budget) and off.

A loopback S3 server answers in well under a millisecond, which hides what the loader's
read-ahead is for. Here a TCP proxy in front of the moto server delays every request by
``--latency-ms`` (as a far region or a busy endpoint would), and the loader reads one range
request per window (``request_bytes=0``) so that every window pays the delay:

- ``read-ahead``: ``prefetch_bytes`` at its default (32 MiB); upcoming windows are fetched on
  background threads while the current one is decoded
- ``no read-ahead``: ``prefetch_bytes=1``; each window is fetched when it is needed

    python bench/s3_latency_bench.py [--records 200000] [--latency-ms 0,25] [--repeat 3]

Results: ``bench/results/s3_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from results_io import dlpipe_checkout, provenance, record

from dlpipe.benchmark.corpus import build_corpus
from dlpipe.benchmark.machine import describe

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # the test suite's S3 server starter

import dlpipe  # noqa: E402


class DelayProxy:
    """Forwards 127.0.0.1:port to ``upstream``, holding each client->server chunk (a request)
    for ``delay`` seconds. Responses pass straight through."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port, self.delay = upstream_port, delay
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _pipe(self, reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pipe(reader, up_writer, self.delay), self._pipe(up_reader, writer, 0))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _epoch(url: str, options: dict, prefetch_bytes: int | None, batch_size: int) -> tuple[float, int, dict]:
    kw = {} if prefetch_bytes is None else {"prefetch_bytes": prefetch_bytes}
    ds = dlpipe.load_dataset(url, split="train", storage_options=options, request_bytes=0, **kw)
    loader = ds.to_torch_dataloader(batch_size=batch_size, num_workers=0, shuffle=True, seed=0)
    t = time.perf_counter()
    n = sum(len(b["input_ids"]) for b in loader)
    return time.perf_counter() - t, n, dict(ds.reader().stats)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from s3_server import S3Server

    corpus_dir = args.cache_dir / f"corpus-{args.records}"
    corpus = build_corpus(corpus_dir, args.records, 0)
    work = tempfile.mkdtemp(prefix="s3-latency-")
    server = S3Server(work)
    server.start()
    server.make_bucket("dlpipe")
    url = "s3://dlpipe/shards"
    dlpipe.reshard([f"input_ids={corpus_dir}/input_ids.npy", f"labels={corpus_dir}/labels.npy"], url,
                   pad_id=0, num_shards=8, shuffle=True, storage_options=server.storage_options, progress=False)
    runs = []
    try:
        for latency_ms in args.latency_ms:
            proxy = DelayProxy(server.port, latency_ms / 1000)
            options = {**server.storage_options, "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
            for name, budget in (("read-ahead", None), ("no read-ahead", 1)):
                rates, stats = [], {}
                for _ in range(args.repeat):
                    seconds, n, stats = _epoch(url, options, budget, args.batch_size)
                    rates.append(n / seconds)
                runs.append({"latency_ms": latency_ms, "name": name, "prefetch_bytes": stats.get("prefetch_bytes"),
                             "samples_per_s": {"median": statistics.median(rates), "min": min(rates),
                                               "max": max(rates)},
                             "requests": stats.get("requests"), "bytes_fetched": stats.get("bytes_fetched"),
                             "peak_buffered_bytes": stats.get("peak_buffered_bytes")})
                print(f"{latency_ms:>4} ms  {name:14} {statistics.median(rates):>10,.0f} samples/s", flush=True)
            proxy.stop()
    finally:
        server.stop()
    speedups = {}
    for latency_ms in args.latency_ms:
        on, off = (next(r for r in runs if r["latency_ms"] == latency_ms and r["name"] == n)
                   for n in ("read-ahead", "no read-ahead"))
        speedups[f"{latency_ms} ms"] = on["samples_per_s"]["median"] / off["samples_per_s"]["median"]
    return {
        "benchmark": "s3_latency",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["s3_latency_bench.py", *sys.argv[1:]]),
        "machine": describe(["s3fs", "moto"]),
        "dlpipe_measured": dlpipe_checkout(),
        "corpus": {k: v for k, v in corpus.items() if k != "reused"},
        "settings": {"repeat": args.repeat, "batch_size": args.batch_size, "num_shards": 8, "request_bytes": 0},
        "runs": runs,
        "read_ahead_speedup": speedups,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Read-ahead under request latency", "",
        provenance(result), "",
        f"PyTorch loader (num_workers=0, batch {result['settings']['batch_size']}, shuffled) over "
        f"{result['corpus']['num_records']:,} records in 8 uncompressed TFRecord shards on a moto S3 server, "
        "through a proxy that holds every request for the given delay; one range request per window "
        f"(request_bytes=0). {result['settings']['repeat']} epochs each, median (min-max).", "",
        "| added latency | run | samples/s | requests | MB fetched | peak buffered MB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        s = r["samples_per_s"]
        mb = (r["bytes_fetched"] or 0) / 1e6
        peak = (r["peak_buffered_bytes"] or 0) / 1e6
        lines.append(f"| {r['latency_ms']} ms | {r['name']} | {s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f}) "
                     f"| {r['requests']} | {mb:.1f} | {peak:.1f} |")
    lines += ["", "| added latency | read-ahead ÷ none |", "|---:|---:|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in result["read_ahead_speedup"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--latency-ms", type=lambda v: [int(x) for x in v.split(",")], default=[0, 25])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--render-only", action="store_true", help="rebuild s3_latency.md from the .json")
    args = p.parse_args(argv)
    return record(args.results_dir, "s3_latency", lambda: run_all(args), render, render_only=args.render_only)


if __name__ == "__main__":
    sys.exit(main())
