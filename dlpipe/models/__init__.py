"""DeepCAL-like geocoder in both frameworks: equal architecture, equal weights, equal outputs.

An address (Unicode code points, padded with 0) goes in; (latitude, longitude) comes out::

    input_ids [B, L] --cp % vocab--> Embedding(64) --> Conv1D(k=5, 64, ReLU) x 2
        --> mean over the real positions --> Dense(128, ReLU) --> Dense(2)

(the defaults: 4096 buckets, 311,810 parameters). The size is set so that one CPU training step
on a batch of 256 addresses of ~40 characters takes ~15-30 ms on two cores: small enough that a
well-fed input pipeline keeps it busy, real enough that its step time matters. 128 channels
would more than double that (~40 ms in TensorFlow, ~70 ms in single-threaded PyTorch).

The model predicts normalized coordinates, (lat / 90, lon / 180), both in [-1, 1]; the loss is
the mean squared error against the degree labels divided by ``COORD_SCALE``. Plain MSE keeps the
step cheap and identical in both frameworks; the model exists to give ``dlpipe bench`` a real
step to feed, not to win at geocoding.

Why ``cp % vocab`` for the vocabulary: every script below U+1000 (Latin, Greek, Cyrillic,
Arabic, Devanagari, ...) keeps one id per character, and higher blocks (CJK, Hangul) hash into
shared buckets instead of collapsing into the single id that ``min(cp, vocab - 1)`` would give.

Why padding never changes the output: the attention mask zeroes padded positions after the
embedding and after every convolution, so a padded position feeds the next convolution the same
zero that its "same" padding would, and the mean divides by the real length. A batch padded to
any width gives the same outputs (up to float rounding).

Packed input (``dlpipe.loaders.packing``): several addresses per row, ``input_ids`` and
``segment_ids`` [B, L] (0 = padding, 1..k the row's records in order), one output per segment,
[B, S, 2] beside ``segment_mask`` [B, S]; or flattened, ``input_ids`` [1, T] with
``cu_seqlens`` [n + 1], [n, 2] out. The model first spreads each row's segments apart with
``kernel // 2`` zero positions between consecutive ones (a scatter of the ids), then runs the
padded path's own layers, zeroing padding and gaps after the embedding and every convolution:
every tap that would cross a record's end reads a zero, exactly as the "same" padding of that
record alone would, and nothing reads across rows. Pooling is a mean per segment: for rows one
batched matmul with the rows' one-hot [S, L'] segment matrices (on CPU cheaper than a segment
sum and its gather), for the flat form a segment sum. So a record's output does not depend on
what it is packed with and equals its unpacked output (up to float rounding), and so do the
gradients; the loss over the real segments equals the unpacked batch's (0 for an empty batch).

Cost: the convolutions run on L + kernel // 2 * (m - 1) positions per row, m the batch's most
segments in one row (not S: unused slots would widen every row; PyTorch reads m only on CPU,
elsewhere it uses S rather than wait for the device). For 128-token rows of DeepCAL-like
addresses (~5.8 records a row, m = 8) that is 142 positions for 127 real tokens, about the waste
of length buckets (~91% real tokens). Measured on a shared 2-core CPU, the train step alone
(forward, backward, Adam) on ~256 records a batch, one and two threads (before PyTorch's
channels-last layout, see Speed): packed rows give 0.94-0.97x (TF) and 0.91-1.0x (PyTorch) the
samples/s of bucketed batches, 1.7-1.8x and 1.8-2.3x pad-to-longest, ~1.1x the former layout
(gaps for all S slots, segment-sum pooling). Exact alternatives cost more here. Convolving the
rows without gaps and taking back the taps that crossed a boundary before each ReLU (per
boundary a gather of 2 * (kernel // 2) positions, two [kernel // 2 * C]-square matmuls, a
scatter back) does the fewest multiplications (~1.2 positions' worth per boundary, against 2 for
a gap) but adds ~25 small ops per layer: 0.86-0.95x (TF) and 0.79-0.90x (PyTorch) buckets.
Masking each tap by "same segment as the centre" is a kernel-fold im2col matmul. With no
boundary handling at all (wrong outputs) packing would reach 1.02-1.15x buckets: the ceiling for
this model at these lengths. ``position_ids`` are accepted and unused: the model has no position
embedding.

Speed: the layers are equal in both frameworks, their memory layouts are not alike by default.
``DeepCalTorch`` keeps activations [B, L, C] (TF's NWC) and runs each convolution as a conv2d
over their [B, C, 1, L] view in channels_last memory, which is the same tensor as it is: no
transposed copy, and oneDNN's fast layout (forward and backward ~2.2x as fast as conv1d on a
[B, C, L] copy at L = 128, ~1.5x at L = 24). ReLU and mask act in place on the convolution's
output, with one backward pass for both (``deepcal_torch._ConvReluMask``); the embedding reads
padding from an appended zero row instead of multiplying by the mask;
``deepcal_torch.make_optimizer`` is a fused Adam (~1 ms a step). Measured on the shared 2-core
CPU, two threads, the train step alone (forward, backward, Adam) on random ids at DeepCAL-like
lengths, each framework and shape in a process of its own, run back to back 7 times; ms per
step, the median of 5 blocks of >= 0.4 s (blocks in which other processes used the CPU
dropped); TF/PyTorch is the median of the 7 runs' ratios:

    shape                          TF   PyTorch before -> after   TF/PyTorch before -> after
    [256, 128] (fixed)             59   102 -> 77 (55)            0.56 -> 0.76 (1.10)
    [256, ~47] (pad to longest)    28    43 -> 26 (23)            0.69 -> 1.07 (1.20)
    [256, 16..32] (buckets)        16    17 -> 14 (13)            0.85 -> 1.21 (1.05)
    [45, 128] packed (~144 wide)   16    24 -> 16 (14)            0.77 -> 1.00 (1.12)

The convolutions run at ~175 GFLOP/s in both frameworks, near this CPU's fp32 peak. Most of
what is left at [256, 128] is glibc malloc: it hands the step's ~56 MB of fresh [B, L, C]
buffers back to the kernel and page-faults them in again the next step (~10,000 faults, ~30 ms
of system CPU time a step), where TF's allocator keeps its memory. In parentheses: the same
process with ``mallopt`` M_TRIM_THRESHOLD and M_MMAP_THRESHOLD raised (MALLOC_TRIM_THRESHOLD_ /
MALLOC_MMAP_THRESHOLD_ in the environment, or jemalloc / tcmalloc, do the same). Slower here,
per layer against the channels-last conv at L = 128 and 24: an im2col matmul (unfold, one
matmul: ~3x, ~1.5x), five shifted matmuls (~2.2x, ~1.4x), oneDNN off (~15x the forward); and
autograd's own in-place ReLU and mask on the permuted view (its CopySlices copies: +15 ms a
step at [256, 128]).

``init_weights(seed)`` is the one numpy weight dict both frameworks load (Keras layouts: conv
kernels ``(k, in, out)``, dense ``(in, out)``); its shapes define the architecture.
``deepcal_tf.weights_from_tf`` and ``deepcal_torch.weights_from_torch`` read a trained model
back into that dict, so weights can move between frameworks. Equal weights are what make a
TensorFlow/PyTorch step-time comparison fair.

Importing this package imports neither framework; ``dlpipe.models.deepcal_tf`` and
``dlpipe.models.deepcal_torch`` each import theirs.
"""

from __future__ import annotations

import numpy as np

from dlpipe.errors import ConfigError

VOCAB = 4096
EMBED = 64
CHANNELS = 64
KERNEL = 5
CONV_LAYERS = 2
HIDDEN = 128
COORD_SCALE = np.array([90.0, 180.0], dtype=np.float32)
PACKED_FEATURES = ("input_ids", "segment_ids", "segment_mask")  # packed rows [B, L], [B, S]
FLAT_FEATURES = ("input_ids", "cu_seqlens")  # the flattened form: [1, T], [n + 1]


def bucket_ids(input_ids: np.ndarray, vocab: int = VOCAB) -> np.ndarray:
    """The vocabulary rule both models apply to code points: ``cp % vocab`` (reference in NumPy)."""
    return np.mod(np.asarray(input_ids, dtype=np.int64), vocab)


def init_weights(
    seed: int = 0,
    vocab: int = VOCAB,
    *,
    embed: int = EMBED,
    channels: int = CHANNELS,
    kernel: int = KERNEL,
    conv_layers: int = CONV_LAYERS,
    hidden: int = HIDDEN,
) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels, zero biases, N(0, 0.05) embedding: the Keras defaults, seeded.

    Keys: ``embed``, ``conv{i}_w``/``conv{i}_b`` for i = 1..conv_layers, ``dense_w``/``dense_b``,
    ``out_w``/``out_b``.
    """
    for name, value in (("vocab", vocab), ("embed", embed), ("channels", channels),
                        ("kernel", kernel), ("conv_layers", conv_layers), ("hidden", hidden)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{name}={value!r}; must be >= 1")
    if kernel % 2 == 0:
        raise ConfigError(f"kernel={kernel!r}; must be odd so 'same' padding is symmetric")
    rng = np.random.default_rng(seed)

    def glorot(shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)

    weights = {"embed": rng.normal(0, 0.05, (vocab, embed)).astype(np.float32)}
    width = embed
    for i in range(1, conv_layers + 1):
        weights[f"conv{i}_w"] = glorot((kernel, width, channels), kernel * width, kernel * channels)
        weights[f"conv{i}_b"] = np.zeros(channels, np.float32)
        width = channels
    weights["dense_w"] = glorot((width, hidden), width, hidden)
    weights["dense_b"] = np.zeros(hidden, np.float32)
    weights["out_w"] = glorot((hidden, 2), hidden, 2)
    weights["out_b"] = np.zeros(2, np.float32)
    return weights


def conv_layer_count(weights: dict[str, np.ndarray]) -> int:
    """How many convolutions a weight dict describes (``conv1_w``, ``conv2_w``, ...)."""
    n = 0
    while f"conv{n + 1}_w" in weights:
        n += 1
    return n


def check_weights(weights: dict[str, np.ndarray], vocab: int) -> None:
    """Raise ConfigError unless ``weights`` is a complete dict for a ``vocab``-bucket model."""
    n = conv_layer_count(weights)
    expected = {"embed", "dense_w", "dense_b", "out_w", "out_b"}
    expected |= {f"conv{i}_{p}" for i in range(1, n + 1) for p in "wb"}
    if n == 0 or set(weights) != expected:
        raise ConfigError(f"weights has keys {sorted(weights)}; expected {sorted(expected)} "
                          "(see dlpipe.models.init_weights)")  # fmt: skip
    if weights["embed"].shape[0] != vocab:
        raise ConfigError(f"vocab={vocab!r}, but weights['embed'] has {weights['embed'].shape[0]} "
                          "rows; pass the vocab the weights were made for")  # fmt: skip


def parameter_count(vocab: int = VOCAB, **sizes: int) -> int:
    """Trainable parameters of the model that ``init_weights(vocab=vocab, **sizes)`` describes."""
    return sum(int(w.size) for w in init_weights(0, vocab, **sizes).values())


__all__ = [
    "CHANNELS",
    "CONV_LAYERS",
    "COORD_SCALE",
    "EMBED",
    "FLAT_FEATURES",
    "HIDDEN",
    "KERNEL",
    "PACKED_FEATURES",
    "VOCAB",
    "bucket_ids",
    "check_weights",
    "conv_layer_count",
    "init_weights",
    "parameter_count",
]
