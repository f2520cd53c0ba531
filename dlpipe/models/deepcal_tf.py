"""The DeepCAL-like geocoder in TensorFlow/Keras (architecture and loss: see ``dlpipe.models``).

A functional Keras model rather than a subclass: ``seq_len`` becomes the input shape, and
``summary``, ``save`` and ``load_model`` work without registering a custom class. Packed batches
(``dlpipe.loaders.packing``) run through ``packed_outputs``/``flat_outputs``, which use the
same model's layers and weights, so one model trains on padded and packed batches alike.
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


def batch_loss(model: Any, features: dict[str, Any], labels: Any, training: bool = False) -> Any:
    """The loss of a batch in any of its forms, told apart by its keys: padded (``FEATURES``,
    labels [B, 2]), packed rows (``dlpipe.models.PACKED_FEATURES``, labels [B, S, 2]) or
    flattened (``FLAT_FEATURES``, labels [n, 2]). Other keys (``lengths``, ...) are ignored."""
    if "cu_seqlens" in features:  # the mean over real records, 0 for an empty batch (not NaN)
        pred = flat_outputs(model, features["input_ids"], features["cu_seqlens"])
        return deepcal_packed_loss(labels, pred, _tf().ones(_tf().shape(labels)[:1]))
    if "segment_ids" in features:
        mask = features["segment_mask"]
        pred = packed_outputs(
            model, features["input_ids"], features["segment_ids"], _tf().shape(mask)[1]
        )
        return deepcal_packed_loss(labels, pred, mask)
    return deepcal_loss(labels, model({k: features[k] for k in FEATURES}, training=training))


def tf_train_step(model: Any, optimizer: Any) -> Any:
    """A ``tf.function`` ``step(features, labels) -> loss``: one optimizer step on a batch.

    ``features`` holds ``input_ids`` and ``attention_mask`` ([B, L]) and ``labels`` is [B, 2] in
    degrees, or the batch is packed (see ``batch_loss``). ``reduce_retracing`` keeps one graph
    for every batch width. The loss comes back as a tensor: reading it (``.numpy()``) waits for
    the step, so do that only when needed.
    """
    tf = _tf()

    @tf.function(reduce_retracing=True)
    def step(features: dict[str, Any], labels: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = batch_loss(model, features, labels, training=True)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def packed_outputs(model: Any, input_ids: Any, segment_ids: Any, num_segments: Any) -> Any:
    """[B, S, 2] for packed rows: ``input_ids``/``segment_ids`` [B, L] (0 = padding, 1..S the
    row's records in order, as ``dlpipe.loaders.packing`` lays them out), one output per segment
    (``segment_mask`` says which are real). Equal, up to float rounding, to the outputs of each
    record alone (see ``dlpipe.models``)."""
    tf = _tf()
    ids, seg = _spread(model, input_ids, tf.cast(segment_ids, tf.int32))
    x = _features(model, ids, seg)
    # the mean per segment: one batched matmul with the rows' one-hot segment matrices (padding
    # and gaps, id 0, are zero rows); on CPU cheaper than a segment sum and its gather
    onehot = tf.one_hot(seg - 1, num_segments, dtype=x.dtype)  # [B, L', S]
    sums = tf.linalg.matmul(onehot, x, transpose_a=True)  # [B, S, C]
    pooled = sums / tf.maximum(tf.reduce_sum(onehot, axis=1), 1.0)[..., None]
    return model.get_layer("out")(model.get_layer("dense")(pooled))


def flat_outputs(model: Any, input_ids: Any, cu_seqlens: Any) -> Any:
    """[n, 2] for the flattened form: ``input_ids`` [1, T], record i at tokens
    ``cu_seqlens[i]:cu_seqlens[i + 1]``."""
    tf = _tf()
    cu = tf.cast(cu_seqlens, tf.int32)
    seg = tf.searchsorted(cu[1:], tf.range(tf.shape(input_ids)[1]), side="right")[None] + 1
    ids, seg = _spread(model, input_ids, seg)
    x = _features(model, ids, seg)
    # one row of n records: a one-hot matmul would cost n x T x C, a segment sum T x C; gaps go
    # to a last segment, dropped (not to -1: its gradient fails when n = 0)
    n = tf.shape(cu)[0] - 1
    pooled = _segment_mean(x[0], tf.where(seg[0] > 0, seg[0] - 1, n), n + 1)[:-1]
    return model.get_layer("out")(model.get_layer("dense")(pooled))


def _spread(model: Any, input_ids: Any, seg: Any) -> tuple[Any, Any]:
    """Ids and segment ids with ``kernel // 2`` zero positions between consecutive segments of a
    row: [B, max(L + kernel // 2 * (m - 1), 1)], m the batch's most segments in a row (not
    ``max_segments``: its unused slots would widen every row). Padding moves to the end."""
    tf = _tf()
    gap = model.get_layer("conv1").kernel_size[0] // 2
    batch, width = tf.shape(seg)[0], tf.shape(seg)[1]
    most = tf.maximum(tf.reduce_max(seg), 1)  # an empty batch: the lowest int32, so 1
    at = tf.range(width)[None] + gap * (tf.where(seg > 0, seg, most) - 1)
    index = tf.stack([tf.broadcast_to(tf.range(batch)[:, None], [batch, width]), at], -1)
    # >= 1 position: TF convolves an empty row into the input's channels, not the kernel's
    shape = tf.stack([batch, tf.maximum(width + gap * (most - 1), 1)])
    ids = tf.scatter_nd(index, tf.cast(input_ids, tf.int64), shape)
    return ids, tf.scatter_nd(index, seg, shape)


def _features(model: Any, ids: Any, seg: Any) -> Any:
    """The padded model's embedding and convolutions, zeroing all but the segments' tokens."""
    tf = _tf()
    embed = model.get_layer("embed")
    real = tf.cast(seg > 0, tf.float32)[..., None]
    x = embed(tf.math.floormod(ids, embed.input_dim)) * real
    for conv in (layer for layer in model.layers if layer.name.startswith("conv")):
        x = conv(x) * real
    return x


def _segment_mean(values: Any, ids: Any, count: Any) -> Any:
    tf = _tf()
    total = tf.math.unsorted_segment_sum(values, ids, count)
    n = tf.math.unsorted_segment_sum(tf.ones_like(ids, tf.float32), ids, count)
    return total / tf.maximum(n, 1.0)[:, None]


def deepcal_packed_loss(labels: Any, predictions: Any, segment_mask: Any) -> Any:
    """``deepcal_loss`` over the real segments only: labels/predictions [B, S, 2], mask [B, S].
    Equal to ``deepcal_loss`` of the same records unpacked."""
    tf = _tf()
    mask = tf.cast(segment_mask, tf.float32)[..., None]
    err = tf.square(tf.cast(labels, tf.float32) / COORD_SCALE - tf.cast(predictions, tf.float32))
    return tf.reduce_sum(err * mask) / tf.maximum(2.0 * tf.reduce_sum(mask), 1.0)


__all__ = [
    "FEATURES",
    "TF_LOSS",
    "batch_loss",
    "build_tf_model",
    "deepcal_loss",
    "deepcal_packed_loss",
    "flat_outputs",
    "packed_outputs",
    "tf_train_step",
    "weights_from_tf",
]
