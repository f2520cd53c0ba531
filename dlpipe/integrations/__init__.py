"""Adapters for training libraries that need one to use dlpipe's loaders fully (recipes:
``examples/integrations.md``). Each module imports its library when it is imported, behind a
pip extra, and nothing here is imported by ``import dlpipe``:

- ``dlpipe.integrations.transformers``: ``DlpipeTrainer``, a HF ``Trainer`` that trains on a
  dlpipe loader, reaches its ``set_epoch`` and checkpoints its position (``dlpipe[transformers]``).
- ``dlpipe.integrations.lightning``: ``ShardDataModule``, a ``LightningDataModule`` whose loader
  is reshuffled each epoch and resumes mid-epoch from Lightning checkpoints (``dlpipe[lightning]``).
- ``dlpipe.integrations.keras``: ``keras_loader``, ``(features, labels)`` batches of the PyTorch
  loader for Keras 3 on the torch or JAX backend (the TensorFlow backend takes ``to_tf_dataset``
  as it is).
- ``dlpipe.integrations.dali``: the ``features`` spec and decode for NVIDIA DALI's
  ``fn.readers.tfrecord``, made from the manifest (``dlpipe[dali]``; the spec needs no DALI).
"""
