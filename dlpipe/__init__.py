"""dlpipe: fast deep-learning input pipelines.

``dlpipe.reshard`` turns padded fixed-length data into parallel variable-length TFRecord or
WebDataset shards with a manifest and index files; ``dlpipe.verify`` checks them;
``dlpipe.load_dataset`` reads them in tf.data and PyTorch. Importing dlpipe imports neither
TensorFlow nor PyTorch: framework code loads lazily, behind pip extras.
"""

from dlpipe.engine import ReshardSummary, reshard
from dlpipe.errors import (
    ConfigError,
    DlpipeError,
    FormatError,
    MissingDependencyError,
    OutputError,
    PaddingError,
    VerifyError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DlpipeError",
    "FormatError",
    "MissingDependencyError",
    "OutputError",
    "PaddingError",
    "ReshardSummary",
    "VerifyError",
    "__version__",
    "reshard",
]
