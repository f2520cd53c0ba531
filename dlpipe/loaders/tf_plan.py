"""tf.data over dlpipe's epoch plan: the shuffled (and split over ranks) pipelines of ``to_tf_dataset``.

A shuffle that mixes the whole split permutes small blocks of records across it
(``dlpipe.loaders.common.epoch_pieces``), so reading jumps around inside files.
``TFRecordDataset`` reads a file front to back only, and a dataset op per block
(``FixedLengthRecordDataset`` at the block's offset, inside ``interleave``) measured 8x slower
than the whole sequential pipeline (56k vs 440k samples/s on 2 cores, 36-record blocks). So
these pipelines take their records from dlpipe's reader, in Python, a few numpy calls per
window or batch, never per record; ``parse_example`` and padding then run in the graph as on
every other path. The batches hold the same records in the same order as the PyTorch loader's.

**Elements by number** (``PlannedEpochs``): one epoch of this rank is the plan's list of windows
(``ds.plan_windows``, a pure function of seed, epoch, rank and settings) cut into numbered
elements, and element k of epoch e is made from (e, k) alone. The graph::

    from_tensors ─ map(py: the next epoch, its element count) ─ flat_map(range(count))
      ─ map(py: element (e, k) as bytes and offsets) ─ map(cut / parse) ─ unbatch

So ``tf.train.Checkpoint(iterator=it)`` saves the epoch (flat_map keeps its input element), the
position in ``range`` and the elements already made (map and prefetch buffers, a few MB), and a
restored iterator asks for element k + 1 of epoch e: the batches an uninterrupted run gives
next. The Python calls keep no state TensorFlow must save (``ExternalStatePolicy.IGNORE``).
The epoch travels with a fingerprint of its plan (a hash of its windows' record ranges and
elements, ``_fingerprint``), which the checkpoint keeps beside it: restored into a dataset
built with other arguments (another plan for that epoch), the iterator raises ``ConfigError``
at once instead of playing the other plan from the saved position (records skipped or
repeated unseen).

**Reading.** Uncompressed local shards (or cached copies of remote ones) are memory-mapped, and
element k reads its windows alone, on tf.data's parallel calls (a few copies of the reader).
Compressed shards are decompressed whole and object storage is read ahead (``read_windows``), so
there an element goes on with the read stream the previous one left, one call at a time; a
stream starts at element k where none waits there (the first element, or after a restore).
The records are the same either way.

**Batches** (``planned_batches``): an element is a run of windows' full batches, at least
``_CHUNK_RECORDS`` records (Python costs ~0.5 ms per element on 2 cores), as the windows' bytes
as read with each record's offset in batch order; one ``tf.strings.substr`` cuts them into a
``[k, batch]`` block that ``unbatch`` splits into batches. The epoch's last, short batch is an
element of its own.

**Epochs.** Each new iterator (each Keras epoch) plays the next epoch: ``ds.epoch``, then
``ds.epoch + 1``, ... A restored iterator plays the epoch it saved, and the next new iterator
of that dataset the one after it. A shard is checked against its manifest SHA-256 once per
process (record CRCs only where that differs), so a corrupt shard is named by a dlpipe
``FormatError``. The Python calls cannot be serialized: ``tf.distribute`` shards these
pipelines by data, not by file.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.errors import ConfigError
from dlpipe.loaders.common import Window, buffer_batches, window_batches
from dlpipe.loaders.windows import read_windows

tf = require("tensorflow", "dlpipe's tf.data loader (to_tf_dataset)")

# (windows' bytes, record starts and lengths in batch order, records per batch)
_SPEC = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
         tf.TensorSpec([], tf.int64))
# least records per element of planned_batches: the Python call and the element's trip through
# tf.data cost ~0.5 ms each, so many batches travel together as one [k, batch] block
_CHUNK_RECORDS = 8192
_PLANS_KEPT = 3  # epochs whose plans are kept (iterators of consecutive epochs may overlap)
_STREAMS_KEPT = 4  # paused read streams kept (one per live iterator; abandoned ones are closed)
# parallel element calls, each with a copy of the reader: reading is mostly Python (the GIL),
# and each copy keeps up to shard_reader.MAPS_KEPT files mapped
_READERS = 4


@dataclass(frozen=True)
class Element:
    """Element of an epoch: windows ``[lo, hi)`` of its list, and ``part``, what ``make`` takes of them."""

    lo: int
    hi: int
    part: Any = None


MakeElement = Callable[[int, Element, Sequence[Window], list[Any]], tuple]


def _same(data: tf.data.Dataset) -> tf.data.Dataset:
    return data


def _fingerprint(windows: Sequence[Window], elements: Sequence[Element]) -> int:
    """An epoch plan's fingerprint (63 bits of a SHA-256 of its windows' record ranges and how
    elements group them): the same in every process that builds the dataset with the same
    arguments."""
    digest = hashlib.sha256()
    for w in windows:
        digest.update(np.asarray(w.ranges, np.int64).tobytes() + b";")
    digest.update(np.asarray([(e.lo, e.hi) for e in elements], np.int64).tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


class PlannedEpochs:
    """The elements of ``ds``'s epochs for tf.data, by (epoch, number); see the module docstring.

    ``plan(epoch)``: this rank's windows; ``group(windows)``: the elements (default: one per
    window); ``make(epoch, element, windows, reads)``: an element's numpy values from its windows
    and their serialized records (``read_windows``' (bytes, starts, ends); ragged columns if not
    ``serialized``; None for a window without records). ``epoch``: the one the first iterator
    plays."""

    def __init__(self, ds: Any, *, plan: Callable[[int], list[Window]], make: MakeElement, epoch: int,
                 group: Callable[[list[Window]], list[Element]] | None = None, serialized: bool = True) -> None:
        self.reader, self.shards, self.serialized = ds.reader(), ds.shards, serialized
        self._plan_fn, self._make, self._next = plan, make, int(epoch)
        self._group = group or (lambda windows: [Element(i, i + 1) for i in range(len(windows))])
        info = self.reader.info
        # memory maps read any window at once; decompressing or fetching wants a stream
        self.random_access = info.compression is None and (not info.remote or self.reader.cache_dir is not None)
        self._lock = threading.Lock()
        self._plans: OrderedDict[int, tuple[list[Window], list[Element], int]] = OrderedDict()
        self._streams: OrderedDict[tuple[int, int], Iterator[tuple]] = OrderedDict()
        self._indexed: set[int] = set()  # shards whose indexes the reader holds
        self._idle: list[Any] = []  # copies of the reader for random access, not in use
        self._made = 0
        self._idle_changed = threading.Condition()

    def next_epoch(self) -> tuple[np.int64, np.int64]:
        """The epoch a new iterator plays, and its plan's fingerprint."""
        with self._lock:
            epoch, self._next = self._next, self._next + 1
        return np.int64(epoch), np.int64(self.fingerprint(epoch))

    def enter(self, epoch: Any, fingerprint: Any) -> np.int64:
        """``epoch``'s element count, as an iterator starts it or is restored into it (then the
        next new iterator plays the epoch after it, as in the run that saved it). A restored
        ``fingerprint`` that is not this dataset's plan's is refused."""
        epoch = int(epoch)
        with self._lock:
            self._next = max(self._next, epoch + 1)
        if int(fingerprint) != self.fingerprint(epoch):
            raise ConfigError(
                "this tf.data iterator was restored from a checkpoint of a dataset built with other arguments "
                f"(epoch {epoch} of its plan is not this dataset's: another seed, dataset, buffer size, "
                "packing window or rank); build the dataset with the arguments it had when the checkpoint "
                "was written, or start a fresh iterator")
        return np.int64(len(self.plan(epoch)[1]))

    def fingerprint(self, epoch: int) -> int:
        """``_fingerprint`` of ``epoch``'s plan."""
        return self._planned(epoch)[2]

    def plan(self, epoch: int) -> tuple[list[Window], list[Element]]:
        """``epoch``'s windows and elements (kept for the last few epochs)."""
        windows, elements, _ = self._planned(epoch)
        return windows, elements

    def _planned(self, epoch: int) -> tuple[list[Window], list[Element], int]:
        with self._lock:
            if epoch not in self._plans:
                windows = self._plan_fn(epoch)
                self._load_indexes(windows)
                elements = self._group(windows)
                self._plans[epoch] = (windows, elements, _fingerprint(windows, elements))
                while len(self._plans) > _PLANS_KEPT:
                    self._plans.popitem(last=False)
            self._plans.move_to_end(epoch)
            return self._plans[epoch]

    def element(self, epoch: Any, k: Any) -> tuple:
        """Element ``k`` of ``epoch`` (numpy scalars from tf.data)."""
        epoch, k = int(epoch), int(k)
        if self.random_access:
            reader = self._borrow()
            stream = self._stream(reader, epoch, k, k + 1)
            try:
                return next(stream)
            finally:
                stream.close()
                with self._idle_changed:
                    self._idle.append(reader)
                    self._idle_changed.notify()
        with self._lock:
            stream = self._streams.pop((epoch, k), None)
        count = len(self.plan(epoch)[1])
        if stream is None:  # a copy of the reader: it keeps this stream's decompressed shard
            stream = self._stream(copy.copy(self.reader), epoch, k, count)
        out = next(stream)
        if k + 1 == count:
            stream.close()
            return out
        with self._lock:  # (an iterator of the same epoch at the same place reads the same)
            stale = [self._streams.pop((epoch, k + 1), None)]
            self._streams[(epoch, k + 1)] = stream
            while len(self._streams) > _STREAMS_KEPT:
                stale.append(self._streams.popitem(last=False)[1])
        for s in stale:
            if s is not None:
                s.close()
        return out

    def dataset(self, signature: Sequence[Any], *, parallel: int, deterministic: bool,
                then: Callable[[tf.data.Dataset], tf.data.Dataset]) -> tf.data.Dataset:
        """Each iterator's epoch: its elements as tensors of ``signature`` (``tf.TensorSpec``s),
        through ``then`` (the rest of the epoch's pipeline, prefetch included)."""
        dtypes = tuple(s.dtype for s in signature)

        def call(epoch: np.int64, k: np.int64) -> tuple:
            values = self.element(epoch, k)  # numpy_function wants the exact dtypes
            return tuple(v if d == tf.string else np.asarray(v, d.as_numpy_dtype) for v, d in zip(values, dtypes))

        def element(epoch: tf.Tensor, k: tf.Tensor) -> tuple:
            values = tf.numpy_function(call, [epoch, k], dtypes)
            for value, spec in zip(values, signature):
                value.set_shape(spec.shape)
            return tuple(values)

        def one_epoch(epoch: tf.Tensor, fingerprint: tf.Tensor) -> tf.data.Dataset:
            # flat_map keeps ``epoch`` and its plan's fingerprint in a checkpoint until its
            # pipeline has ended, and calls this again when it is restored (``enter``). That
            # pipeline is the whole rest of the graph: a buffer after flat_map would end the
            # epoch's pipeline before its last batches
            count = tf.reshape(tf.numpy_function(self.enter, [epoch, fingerprint], tf.int64), [])
            numbered = tf.data.Dataset.range(count)
            if self.random_access:  # as many calls as readers: more would wait for one
                calls = _READERS if parallel == tf.data.AUTOTUNE else min(parallel, _READERS)
                data = numbered.map(lambda k: element(epoch, k), num_parallel_calls=calls,
                                    deterministic=deterministic)
            else:  # a stream is read in order
                data = numbered.map(lambda k: element(epoch, k))
            return then(data)

        def next_epoch(_: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            epoch, fingerprint = tf.numpy_function(self.next_epoch, [], (tf.int64, tf.int64))
            return tf.reshape(epoch, []), tf.reshape(fingerprint, [])

        return tf.data.Dataset.from_tensors(np.int64(0)).map(next_epoch).flat_map(one_epoch)

    def _stream(self, reader: Any, epoch: int, k: int, stop: int) -> Iterator[tuple]:
        """Elements ``[k, stop)`` of ``epoch``, their windows read in order, each once."""
        windows, elements = self.plan(epoch)
        todo = elements[k:stop]
        first, end = todo[0].lo, max(e.hi for e in todo)
        reads = read_windows(reader, self.shards, [w for w in windows[first:end] if w.ranges],
                             serialized=self.serialized)
        held: dict[int, Any] = {}
        at = first
        try:
            for e in todo:
                for i in [i for i in held if i < e.lo]:
                    del held[i]
                while at < e.hi:
                    held[at] = next(reads) if windows[at].ranges else None
                    at += 1
                yield self._make(epoch, e, windows[e.lo : e.hi], [held[i] for i in range(e.lo, e.hi)])
        finally:
            reads.close()

    def _borrow(self) -> Any:
        """A copy of the reader no other call is using (a reader's memory maps are not shared
        between threads); at most ``_READERS`` are made, as each keeps a file open per shard."""
        with self._idle_changed:
            while not self._idle and self._made >= _READERS:
                self._idle_changed.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
        return copy.copy(self.reader)

    def _load_indexes(self, windows: list[Window]) -> None:
        """Have the reader hold the indexes of the shards ``windows`` read before copies of it are
        made (a copy leaves those still being fetched behind)."""
        new = [s for s in dict.fromkeys(s for w in windows for s, _, _ in w.ranges) if s not in self._indexed]
        if not new:
            return
        self.reader.load_indexes(self.shards[s] for s in new)
        for s in new:
            self.reader.index(self.shards[s])
        self._indexed.update(new)  # (copies made before load the new ones themselves)


def planned_batches(ds: Any, batch_size: int, *, seed: int, drop_remainder: bool, shuffle: bool = True,
                    world_size: int = 1, rank: int = 0, uneven: str = "pad", parallel: int = -1,
                    deterministic: bool = True, then: Callable[[tf.data.Dataset], tf.data.Dataset] = _same,
                    ) -> tf.data.Dataset:
    """``[b]`` string vectors, through ``then``: the serialized records of each batch of ``ds``'s
    epochs for this rank, batch by batch as ``to_torch_dataloader(batch_size=batch_size,
    world_size=world_size, rank=rank)`` makes them (ranks take equal record ranges of the epoch
    order, so any number of ranks works with any number of shards)."""
    config = ds.shuffle_config
    per_window = buffer_batches(config.buffer_size, batch_size)
    block_records = ds.block_records if shuffle else None

    def plan(epoch: int) -> list[Window]:
        return ds.plan_windows(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                               window_batches=per_window, drop_last=drop_remainder, world_size=world_size,
                               rank=rank, uneven=uneven, block_records=block_records)

    def make(epoch: int, element: Element, windows: Sequence[Window], reads: list[Any]) -> tuple:
        # the windows' bytes as read, cut in batch order by substr: gathering each batch's
        # records in numpy first (an index per byte) cost most of the Python time
        bufs, starts, lengths, rows, shift = [], [], [], batch_size, 0
        for window, (buf, first, ends) in zip(windows, reads):
            picked = [r for r in window_batches(window, None, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                                epoch=epoch, rank=rank) if (len(r) < batch_size) == element.part]
            if picked:
                order = np.concatenate(picked)
                starts.append(first[order] + shift)
                lengths.append((ends - first)[order])
                rows = len(picked[0])
            bufs.append(np.asarray(buf).data)
            shift += len(buf)
        return b"".join(bufs), np.concatenate(starts), np.concatenate(lengths), rows

    epochs = PlannedEpochs(ds, plan=plan, make=make, epoch=config.epoch,
                           group=lambda windows: _chunks(windows, batch_size))
    shape = [-1, batch_size] if drop_remainder else None

    def cut(chunk: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        # unbatch of [k, rows] rather than rebatch: rebatch's slices share the chunk's buffer, and
        # slicing them again downstream makes TensorFlow log an error per batch (tf_remote.py)
        return tf.reshape(tf.strings.substr(chunk, starts, lengths), shape or tf.stack([-1, rows]))

    return epochs.dataset(_SPEC, parallel=parallel, deterministic=deterministic,
                          then=lambda data: then(data.map(cut).unbatch()))


def _chunks(windows: list[Window], batch_size: int) -> list[Element]:
    """Runs of windows with at least ``_CHUNK_RECORDS`` records in full batches (``part`` False),
    and the epoch's last, short batch on its own (``part`` True): a ``[k, rows]`` block each."""
    out, lo, records = [], 0, 0
    for i, w in enumerate(windows):
        records += w.num_records // batch_size * batch_size
        if w.num_records % batch_size:
            if records:
                out.append(Element(lo, i + 1, False))
            out.append(Element(i, i + 1, True))
            lo, records = i + 1, 0
        elif records >= _CHUNK_RECORDS:
            out.append(Element(lo, i + 1, False))
            lo, records = i + 1, 0
    if records:
        out.append(Element(lo, len(windows), False))
    return out
