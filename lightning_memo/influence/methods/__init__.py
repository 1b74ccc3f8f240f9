"""Influence methods behind one interface (:class:`InfluenceMethod`), one file per method, and
the drivers :func:`query_matrix` / :func:`train_pass` (math core, torch only)."""

from .arnoldi import ArnoldiInfluence
from .base import (
    BatchInfluenceMethod,
    FitContext,
    InfluenceMethod,
    check_damping,
    entry,
    param_checksum,
    query_matrix,
    train_pass,
)
from .boundary import BoundaryInfluence
from .exact import ExactInfluence
from .gex import GeometricEnsembleInfluence, lr_schedule
from .kfac import KFACInfluence
from .randproj import RandProjInfluence
from .relatif import RelatIFInfluence
from .representer import RepresenterPoints

__all__ = [
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
    "lr_schedule",
    "check_damping",
    "entry",
    "param_checksum",
    "query_matrix",
    "train_pass",
]
