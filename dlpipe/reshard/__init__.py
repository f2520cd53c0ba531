"""The write side: reshard a padded source into shards, manifest last.

1. **Scan** (``scan``, in parallel, by record ranges): every record's real length, each integer
   column's value range (which picks its storage dtype) and what the padded regions hold.
2. **Shard plan** (``plan``): split, optionally shuffle, and cut shards balanced by bytes or
   tokens.
3. **Write** (``write``): one task per shard, run by an executor (``executors``: this process with
   helper processes, or Ray). A shard is a pure function of the shard plan, so output is
   byte-identical for any worker count. Each shard goes to a hidden temporary name, is synced,
   and renamed (index first, data last) when complete; a note in ``.dlpipe/done`` records its
   stats. A rerun with the same plan skips finished shards, so a crash resumes where it stopped
   (``output_dir``; one run per output at a time: ``output_lock``).
4. **Manifest**: ``dataset_info.json`` is written last; its presence means the dataset is whole.

``api`` holds the public ``reshard`` that runs these steps, and its ``ReshardSummary``.
"""

from dlpipe.reshard.api import ReshardSummary, reshard

__all__ = ["ReshardSummary", "reshard"]
