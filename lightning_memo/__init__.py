"""lightning_memo: memorization monitoring and data attribution for PyTorch Lightning."""

from .callbacks import ConceptErasure, InfluenceAnalysis, MemorizationMonitor, TracIn
from .capture import FeatureCapture, pool, resolve_layers
from .data import IndexedDataset, get_indices, get_labels, load_digits_flipped, make_accessor
from .exceptions import (
    LayerNotFoundError,
    MissingIndexError,
    MissingLabelError,
    NotFittedError,
    SampleIndexError,
)
from .leace import LeaceEraser, LeaceFitter
from .probe import probe_accuracy, probe_r2
from .psmi import PSMI, sample_directions

__all__ = [
    "PSMI",
    "sample_directions",
    "MemorizationMonitor",
    "ConceptErasure",
    "TracIn",
    "InfluenceAnalysis",
    "LeaceFitter",
    "LeaceEraser",
    "probe_accuracy",
    "probe_r2",
    "FeatureCapture",
    "pool",
    "resolve_layers",
    "IndexedDataset",
    "make_accessor",
    "get_indices",
    "get_labels",
    "load_digits_flipped",
    "LayerNotFoundError",
    "MissingIndexError",
    "MissingLabelError",
    "NotFittedError",
    "SampleIndexError",
]
__version__ = "0.1.0"
