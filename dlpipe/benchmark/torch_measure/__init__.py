"""The PyTorch measurer of ``dlpipe bench``: stages alone, the whole pipeline, baselines, devices.

The orchestrator calls the four functions of the contract (``dlpipe.benchmark.config``) in a
process pinned to its CPU share; each returns ``FrameworkResult``s. How each number is made:

- **Stages alone**, on the windows this rank reads first (enough for ``steps`` batches), each
  timed ``repeats`` times after one untimed pass (warm page cache), the median pass kept:
  ``read`` copies the windows' byte ranges out of the page cache (``np.fromfile``); ``parse`` is
  ``ShardReader.read`` (index, CRC, decode); ``shuffle`` the window permutation + ``take_rows``;
  ``batch`` the padding rule (``collate``); ``h2d`` the copy of finished batches to the device
  from pinned memory (pageable too, in a note; on CPU a ``clone()``: no transfer exists);
  ``step`` the model alone on the first batches. Latencies are per batch (a window's time is
  spread over its batches).
- **Pipeline**: ``repeats`` × (``warmup`` + ``steps``) batches from ``to_torch_dataloader`` into
  the model; per step the wait for the batch (its copy to the device included) and the model
  time. ``wait_s``/``compute_s`` are from the last repeat; ``pipeline_queue_samples`` counts the
  batches waiting in the DataLoader's result queue before each step (the "batch" stage's
  ``queue_capacity`` is ``num_workers × prefetch_factor``); none with ``num_workers=0``.
- **Padding** (``cfg.padding``, ``dlpipe.benchmark.modes``): the loader's batches as that mode
  shapes them (``fixed``, ``longest``, ``buckets``, ``packing``); ``batch`` times that mode's rule
  (packing: ``window_stages.packed_stages``, the packer both loaders run), and ``h2d``, ``step``
  and the pipeline run at its real batch shapes; ``token_efficiency`` counts real tokens over
  computed ones on the timed batches. ``calibrate_step`` calibrates at the mode's shapes.
- ``model``: ``none`` (step 0: the feed rate), ``sleep:MS`` (the calibrated step, MLPerf-Storage
  style) or ``deepcal`` (the real train step, synchronized on CUDA so its time is real).
- **Baselines**: the padded source, one record per ``__getitem__`` (``PaddedRows``) through a
  ``DataLoader`` with default collate; every batch is the full padded width, and so is the step.
- **Devices**: one process per device (``torch.multiprocessing.spawn``), NCCL on GPUs or gloo on
  CPU, rank ``r`` of ``devices`` reading its own share (``cfg.world_size``/``rank`` are not used).
"""

from __future__ import annotations

from dlpipe.benchmark.torch_measure.baselines import measure_baselines
from dlpipe.benchmark.torch_measure.devices import measure_devices
from dlpipe.benchmark.torch_measure.pipeline import calibrate_step, measure_dlpipe

__all__ = ["calibrate_step", "measure_baselines", "measure_devices", "measure_dlpipe"]
