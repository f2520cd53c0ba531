"""What a PyTorch loader worker yields and how the main process takes it.

A batch is padded with numpy (``collate.collate``, under the loader's ``LoaderOptions``) or made
by the user's per-record ``collate_fn``. A worker sends a dict batch of numpy arrays through its
ring of reused shared-memory buffers (``torch_shm``: the main process makes tensors of it in
O(1)); when the ring is full (the user holds many batches) a batch of up to ``PIPE_BYTES`` goes
pickled through the result pipe, a bigger one as tensors (each of which PyTorch moves into its
own shared-memory segment). The loaders' iterators turn ring and numpy batches into tensors
and re-raise a ``WorkerError`` batch as the worker's own exception.

**Bundles.** Under dlpipe's own loader a worker sends its batches a few at a time, as one
``Bundle`` message: PyTorch's per-message machinery (the index queue, the result pipe, the
worker's and the main process's bookkeeping) costs about as much as making a small batch, so
one message per batch made ``num_workers=2`` slower than ``num_workers=0``. The loader's
iterator hands a bundle's batches out one by one; ``common.resume_point`` counts in bundles.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.columns import ColumnEncoding
from dlpipe.errors import DlpipeError
from dlpipe.loaders.collate import Ragged, collate, take_rows
from dlpipe.loaders.options import LoaderOptions
from dlpipe.loaders.torch_shm import to_slot
from dlpipe.loaders.transforms import Transform, apply_transforms, collate_records

torch = require("torch", "dlpipe's PyTorch loader")

PIPE_BYTES = 1 << 20
BUNDLE_RECORDS = 2048  # records per worker message, about
MAX_BUNDLE = 4  # batches per message, at most: each worker has prefetch_factor messages in flight
BUNDLE_BYTES = 16 << 20  # stored bytes per message, about


class FilteredBatch:
    """What a batch becomes when ``ds.filter`` removed every record of it: sent in its place, so
    the loaders' iterators count it (resume stays exact) and go on to the next batch."""


class Bundle(list):
    """Consecutive batches of one worker, sent as one DataLoader message (see the module
    docstring); a ``WorkerError`` can only be its last item."""


def bundle_size(records_per_batch: float, stored_bytes_per_record: float) -> int:
    """Batches per worker message: about ``BUNDLE_RECORDS`` records, at most ``MAX_BUNDLE``
    batches and about ``BUNDLE_BYTES`` of stored data (a few big batches go one per message)."""
    by_records = -(-BUNDLE_RECORDS // max(int(records_per_batch), 1))
    by_bytes = int(BUNDLE_BYTES // max(records_per_batch * stored_bytes_per_record, 1.0))
    return max(1, min(MAX_BUNDLE, by_records, by_bytes))


def bundled(batches: Iterator[Any], size: int, done: int) -> Iterator[Bundle]:
    """A worker's ``batches`` in bundles of ``size`` that end where its count of the epoch
    (``done`` batches before these) reaches a multiple of ``size`` (a resumed worker's first
    bundle is short, so the order lines up with ``common.resume_point``), at its last batch and
    after a ``WorkerError``."""
    count, bundle = done, Bundle()
    try:
        for batch in batches:
            bundle.append(batch)
            count += 1
            if count % size == 0 or isinstance(batch, WorkerError):
                yield bundle
                bundle = Bundle()
        if bundle:
            yield bundle
    finally:
        batches.close()


class WorkerError:
    """A DlpipeError caught in a loader worker, sent as a batch so the main process re-raises the
    original exception (PyTorch's ExceptionWrapper would rebuild it from its message alone, and
    FormatError's path and offset would be lost)."""

    def __init__(self, error: DlpipeError, worker_id: int) -> None:
        self.error = error
        self.worker_id = worker_id
        self.trace = traceback.format_exc()

    def reraise(self) -> None:
        err, self.error = self.error, None
        if hasattr(err, "add_note"):
            err.add_note(
                f"raised in DataLoader worker process {self.worker_id}; worker traceback:\n"
                f"{self.trace}"
            )
        try:
            raise err
        finally:
            # no frame of this traceback may hold the exception: that cycle would leave the
            # DataLoader iterator to the garbage collector, whose shutdown of workers hangs
            del err


def numpy_to_tensors(batch: dict[str, Any], pin: bool = False) -> dict[str, Any]:
    """The numpy arrays of a dict batch as tensors (zero copy unless pinned)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if pin:
                v = v.pin_memory()
        out[k] = v
    return out


def identity(batch: Any) -> Any:
    """The DataLoader's collate_fn: the dataset already yields finished batches."""
    return batch


def make_batch(
    cols: Mapping[str, Ragged],
    rows: np.ndarray,
    encodings: Mapping[str, ColumnEncoding],
    pad_values: Mapping[str, Any],
    options: LoaderOptions,
    boundaries: list[int] | None,
    collate_fn: Callable[[list[dict[str, np.ndarray]]], Any] | None,
    *,
    in_worker: bool,
    transforms: tuple[Transform, ...] = (),
) -> Any:
    """The batch of window ``cols``'s ``rows``: padded under ``options`` (or ``collate_fn`` of
    the records), dict batches as tensors, or as numpy arrays when small and ``in_worker``."""
    if transforms:  # ds.map / ds.filter: on the batch's records, then padded as records
        recs = apply_transforms(records(cols, rows, encodings), transforms)
        if not recs and collate_fn is None:
            return FilteredBatch()
        out = collate_fn(recs) if collate_fn is not None else collate_records(
            recs, encodings, pad_values, pad_to_multiple_of=options.pad_to_multiple_of, boundaries=boundaries,
            padding_side=options.padding_side, return_attention_mask=options.return_attention_mask)
    elif collate_fn is not None:
        out = collate_fn(records(cols, rows, encodings))
    else:
        out = collate(
            {n: cols[n] for n in encodings},
            encodings,
            pad_values,
            rows=rows,
            pad_to_multiple_of=options.pad_to_multiple_of,
            boundaries=boundaries,
            padding_side=options.padding_side,
            return_attention_mask=options.return_attention_mask,
        )
    return transport(out, in_worker)


def transport(out: Any, in_worker: bool) -> Any:
    """A dict batch of numpy arrays as it leaves the dataset: in a worker, through the worker's
    shared-memory ring (``torch_shm``), or when that is full pickled (small) or as tensors;
    in the main process as tensors (see the module docstring)."""
    if not isinstance(out, dict):
        return out
    if in_worker:
        sent = to_slot(out)
        if sent is not None:
            return sent
    if in_worker and sum(v.nbytes for v in out.values() if isinstance(v, np.ndarray)) <= PIPE_BYTES:
        return out  # pickled through the pipe; the loader's iterator makes the tensors
    return numpy_to_tensors(out)


def records(
    cols: Mapping[str, Ragged], rows: np.ndarray, encodings: Mapping[str, ColumnEncoding]
) -> list[dict[str, np.ndarray]]:
    """Rows of a window as per-record dicts (variable columns unpadded), for a ``collate_fn``."""
    out: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, enc in encodings.items():
        values, splits = take_rows(cols[name], rows)
        inner = tuple(enc.shape[1:]) if enc.variable else tuple(enc.shape)
        for rec, part in zip(out, np.split(values, splits[1:-1])):
            rec[name] = part.reshape((-1, *inner)) if enc.variable else part.reshape(inner)
    return out
