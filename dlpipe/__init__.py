"""dlpipe: fast deep-learning input pipelines.

``dlpipe.reshard`` turns padded fixed-length data into parallel variable-length TFRecord or
WebDataset shards with a manifest and index files; ``dlpipe.verify`` checks them;
``dlpipe.load_dataset`` reads them in tf.data and PyTorch. Importing dlpipe imports neither
TensorFlow nor PyTorch: framework code loads lazily, behind pip extras.
"""

from dlpipe._version import __version__
from dlpipe.errors import (
    ConfigError,
    DlpipeError,
    FormatError,
    LoaderWorkerError,
    MissingDependencyError,
    OutputError,
    OutputLockedError,
    PaddingError,
    VerifyError,
)
from dlpipe.loaders.dataset import ShardDataset, load_dataset
from dlpipe.loaders.mixture import MixedDataset, interleave_datasets
from dlpipe.reshard import ReshardSummary, reshard
from dlpipe.verify import VerifyReport, verify

__all__ = [
    "ConfigError",
    "DlpipeError",
    "FormatError",
    "LoaderWorkerError",
    "MixedDataset",
    "MissingDependencyError",
    "OutputError",
    "OutputLockedError",
    "PaddingError",
    "ReshardSummary",
    "ShardDataset",
    "VerifyError",
    "VerifyReport",
    "__version__",
    "interleave_datasets",
    "load_dataset",
    "reshard",
    "verify",
]
