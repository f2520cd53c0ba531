"""The ``dlpipe`` command: a thin click shell; each command calls the Python API of the same name."""

from __future__ import annotations

import functools
import sys
import traceback

import click

from dlpipe.defaults import MASK_COLUMN
from dlpipe.errors import DlpipeError


def _debug_option(f):
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                        callback=lambda ctx, _p, v: ctx.ensure_object(dict).update(debug=True) if v else None,
                        help="Show the full traceback on errors.")(f)


def _friendly_errors(f):
    """One line on stderr and exit 1 for dlpipe errors; tracebacks only with --debug."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().ensure_object(dict).get("debug") or ctx.ensure_object(dict).get("debug")
        try:
            return f(*args, **kwargs)
        except DlpipeError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"dlpipe: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("dlpipe: interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as e:  # a bug: say so in one line unless asked for details
            if debug:
                raise
            click.echo(f"dlpipe: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                       "traceback, and please report it)", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dlpipe")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dlpipe: fast deep-learning input pipelines.

    \b
    dlpipe reshard   padded fixed-length data -> parallel variable-length shards
    dlpipe inspect   what a source or a dataset holds (schema, padding waste)
    dlpipe verify    re-read every shard and check it against the manifest
    dlpipe bench     profile TF and PyTorch input pipelines, name the bottleneck
    """
    ctx.ensure_object(dict)["debug"] = debug


_SOURCE_HELP = """
\b
SOURCE may be:
  NAME=path.npy ...        one column per .npy file (NAME defaults to the file stem)
  path.npz                 every array of the archive is a column
  path.bin --layout L      raw fixed-width records; L like 'input_ids:int32[128],labels:float32[2]'
  path.tfrecord[.gz]       tf.train.Examples with fixed-length (padded) features
  DIR | *.parquet          a HF save_to_disk directory, or Parquet files
  path.h5[:a,b]            HDF5 datasets
"""


def _storage_option(f):
    return click.option(
        "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
        help="Passed to the fsspec filesystem of every URL (repeatable), e.g. endpoint_url=http://127.0.0.1:9000 "
        "or profile=dev; credentials otherwise come from the environment (AWS_*, ~/.aws). Never logged.")(f)


def _storage_options(pairs) -> dict:
    from dlpipe.storage import parse_storage_options

    return parse_storage_options(list(pairs))


def _padding_options(f):
    for opt in reversed([
        click.option("--pad-id", type=int, help="Trailing (or leading, with --padding-side left) runs of this "
                     "id are padding. A pad id inside a sequence is kept."),
        click.option("--lengths-column", metavar="NAME", help="A column holding each record's real length."),
        click.option("--mask-column", metavar="NAME", default=MASK_COLUMN, show_default=True,
                     help="A 0/1 mask column marking real positions (HF tokenizers' attention_mask)."),
        click.option("--padding-side", type=click.Choice(["auto", "right", "left"]), default="auto",
                     show_default=True, help="Where padding is; auto reads it from the mask (right for --pad-id)."),
        click.option("--layout", metavar="L", help="Record layout of raw binary input, e.g. "
                     "'input_ids:int32[128],labels:float32[2]'."),
        click.option("--header-bytes", type=int, default=0, show_default=True, help="Bytes to skip at the start "
                     "of each raw binary file."),
    ]):
        f = opt(f)
    return f


@main.command(epilog=_SOURCE_HELP)
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("-o", "--output", required=True, metavar="DIR", help="Directory or URL (s3://bucket/prefix, "
              "gs://..., file://...) for shards, index files and dataset_info.json.")
@click.option("-f", "--format", "fmt", type=click.Choice(["tfrecord", "webdataset"]), default="tfrecord",
              show_default=True, help="Shard format.")
@click.option("--compression", type=click.Choice(["auto", "none", "gzip", "zlib"]), default="auto",
              show_default=True, help="Compress shards: TFRecord gzip/zlib as TFRecordOptions define them; "
              "WebDataset gzip (.tar.gz). auto: gzip for WebDataset (tar headers cost 1 KiB per member), "
              "none for TFRecord.")
@click.option("--num-shards", type=int, help="Shards for the largest split (others in proportion).")
@click.option("--shard-size", metavar="SIZE", help="Target bytes per shard, e.g. 256MB (default when "
              "--num-shards is not given).")
@click.option("--num-shards-multiple-of", type=int, default=1, show_default=True, metavar="K",
              help="Round shard counts up to a multiple of K (GPUs x loader workers) so they divide evenly.")
@click.option("--balance-by", type=click.Choice(["bytes", "tokens"]), default="bytes", show_default=True,
              help="Balance shards by estimated bytes or by tokens.")
@click.option("-j", "--workers", type=int, help="Worker processes (default: all cores). Output is identical "
              "for any count.")
@click.option("--shuffle/--no-shuffle", default=False, show_default=True, help="Globally shuffle records.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle.")
@click.option("--split", "splits", metavar="NAME=FRAC,...", help="Named splits, e.g. train=0.9,validation=0.1 "
              "(taken in order after the shuffle).")
@_padding_options
@click.option("--sequence-columns", metavar="A,B", help="Columns padded along their first axis (default: the "
              "integer columns as wide as the widest, or as the mask).")
@click.option("--columns", metavar="A,B", help="Write only these columns (Arrow/Parquet: read only these, "
              "e.g. to leave out text columns).")
@click.option("--no-strip", is_flag=True, help="Keep every column fixed-length (no padding to remove).")
@click.option("--keep-mask", is_flag=True, help="Also store the mask/lengths column (derivable, so dropped by "
              "default).")
@click.option("--int-encoding", type=click.Choice(["auto", "raw", "int64_list"]), default="auto",
              show_default=True, help="raw: narrowest lossless little-endian values (fastest to read); "
              "int64_list: TF-native varints; auto: whichever is smaller for each integer column.")
@click.option("--overwrite", is_flag=True, help="Replace dlpipe output already in DIR.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal only).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process and forked helpers on this machine; ray: one Ray task per shard on a Ray cluster "
              "(byte-identical output; failed tasks are retried).")
@click.option("--ray-address", metavar="ADDR", help="Ray cluster to join (e.g. ray://head:10001 or auto); "
              "default: the running one, else a local instance.")
@_storage_option
@_debug_option
@_friendly_errors
def reshard(sources, output, fmt, compression, num_shards, shard_size, num_shards_multiple_of, balance_by,
            workers, shuffle, seed, splits, pad_id, lengths_column, mask_column, padding_side, layout,
            header_bytes, sequence_columns, columns, no_strip, keep_mask, int_encoding, overwrite, progress,
            engine, ray_address, storage_option):
    """Reshard padded fixed-length SOURCE data into variable-length shards.

    Strips the padding of sequence columns, plans shards balanced by bytes or tokens, writes
    them in parallel (each to a temporary name, renamed when complete) with an "offset size"
    index per shard, and writes dataset_info.json last. Rerunning after a crash completes only
    what is missing.

    \b
    Examples:
      dlpipe reshard input_ids=ids.npy labels=labels.npy -o shards/ --pad-id 0 --num-shards 16
      dlpipe reshard input_ids=s3://corpus/ids.npy labels=s3://corpus/labels.npy \\
          -o s3://corpus/shards --pad-id 0 --engine ray --ray-address auto
    """
    from dlpipe.reshard import reshard as run

    seq = [] if no_strip else (sequence_columns.split(",") if sequence_columns else None)
    summary = run(
        list(sources), output, format=fmt, compression=compression,
        num_shards=num_shards, shard_size=shard_size, num_shards_multiple_of=num_shards_multiple_of,
        balance_by=balance_by, workers=workers, shuffle=shuffle, seed=seed, splits=splits, pad_id=pad_id,
        lengths_column=lengths_column, mask_column=mask_column, padding_side=padding_side,
        sequence_columns=seq, keep_mask=keep_mask, int_encoding=int_encoding, layout=layout,
        header_bytes=header_bytes, columns=columns.split(",") if columns else None, overwrite=overwrite,
        progress=progress, engine=engine, ray_address=ray_address, storage_options=_storage_options(storage_option),
    )
    click.echo(str(summary))


@main.command(epilog=_SOURCE_HELP)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@_padding_options
@_storage_option
@_debug_option
@_friendly_errors
def inspect(paths, pad_id, lengths_column, mask_column, padding_side, layout, header_bytes, storage_option):
    """Describe a source (schema, padding waste, length histogram) or a dlpipe dataset directory
    (PATH may be a URL such as s3://bucket/shards)."""
    from dlpipe.inspect import inspect as run

    click.echo(run(list(paths), pad_id=pad_id, lengths_column=lengths_column, mask_column=mask_column,
                   padding_side=padding_side, layout=layout, header_bytes=header_bytes,
                   storage_options=_storage_options(storage_option)))


@main.command()
@click.argument("path", metavar="DIR")
@_storage_option
@_debug_option
@_friendly_errors
def verify(path, storage_option):
    """Re-read every shard of DIR (a directory or a URL such as s3://bucket/shards): CRCs, record
    and token counts, index files and checksums against dataset_info.json. Exits 1 on any mismatch."""
    from dlpipe.verify import verify as run

    report = run(path, storage_options=_storage_options(storage_option), raise_on_error=False)
    for problem in report.problems:
        click.echo(f"dlpipe: error: {problem}", err=True)
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give counts like 1,2") from None


def _workers(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give auto or a count like 2") from None


@main.command()
@click.argument("data", required=False, metavar="[DATA]")
@click.option("--frameworks", default="tf,torch", show_default=True, help="Frameworks to measure: tf, torch.")
@click.option("--cpu-procs", default="1,2", show_default=True, callback=_int_list,
              help="CPU data-parallel process counts; each process is pinned to its own CPU set (NUMA node "
              "where the host has them) and reads its own share of the shards.")
@click.option("--gpus", default="all", show_default=True, help="GPUs for the data-parallel run: all, none or "
              "ids like 0,1. Without GPUs the same code runs over 2 CPU devices (gloo; logical CPUs in TF).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--steps", type=int, default=100, show_default=True, help="Batches per timed repeat.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed repeats; the report gives median "
              "(min-max).")
@click.option("--model", default="deepcal", show_default=True, help="deepcal: calibrate a real DeepCAL step, "
              "then stand it in with a sleep of that length (MLPerf Storage's method); sleep:MS; none.")
@click.option("--num-workers", default="auto", show_default=True, callback=_workers, help="PyTorch DataLoader workers per "
              "measuring process: a count, or auto (one per CPU of the process's share when it has 2 or more, "
              "else 0: the same CPUs a tf.data pipeline spreads over).")
@click.option("--records", type=int, default=200_000, show_default=True, help="Size of the built-in corpus "
              "when DATA is omitted.")
@click.option("--profile", is_flag=True, help="Also write a torch.profiler and a TensorFlow profiler trace "
              "(open them with TensorBoard's profile plugin).")
@click.option("--padding", default="all", show_default=True, help="Padding modes whose training rows the "
              "1-process setting measures, each with the step calibrated at its batch shapes: all, or a list of "
              "fixed (pad to the source width), longest (pad to the batch's longest), buckets "
              "(bucket_boundaries=auto), packing (several records per row).")
@click.option("-o", "--output", default="bench-out", show_default=True, metavar="DIR",
              help="Where results.json, report.md, the plots and traces go.")
@_debug_option
@_friendly_errors
def bench(data, frameworks, cpu_procs, gpus, batch_size, steps, repeats, model, num_workers, records, profile,
          padding, output):
    """Profile TensorFlow and PyTorch input throughput, name the bottleneck, show parity.

    DATA is a dlpipe dataset, a padded source directory (input_ids.npy, labels.npy; resharded
    first), or omitted: then a DeepCAL-like corpus of real place names is built. For each
    framework, on 1 and 2 CPU processes and on every GPU: each stage timed alone (the
    constraint ledger), the whole pipeline, accelerator utilization at the model's step time,
    and the old padded-input paths for comparison. Writes results.json (stable schema),
    report.md and PNG plots to --output.
    """
    from dlpipe.benchmark.runner import run_bench

    results = run_bench(data, output=output, frameworks=[f.strip() for f in frameworks.split(",") if f.strip()],
                        cpu_procs=cpu_procs, gpus=gpus, batch_size=batch_size, steps=steps, repeats=repeats,
                        model=model, num_workers=num_workers, records=records, profile=profile, padding=padding,
                        say=lambda s: click.echo(f"dlpipe bench: {s}", err=True))
    for t in results["targets"]:
        state = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        click.echo(f"{state:4}  {t['name']}: {value} (goal {t['goal']})")
    click.echo(f"report: {output}/report.md, results: {output}/results.json")


if __name__ == "__main__":
    main()
