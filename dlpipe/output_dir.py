"""The output directory's life cycle: fresh, resumed, already complete, or refused.

While a reshard runs, ``DIR/.dlpipe/plan.json`` holds the plan's hash and ``DIR/.dlpipe/done/``
one note per finished shard; shards are written under hidden ``.NAME.tmp`` names. A rerun with
the same plan reuses finished shards; the manifest, written last, marks the dataset complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

from dlpipe.errors import OutputError
from dlpipe.manifest import MANIFEST, ShardInfo, write_json_atomic

STATE_DIR = ".dlpipe"
_SHARD_FILE = r"^[A-Za-z0-9_]+-\d{5}-of-\d{5}\.(tfrecord|tar)(\.gz|\.zz)?(\.index)?$"


def prepare_output(output: str, plan_hash: str, overwrite: bool) -> dict[str, ShardInfo] | None:
    """Make ``output`` ready; return finished shards to reuse, or None if all is done already."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise OutputError(f"{output}: exists and is not a directory; choose another --output")
    manifest = os.path.join(output, MANIFEST)
    state = os.path.join(output, STATE_DIR, "plan.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                same = json.load(f)["dlpipe"]["plan"]["hash"] == plan_hash
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if same and not overwrite:
            return None
        if not overwrite:
            raise OutputError(f"{output}: already holds a dataset made from other inputs or options; pass "
                              "--overwrite to replace it, or choose another --output")
        _clean(output)
    elif os.path.isfile(state):
        try:
            with open(state) as f:
                same = json.load(f)["hash"] == plan_hash
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            if not overwrite:
                raise OutputError(f"{output}: holds an unfinished reshard with other inputs or options; pass "
                                  "--overwrite to replace it, or choose another --output")
            _clean(output)
    elif os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise OutputError(f"{output}: exists and is not empty; pass --overwrite to replace dlpipe shards "
                              "there, or choose another --output")
        _clean(output)
        pattern = re.compile(_SHARD_FILE)
        others = [f for f in os.listdir(output) if not pattern.match(f)]
        if others:
            raise OutputError(f"{output}: holds files dlpipe did not write ({', '.join(sorted(others)[:3])}...); "
                              "choose an empty --output")
    try:
        os.makedirs(os.path.join(output, STATE_DIR, "done"), exist_ok=True)
        remove_temporaries(output)
        if not os.path.isfile(state):
            write_json_atomic(state, {"hash": plan_hash})
    except OSError as e:
        raise OutputError(f"{output}: cannot write there ({e.strerror or e}); choose another --output") from None
    done = {}
    done_dir = os.path.join(output, STATE_DIR, "done")
    for name in os.listdir(done_dir):
        try:
            with open(os.path.join(done_dir, name)) as f:
                info = ShardInfo(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        path = os.path.join(output, info.path)
        if os.path.isfile(path) and os.path.getsize(path) == info.num_bytes and os.path.isfile(path + ".index"):
            done[info.path] = info
    return done


def _clean(output: str) -> None:
    pattern = re.compile(_SHARD_FILE)
    for name in os.listdir(output):
        path = os.path.join(output, name)
        if name == MANIFEST or pattern.match(name) or (name.startswith(".") and name.endswith(".tmp")):
            os.remove(path)
    shutil.rmtree(os.path.join(output, STATE_DIR), ignore_errors=True)


def remove_temporaries(output: str) -> None:
    if not os.path.isdir(output):
        return
    for name in os.listdir(output):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(output, name))
