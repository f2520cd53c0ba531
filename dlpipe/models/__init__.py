"""DeepCAL-like geocoder in both frameworks, equal architecture and weights.

A character-level encoder maps an address (Unicode code points) to (latitude, longitude):
code points hashed into ``VOCAB`` buckets -> embedding (64) -> two 1-D convolutions (kernel 5,
128 channels, ReLU) with padding positions zeroed after each, so extra padding never changes
the result -> mean over the real positions -> dense 128 -> 2 outputs, the coordinates divided by
(90, 180). The loss is the mean squared error of those normalized coordinates.

``init_weights(seed)`` gives one numpy weight dict that both ``deepcal_tf.build_tf_model`` and
``deepcal_torch.DeepCalTorch`` load, which is what makes a TensorFlow/PyTorch step-time
comparison fair. Importing this package imports neither framework.
"""

from __future__ import annotations

import numpy as np

VOCAB = 4096
EMBED = 64
CHANNELS = 128
KERNEL = 5
HIDDEN = 128
COORD_SCALE = np.array([90.0, 180.0], dtype=np.float32)


def init_weights(seed: int = 0, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Canonical weights (Glorot-uniform kernels, zero biases); conv kernels are (k, in, out)."""
    rng = np.random.default_rng(seed)

    def glorot(shape, fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)

    return {
        "embed": rng.normal(0, 0.05, (vocab, EMBED)).astype(np.float32),
        "conv1_w": glorot((KERNEL, EMBED, CHANNELS), KERNEL * EMBED, KERNEL * CHANNELS),
        "conv1_b": np.zeros(CHANNELS, np.float32),
        "conv2_w": glorot((KERNEL, CHANNELS, CHANNELS), KERNEL * CHANNELS, KERNEL * CHANNELS),
        "conv2_b": np.zeros(CHANNELS, np.float32),
        "dense_w": glorot((CHANNELS, HIDDEN), CHANNELS, HIDDEN),
        "dense_b": np.zeros(HIDDEN, np.float32),
        "out_w": glorot((HIDDEN, 2), HIDDEN, 2),
        "out_b": np.zeros(2, np.float32),
    }


def parameter_count(vocab: int = VOCAB) -> int:
    return sum(int(w.size) for w in init_weights(0, vocab).values())


__all__ = ["CHANNELS", "COORD_SCALE", "EMBED", "HIDDEN", "KERNEL", "VOCAB", "init_weights", "parameter_count"]
