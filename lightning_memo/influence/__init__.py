"""Per-sample gradients, projections and influence estimators (math core, torch only)."""

from .arnoldi import arnoldi_eigen, arnoldi_embedding, arnoldi_iteration
from .features import GradientFeaturizer
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
    BatchInfluenceMethod,
    BoundaryInfluence,
    ExactInfluence,
    FitContext,
    GeometricEnsembleInfluence,
    InfluenceMethod,
    KFACInfluence,
    RandProjInfluence,
    RelatIFInfluence,
    RepresenterPoints,
    query_matrix,
    train_pass,
)
from .projection import DenseProjector, KroneckerProjector, kronecker_dims, random_matrix
from .registry import HESSIAN_METHODS, METHODS, make_method
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
    "GradientFeaturizer",
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
    "BatchInfluenceMethod",
    "FitContext",
    "ExactInfluence",
    "ArnoldiInfluence",
    "KFACInfluence",
    "RelatIFInfluence",
    "RandProjInfluence",
    "RepresenterPoints",
    "BoundaryInfluence",
    "GeometricEnsembleInfluence",
    "make_method",
    "METHODS",
    "HESSIAN_METHODS",
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
