"""``DevicePrefetcher`` on CPU: the same batches in the same order, exact resume although the
loader runs ahead, epochs passed through, bad arguments refused. (Its CUDA stream path runs in
``bench/gpu_check.py`` where a GPU is lent.)"""

from __future__ import annotations

import numpy as np
import pytest

import dlpipe
from dlpipe.errors import ConfigError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from resume_helper import run_save_load_state  # noqa: E402
from token_rows import padded_tokens  # noqa: E402

from dlpipe.loaders.torch_prefetch import DevicePrefetcher  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(3)
    ids, _ = padded_tokens(rng, 200, 16)
    np.save(src / "input_ids.npy", ids)
    np.save(src / "rid.npy", np.arange(200, dtype=np.int64))
    out = tmp_path_factory.mktemp("shards")
    dlpipe.reshard([str(src / "input_ids.npy"), str(src / "rid.npy")], out, pad_id=0, num_shards=3,
                   workers=1, overwrite=True, progress=False)
    return str(out)


def loader(data, **kw):
    ds = dlpipe.load_dataset(data)
    return ds.to_torch_dataloader(batch_size=16, shuffle=True, seed=5, **kw)


@pytest.mark.parametrize("depth", [1, 3])
def test_same_batches_in_the_same_order(data, depth):
    plain = [b["rid"].tolist() for b in loader(data)]
    fetched = list(DevicePrefetcher(loader(data), "cpu", depth=depth))
    assert [b["rid"].tolist() for b in fetched] == plain
    assert all(b["input_ids"].device.type == "cpu" for b in fetched)
    assert len(DevicePrefetcher(loader(data), "cpu")) == len(plain)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_though_the_loader_runs_ahead(data, num_workers):
    run_save_load_state(lambda: DevicePrefetcher(loader(data, num_workers=num_workers), "cpu", depth=2),
                        stops=[0, 1, 5, 12], key=lambda b: b["rid"].tolist())


def test_to_torch_dataloader_device_wraps_the_loader(data):
    wrapped = loader(data, device="cpu")
    assert isinstance(wrapped, DevicePrefetcher)
    assert [b["rid"].tolist() for b in wrapped] == [b["rid"].tolist() for b in loader(data)]


def test_set_epoch_reaches_the_loader(data):
    p = DevicePrefetcher(loader(data), "cpu")
    first = [b["rid"].tolist() for b in p]
    p.set_epoch(1)
    second = [b["rid"].tolist() for b in p]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(200))


def test_bad_arguments(data):
    with pytest.raises(ConfigError, match="depth=0"):
        DevicePrefetcher(loader(data), "cpu", depth=0)
    with pytest.raises(ConfigError, match="device='nope'"):
        DevicePrefetcher(loader(data), "nope")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            DevicePrefetcher(loader(data), "cuda")
