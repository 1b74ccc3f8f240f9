"""lightning_memo: memorization monitoring and data attribution for PyTorch Lightning."""

from .callbacks import ConceptErasure, InfluenceAnalysis, MemorizationMonitor, TracIn
from .capture import FeatureCapture, pool, resolve_layers, resolve_parameters
from .data import IndexedDataset, get_indices, get_labels, make_accessor
from .exceptions import (
    LayerNotFoundError,
    MissingIndexError,
    MissingLabelError,
    NotFittedError,
    SampleIndexError,
)
from .leace import LeaceEraser, LeaceFitter, edit_norm
from .probe import probe_accuracy, probe_r2
from .psmi import PSMI, sample_directions
from .signals import loss_and_margin

__all__ = [
    "PSMI",
    "sample_directions",
    "MemorizationMonitor",
    "ConceptErasure",
    "TracIn",
    "InfluenceAnalysis",
    "LeaceFitter",
    "LeaceEraser",
    "edit_norm",
    "probe_accuracy",
    "probe_r2",
    "loss_and_margin",
    "FeatureCapture",
    "pool",
    "resolve_layers",
    "resolve_parameters",
    "IndexedDataset",
    "make_accessor",
    "get_indices",
    "get_labels",
    "LayerNotFoundError",
    "MissingIndexError",
    "MissingLabelError",
    "NotFittedError",
    "SampleIndexError",
]


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning_memo")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "0+unknown"


__version__ = _version()
