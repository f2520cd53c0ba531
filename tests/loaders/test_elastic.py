"""Elastic resume of the PyTorch loader (``dlpipe.loaders.elastic``): a state saved under one
world size and number of workers, loaded by every rank of a job with others, plays the rest of
the epoch: every remaining record once, equal batch counts per rank; mixtures keep their draws."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlpipe
from dlpipe.errors import ConfigError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

N = 157


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    rng = np.random.default_rng(0)
    ids = np.zeros((N, 16), np.int32)
    for i, k in enumerate(rng.integers(1, 16, N)):
        ids[i, :k] = rng.integers(1, 50, k)
    np.save(root / "input_ids.npy", ids)
    np.save(root / "rid.npy", np.arange(N, dtype=np.int64))
    dlpipe.reshard([str(root / "input_ids.npy"), str(root / "rid.npy")], root / "out", pad_id=0, num_shards=4,
                   workers=1, progress=False, sequence_columns=["input_ids"])
    return dlpipe.load_dataset(root / "out")


KW = {"batch_size": 5, "shuffle": True, "seed": 11}


def loader(ds, world, workers, rank, **kw):
    return ds.to_torch_dataloader(**{**KW, **kw}, world_size=world, rank=rank, num_workers=workers)


def run_stage(ds, world, workers, stop, state=None, **kw):
    """Every rank of a job: load ``state`` (rank 0's of the last job), take ``stop`` batches
    (None: to the end); returns the records taken per rank and rank 0's state."""
    taken, saved = [], None
    for rank in range(world):
        dl = loader(ds, world, workers, rank, **kw)
        if state is not None:
            dl.load_state_dict(state)
        it = iter(dl)
        mine = []
        for batch in it:
            mine.append(batch["rid"].tolist())
            if stop is not None and len(mine) == stop:
                break
        if rank == 0:
            saved = dl.state_dict()
        del it
        taken.append(mine)
    return taken, saved


def records(taken):
    return [r for rank in taken for batch in rank for r in batch]


def check_epoch(ds, stages, **kw):
    """Run ``stages`` ((world, workers, stop), the last with stop None) and check the epoch."""
    epoch = collections.Counter(r for batch in loader(ds, 1, 0, 0, **kw) for r in batch["rid"].tolist())
    state, seen = None, []
    for world, workers, stop in stages:
        taken, state = run_stage(ds, world, workers, stop, state, **kw)
        assert len({len(t) for t in taken}) == 1, "every rank takes the same number of batches"
        seen += records(taken)
    got = collections.Counter(seen)
    assert not epoch - got, f"records never read: {sorted((epoch - got).elements())[:10]}"
    extra = got - epoch  # uneven="pad" repeats < world records at each stage's end, nothing else
    assert sum(extra.values()) < sum(world for world, _, _ in stages)
    return state


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.tuples(st.integers(1, 3), st.sampled_from([0, 1, 2]), st.integers(0, 9)),
       then=st.tuples(st.integers(1, 3), st.sampled_from([0, 2])))
def test_resume_under_any_world_and_workers_reads_the_rest_once(ds, first, then):
    check_epoch(ds, [first, (*then, None)])


def test_two_changes_in_one_epoch_compose(ds):
    state = check_epoch(ds, [(2, 2, 3), (3, 1, 2), (1, 0, None)])
    assert [s["world_size"] for s in state["stages"]] == [2, 3]  # a few numbers per change
    assert len(json.dumps(state)) < 1000


def test_same_topology_resume_is_exact_and_keeps_the_order(ds):
    full = [b["rid"].tolist() for b in loader(ds, 1, 2, 0)]
    head, state = run_stage(ds, 1, 2, 7)
    rest, _ = run_stage(ds, 1, 2, None, state)
    assert head[0] + rest[0] == full


def test_unshuffled_and_drop(ds):
    check_epoch(ds, [(2, 0, 4), (3, 2, None)], shuffle=False)
    epoch = set(range(N))
    taken, state = run_stage(ds, 2, 1, 3, uneven="drop")
    rest, _ = run_stage(ds, 3, 0, None, state, uneven="drop")
    seen = records(taken) + records(rest)
    assert len(seen) == len(set(seen)) and len(epoch - set(seen)) < 3  # drop skips < 3 at the end


def test_a_mixture_resumes_elastically_and_keeps_its_proportions(tmp_path, ds):
    other_root = tmp_path / "b"
    other_root.mkdir()
    ids = np.ones((60, 16), np.int32)
    np.save(other_root / "input_ids.npy", ids)
    np.save(other_root / "rid.npy", np.arange(1000, 1060, dtype=np.int64))
    dlpipe.reshard([str(other_root / "input_ids.npy"), str(other_root / "rid.npy")], other_root / "out", pad_id=0,
                   num_shards=2, workers=1, progress=False, sequence_columns=["input_ids"])
    mix = dlpipe.interleave_datasets([ds, dlpipe.load_dataset(other_root / "out")], probabilities=[0.7, 0.3], seed=3,
                                     stopping_strategy="all_exhausted")
    check_epoch(mix, [(2, 2, 4), (3, 0, None)])
    taken, state = run_stage(mix, 1, 0, 10)
    rest, _ = run_stage(mix, 2, 2, None, state)
    after = records(rest)
    share = sum(r >= 1000 for r in after) / len(after)
    choices_share = 0.3
    assert abs(share - choices_share) < 4 * np.sqrt(0.21 / len(after))


def test_refusals_say_why(ds, tmp_path):
    _, state = run_stage(ds, 1, 0, 3)
    with pytest.raises(ConfigError, match="seed: saved 11, now 12"):
        loader(ds, 1, 0, 0, seed=12).load_state_dict(state)
    other = dlpipe.load_dataset(ds.info.root).select_columns(["rid"])  # the same records: accepted
    loader(other, 1, 0, 0).load_state_dict(state)
    np.save(tmp_path / "rid.npy", np.arange(N, dtype=np.int64) + 5)
    dlpipe.reshard([str(tmp_path / "rid.npy")], tmp_path / "out", workers=1, progress=False, num_shards=4)
    with pytest.raises(ConfigError, match="another dataset") as err:
        loader(dlpipe.load_dataset(tmp_path / "out"), 1, 0, 0).load_state_dict(state)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="version"):
        loader(ds, 1, 0, 0).load_state_dict({**state, "version": 2})
    with pytest.raises(ConfigError, match="bucket_boundaries needs the same world size"):
        _, bucketed = run_stage(ds, 1, 0, 2, bucket_boundaries=[8, 16])
        loader(ds, 2, 0, 0, bucket_boundaries=[8, 16]).load_state_dict(bucketed)


TRAIN = textwrap.dedent("""
    import json, os, sys, time
    import dlpipe
    ds = dlpipe.load_dataset(sys.argv[1])
    ckpt, log = sys.argv[2], sys.argv[3]
    world = int(os.environ.get("WORLD", "1"))
    loader = ds.to_torch_dataloader(batch_size=5, shuffle=True, seed=11, num_workers=2, world_size=world, rank=0)
    logged = 0
    if os.path.exists(ckpt):
        saved = json.load(open(ckpt))
        loader.load_state_dict(saved["loader"])
        logged = saved["logged"]
        with open(log, "r+") as f:  # the steps after the checkpoint are trained again
            lines = f.read().splitlines()[:logged]
            f.seek(0); f.truncate(); f.write("".join(l + "\\n" for l in lines))
    kill_after = int(os.environ.get("KILL_AFTER", "0"))
    for step, batch in enumerate(loader, 1):
        with open(log, "a") as f:
            f.write(json.dumps(batch["rid"].tolist()) + "\\n")
        logged += 1
        if step % 3 == 0:  # a checkpoint every 3 steps, written atomically
            with open(ckpt + ".tmp", "w") as f:
                json.dump({"loader": loader.state_dict(), "logged": logged}, f)
            os.replace(ckpt + ".tmp", ckpt)
        if step == kill_after:
            open(log + ".ready", "w").close()
            time.sleep(60)
""")


def test_sigkill_between_checkpoints_resumes_from_the_last_with_nothing_skipped(ds, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    ckpt, log = tmp_path / "ckpt.json", tmp_path / "log.jsonl"
    args = [sys.executable, str(script), str(ds.info.root), str(ckpt), str(log)]
    env = {**os.environ, "KILL_AFTER": "8"}
    proc = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 120
    while not os.path.exists(str(log) + ".ready"):
        assert proc.poll() is None and time.monotonic() < deadline, "the training process ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(ckpt.read_text())["logged"] == 6  # killed 2 steps after the last checkpoint
    subprocess.run(args, check=True, timeout=120)  # restarted: resumes from the checkpoint
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    uninterrupted = [b["rid"].tolist() for b in ds.to_torch_dataloader(**KW)]
    assert seen == uninterrupted  # the 2 lost steps trained again, nothing skipped or repeated
