"""The DeepCAL-like models: same architecture and outputs in both frameworks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dlpipe.models import init_weights, parameter_count


def batch(width: int = 12, extra_pad: int = 0, n: int = 6):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, width + 1, n)
    ids = rng.integers(32, 70000, (n, width))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids, mask = np.pad(ids * mask, ((0, 0), (0, extra_pad))), np.pad(mask, ((0, 0), (0, extra_pad)))
    labels = rng.uniform([-90, -180], [90, 180], (n, 2)).astype(np.float32)
    return ids, mask, labels


def test_importing_models_loads_no_framework():
    code = "import sys, dlpipe.models; print([m for m in ('tensorflow', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.tf
@pytest.mark.torch
def test_tf_and_torch_agree_on_shared_weights():
    tf = pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_tf import build_tf_model
    from dlpipe.models.deepcal_torch import DeepCalTorch

    w = init_weights(3)
    tf_model, torch_model = build_tf_model(weights=w), DeepCalTorch(weights=w)
    assert sum(int(np.prod(v.shape)) for v in tf_model.trainable_weights) == parameter_count()
    assert sum(p.numel() for p in torch_model.parameters()) == parameter_count()
    ids, mask, _ = batch()
    got_tf = tf_model({"input_ids": ids, "attention_mask": mask}).numpy()
    got_torch = torch_model(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    assert np.allclose(got_tf, got_torch, atol=1e-4)


@pytest.mark.torch
def test_torch_padding_invariance_and_training():
    torch = pytest.importorskip("torch")
    from dlpipe.models.deepcal_torch import DeepCalTorch, torch_train_step

    model = DeepCalTorch()
    ids, mask, labels = batch()
    ids2, mask2, _ = batch(extra_pad=9)
    a = model(torch.from_numpy(ids), torch.from_numpy(mask))
    b = model(torch.from_numpy(ids2), torch.from_numpy(mask2))
    assert torch.allclose(a, b, atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}
    losses = [float(torch_train_step(model, opt, data, torch.device("cpu"))) for _ in range(30)]
    assert losses[-1] < losses[0] * 0.5


@pytest.mark.tf
def test_tf_padding_invariance_training_and_keras_fit():
    tf = pytest.importorskip("tensorflow")
    from dlpipe.models.deepcal_tf import build_tf_model, deepcal_loss, tf_train_step

    model = build_tf_model()
    ids, mask, labels = batch()
    ids2, mask2, _ = batch(extra_pad=9)
    a = model({"input_ids": ids, "attention_mask": mask}).numpy()
    b = model({"input_ids": ids2, "attention_mask": mask2}).numpy()
    assert np.allclose(a, b, atol=1e-5)
    step = tf_train_step(model, tf.keras.optimizers.Adam(1e-2))
    feats = {"input_ids": tf.constant(ids), "attention_mask": tf.constant(mask)}
    losses = [float(step(feats, tf.constant(labels))) for _ in range(30)]
    assert losses[-1] < losses[0] * 0.5
    fresh = build_tf_model()
    fresh.compile(optimizer="adam", loss=deepcal_loss)
    ds = tf.data.Dataset.from_tensor_slices(({"input_ids": ids, "attention_mask": mask}, labels)).batch(2)
    history = fresh.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    assert len(history.history["loss"]) == 1
