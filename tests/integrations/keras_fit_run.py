"""One Keras ``model.fit`` on dlpipe shards, for ``test_keras_fit`` (a process per backend: the
backend is fixed when keras is imported). Usage: KERAS_BACKEND=... python keras_fit_run.py
DATASET OUT.json LOADER, LOADER ``tf`` (``to_tf_dataset``) or ``torch`` (``keras_loader``).
Writes the record ids each train step got, the batches per epoch Keras counted, the losses, and
whether TensorFlow was loaded into the process."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np

import dlpipe

EPOCHS = 2
BATCH = 8
SEEN: list[list[int]] = []


class Tiny(keras.Model):
    """Mean of token embeddings -> 2 classes; records ``rid`` in each train step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = keras.layers.Embedding(128, 8, mask_zero=True)
        self.pool = keras.layers.GlobalAveragePooling1D()
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.pool(self.emb(x["input_ids"])))

    def train_step(self, *args):  # (data), or (state, data) on JAX
        x, _ = args[-1]
        SEEN.append(np.asarray(keras.ops.convert_to_numpy(x["rid"])).tolist())
        return super().train_step(*args)


def main(path: str, out: str, loader: str) -> None:
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(0)  # (it imports TensorFlow, whatever the backend)
    ds = dlpipe.load_dataset(path)
    columns, labels = ["input_ids", "rid"], "labels"
    if loader == "tf":
        data = ds.to_tf_dataset(BATCH, columns=columns, label_cols=labels, shuffle=True, seed=0)
    else:
        from dlpipe.integrations.keras import keras_loader

        data = keras_loader(ds.to_torch_dataloader(BATCH, shuffle=True, seed=0), columns, labels)
    model = Tiny()
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True, jit_compile=False)
    steps: list[int] = []

    class Steps(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            steps.append(len(SEEN) - sum(steps))

    history = model.fit(data, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[Steps()])
    with open(out, "w") as f:
        json.dump({"backend": keras.backend.backend(), "seen": SEEN, "steps": steps,
                   "loss": history.history["loss"], "tensorflow_loaded": "tensorflow" in sys.modules}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
