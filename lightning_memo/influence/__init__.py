"""Per-sample gradients, projections and influence estimators (math core, torch only)."""

from .grads import LinearGradCapture, linear_grads_from_io, per_sample_grads, select_parameters
from .projection import DenseProjector, KroneckerProjector, kronecker_dims, random_matrix
from .tracin import (
    GradientStore,
    row_dot,
    row_sq_norm,
    top_k,
    tracin_scores,
    tracin_self_influence,
)

__all__ = [
    "LinearGradCapture",
    "linear_grads_from_io",
    "per_sample_grads",
    "select_parameters",
    "DenseProjector",
    "KroneckerProjector",
    "kronecker_dims",
    "random_matrix",
    "GradientStore",
    "tracin_scores",
    "tracin_self_influence",
    "top_k",
    "row_dot",
    "row_sq_norm",
]
