"""Per-sample gradients, projections and influence estimators (math core, torch only)."""

from .arnoldi import arnoldi_eigen, arnoldi_embedding, arnoldi_iteration
from .grads import (
    SUPPORTED_LAYERS,
    LayerGradCapture,
    LinearGradCapture,
    layer_dims,
    linear_grads_from_io,
    per_sample_grads,
    select_parameters,
)
from .hessian import conjugate_gradient, exact_ggn, exact_hessian, make_hvp, solve_damped
from .kfac import KFAC, fit_kfac
from .methods import (
    ArnoldiInfluence,
    ExactInfluence,
    InfluenceMethod,
    KFACInfluence,
    query_matrix,
    train_pass,
)
from .projection import DenseProjector, KroneckerProjector, kronecker_dims, random_matrix
from .registry import METHODS, make_method
from .relatif import RelatIFInfluence
from .tracin import (
    GradientStore,
    row_dot,
    row_sq_norm,
    top_k,
    tracin_scores,
    tracin_self_influence,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "LayerGradCapture",
    "layer_dims",
    "arnoldi_eigen",
    "arnoldi_embedding",
    "arnoldi_iteration",
    "conjugate_gradient",
    "exact_ggn",
    "exact_hessian",
    "make_hvp",
    "solve_damped",
    "KFAC",
    "fit_kfac",
    "InfluenceMethod",
    "ExactInfluence",
    "ArnoldiInfluence",
    "KFACInfluence",
    "make_method",
    "METHODS",
    "RelatIFInfluence",
    "query_matrix",
    "train_pass",
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
