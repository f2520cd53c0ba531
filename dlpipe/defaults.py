"""Names and defaults that several parts of dlpipe share, each in one place."""

MASK_COLUMN = "attention_mask"  # HF's name: reshard derives lengths from it, loaders build it
SHUFFLE_BUFFER = 1000  # records; HF ``IterableDataset.shuffle``'s default ``buffer_size``
