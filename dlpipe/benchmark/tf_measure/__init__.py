"""The TensorFlow measurer of ``dlpipe bench``: stages alone, the whole pipeline, baselines, devices.

The orchestrator calls the four functions of the contract (``dlpipe.benchmark.config``) in a
process pinned to its CPU share; each returns ``FrameworkResult``s. How each number is made:

- **Stages alone**, as tf.data pipelines iterated eagerly (one ``next()`` per batch, as a training
  loop consumes them) over the first ``steps × batch_size`` records of this rank's shard files
  (file i belongs to rank i % world_size); each pipeline is iterated once untimed (page cache,
  ``cache()`` filled) and then ``repeats`` times, the median pass kept. ``read``:
  ``TFRecordDataset`` unparsed (records grouped into batches of serialized strings so Python
  sees one element per batch), or for shuffled uncompressed shards the loader's read through the
  epoch plan (``loaders.tf_plan``); ``parse``: ``tf.io.parse_example`` + decode to ragged columns
  on cached batches of serialized records; ``shuffle``: the plan's permutation and gather of
  serialized records on windows read beforehand (compressed shards: ``shuffle(1000)`` over
  cached serialized records, then grouped into batches); ``batch``: ``padded_batch`` (padding to the batch's
  longest record, the padding rule, with the mask) over cached parsed records; ``h2d``: prepared
  batches copied to the GPU (``tf.identity`` under ``tf.device``, synchronized by reading back a
  scalar), on CPU a ``DeepCopy`` (no transfer exists); ``step``: the model alone on one batch.
- **Pipeline**: ``repeats`` × (``warmup`` + ``steps``) batches of ``to_tf_dataset`` into the model;
  per step the wait in ``next(iterator)`` (plus the copy to the GPU for a stand-in model) and the
  model time, forced to finish with ``.numpy()``. ``wait_s``/``compute_s`` are the last repeat's.
  tf.data exposes no prefetch-buffer occupancy (``StatsOptions`` is gone from TF 2.x), so
  ``pipeline_queue_samples`` is None.
- **Padding** (``cfg.padding``, ``dlpipe.benchmark.modes``): ``to_tf_dataset`` with that mode's
  arguments; ``batch`` times its rule (``fixed``: padded to the width; ``buckets``: windows sorted
  by bucket, padded to the boundary; ``packing``: ``window_stages.packed_stages``, the numpy
  packer whose plan the loader takes as numbered elements, whose read/parse are dlpipe's reader);
  ``h2d``, ``step`` and the pipeline run at the mode's real batch shapes.
- ``model``: ``none`` (the feed rate), ``sleep:MS`` (the calibrated step, MLPerf-Storage style) or
  ``deepcal`` (``dlpipe.models.deepcal_tf``'s real train step).
"""

from __future__ import annotations

from dlpipe.benchmark.tf_measure.baselines import measure_baselines
from dlpipe.benchmark.tf_measure.devices import measure_devices
from dlpipe.benchmark.tf_measure.pipeline import calibrate_step, measure_dlpipe

__all__ = ["calibrate_step", "measure_baselines", "measure_devices", "measure_dlpipe"]
