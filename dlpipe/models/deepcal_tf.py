"""The DeepCAL-like geocoder in TensorFlow/Keras (architecture and loss: see ``dlpipe.models``).

A functional Keras model rather than a subclass: ``seq_len`` becomes the input shape, and
``summary``, ``save`` and ``load_model`` work without registering a custom class.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.models import COORD_SCALE, VOCAB, check_weights, conv_layer_count, init_weights

FEATURES = ("input_ids", "attention_mask")


@functools.cache
def _tf() -> Any:
    # cached, and a C-level wrapper, so AutoGraph calls it as is inside a tf.function instead of
    # converting the import machinery behind ``require`` (which warns that it has no source)
    return require("tensorflow", "the DeepCAL TensorFlow model")


def build_tf_model(
    vocab: int = VOCAB,
    seq_len: int | None = None,
    *,
    weights: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> Any:
    """A ``keras.Model`` mapping ``{"input_ids", "attention_mask"}`` ([B, L] ints) to [B, 2].

    ``seq_len=None`` accepts any L per batch (what bucketed batches need). ``weights`` (from
    ``dlpipe.models.init_weights`` or ``weights_from_torch``) default to ``init_weights(seed)``.
    """
    keras = _tf().keras
    ops = keras.ops
    w = init_weights(seed, vocab) if weights is None else weights
    check_weights(w, vocab)
    kernel, embed, channels = w["conv1_w"].shape
    ids_in = keras.Input((seq_len,), dtype="int64", name="input_ids")
    mask_in = keras.Input((seq_len,), dtype="int64", name="attention_mask")
    mask = ops.expand_dims(ops.cast(mask_in, "float32"), -1)  # [B, L, 1]
    x = keras.layers.Embedding(vocab, embed, name="embed")(ops.mod(ids_in, vocab)) * mask
    for i in range(1, conv_layer_count(w) + 1):
        conv = keras.layers.Conv1D(
            channels, kernel, padding="same", activation="relu", name=f"conv{i}"
        )
        x = conv(x) * mask  # zero the padding again, so more of it changes nothing
    pooled = ops.sum(x, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
    hidden = keras.layers.Dense(w["dense_w"].shape[1], activation="relu", name="dense")(pooled)
    out = keras.layers.Dense(2, name="out")(hidden)
    model = keras.Model({"input_ids": ids_in, "attention_mask": mask_in}, out, name="deepcal")
    for layer in model.layers:
        if layer.weights:
            names = ("embed",) if layer.name == "embed" else (f"{layer.name}_w", f"{layer.name}_b")
            layer.set_weights([w[n] for n in names])
    return model


def weights_from_tf(model: Any) -> dict[str, np.ndarray]:
    """The model's current weights as the canonical dict (e.g. for ``DeepCalTorch(weights=...)``)."""
    out: dict[str, np.ndarray] = {}
    for layer in model.layers:
        values = [np.asarray(v) for v in layer.get_weights()]
        if layer.name == "embed":
            out["embed"] = values[0]
        elif values:
            out[f"{layer.name}_w"], out[f"{layer.name}_b"] = values
    return out


def deepcal_loss(labels: Any, predictions: Any) -> Any:
    """MSE of (lat / 90, lon / 180) against ``predictions``; ``labels`` [B, 2] in degrees.

    A plain function of (y_true, y_pred), so ``model.compile(loss=deepcal_loss)`` works.
    """
    tf = _tf()
    target = tf.cast(labels, tf.float32) / COORD_SCALE
    return tf.reduce_mean(tf.square(target - tf.cast(predictions, tf.float32)))


# what ``dlpipe bench`` compiles Keras baselines with
TF_LOSS = deepcal_loss


def tf_train_step(model: Any, optimizer: Any) -> Any:
    """A ``tf.function`` ``step(features, labels) -> loss``: one optimizer step on a batch.

    ``features`` holds ``input_ids`` and ``attention_mask`` ([B, L]); ``labels`` is [B, 2] in
    degrees. ``reduce_retracing`` keeps one graph for every batch width. The loss comes back
    as a tensor: reading it (``.numpy()``) waits for the step, so do that only when needed.
    """
    tf = _tf()

    @tf.function(reduce_retracing=True)
    def step(features: dict[str, Any], labels: Any) -> Any:
        inputs = {k: features[k] for k in FEATURES}  # other keys (e.g. lengths) stay out
        with tf.GradientTape() as tape:
            loss = deepcal_loss(labels, model(inputs, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


__all__ = [
    "FEATURES",
    "TF_LOSS",
    "build_tf_model",
    "deepcal_loss",
    "tf_train_step",
    "weights_from_tf",
]
