"""The DeepCAL-like geocoder in TensorFlow/Keras (see ``dlpipe.models``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlpipe._deps import require
from dlpipe.models import CHANNELS, COORD_SCALE, EMBED, HIDDEN, KERNEL, VOCAB, init_weights


def build_tf_model(vocab: int = VOCAB, weights: dict[str, np.ndarray] | None = None, seed: int = 0):
    """A Keras model taking ``{"input_ids", "attention_mask"}`` ([B, L], any L) -> [B, 2]."""
    tf = require("tensorflow", "the DeepCAL TensorFlow model")
    keras = tf.keras
    w = init_weights(seed, vocab) if weights is None else weights

    class DeepCal(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.embed = keras.layers.Embedding(vocab, EMBED)
            self.conv1 = keras.layers.Conv1D(CHANNELS, KERNEL, padding="same", activation="relu")
            self.conv2 = keras.layers.Conv1D(CHANNELS, KERNEL, padding="same", activation="relu")
            self.dense = keras.layers.Dense(HIDDEN, activation="relu")
            self.out = keras.layers.Dense(2)

        def call(self, inputs: dict[str, Any]):
            ids = tf.math.floormod(tf.cast(inputs["input_ids"], tf.int64), vocab)
            mask = tf.cast(inputs["attention_mask"], tf.float32)[:, :, None]
            x = self.embed(ids) * mask
            x = self.conv1(x) * mask  # zero the padding again so more of it changes nothing
            x = self.conv2(x) * mask
            pooled = tf.reduce_sum(x, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            return self.out(self.dense(pooled))

    model = DeepCal()
    model({"input_ids": tf.zeros([1, KERNEL], tf.int64), "attention_mask": tf.ones([1, KERNEL], tf.int64)})
    model.embed.set_weights([w["embed"]])
    model.conv1.set_weights([w["conv1_w"], w["conv1_b"]])
    model.conv2.set_weights([w["conv2_w"], w["conv2_b"]])
    model.dense.set_weights([w["dense_w"], w["dense_b"]])
    model.out.set_weights([w["out_w"], w["out_b"]])
    return model


def deepcal_loss(labels, predictions):
    """MSE of coordinates divided by (90, 180); ``labels`` in degrees. Usable in ``compile``."""
    tf = require("tensorflow", "the DeepCAL TensorFlow model")
    target = tf.cast(labels, tf.float32) / COORD_SCALE
    return tf.reduce_mean(tf.square(target - predictions))


def tf_train_step(model, optimizer):
    """A ``tf.function`` doing one optimizer step on ``(features, labels)``; returns the loss.

    ``reduce_retracing`` keeps one graph for every batch width.
    """
    tf = require("tensorflow", "the DeepCAL TensorFlow model")

    @tf.function(reduce_retracing=True)
    def step(features, labels):
        with tf.GradientTape() as tape:
            loss = deepcal_loss(labels, model(features, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step
