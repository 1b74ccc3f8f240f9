"""Every influence method by name, for ``InfluenceAnalysis(method=...)`` (math core, torch only)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from .methods import ArnoldiInfluence, ExactInfluence, InfluenceMethod, KFACInfluence

__all__ = ["METHODS", "HESSIAN_METHODS", "make_method"]

HESSIAN_METHODS = ("ekfac", "kfac", "arnoldi", "exact", "cg")
METHODS = HESSIAN_METHODS + (
    "relatif",
    "randproj",
    "representer",
    "representer_lje",
    "boundary",
    "gex",
)


def make_method(
    method: str,
    modules: Dict[str, nn.Module],
    damping: Optional[float] = None,
    arnoldi_dim: int = 200,
    top_k_eigen: int = 50,
    fisher: str = "true",
    max_examples: Optional[int] = None,
    seed: int = 0,
    curvature: str = "hessian",
    relatif_base: str = "ekfac",
    **options: Any,
) -> InfluenceMethod:
    """Build a method by name (see :data:`METHODS`); ``options`` go to the constructors of the
    methods without a Hessian (e.g. ``projection_dim`` for randproj, ``num_ens`` for gex)."""
    hess = dict(
        damping=damping,
        arnoldi_dim=arnoldi_dim,
        top_k_eigen=top_k_eigen,
        fisher=fisher,
        max_examples=max_examples,
        seed=seed,
        curvature=curvature,
    )
    if method in ("ekfac", "kfac"):
        return KFACInfluence(modules, damping, method == "ekfac", fisher, max_examples, seed)
    if method == "arnoldi":
        return ArnoldiInfluence(damping, arnoldi_dim, top_k_eigen, seed)
    if method == "exact":
        return ExactInfluence(damping, curvature)
    if method == "cg":
        return ExactInfluence(damping, "hessian", solver="cg")
    if method == "relatif":
        if relatif_base not in HESSIAN_METHODS:
            raise ValueError(
                f"relatif_base={relatif_base!r}: RelatIF needs a Hessian; use one of "
                f"{list(HESSIAN_METHODS)}."
            )
        from .relatif import RelatIFInfluence

        return RelatIFInfluence(make_method(relatif_base, modules, **hess))
    if method == "randproj":
        from .randproj import RandProjInfluence

        return RandProjInfluence(modules, seed=seed, **options)
    if method in ("representer", "representer_lje"):
        from .representer import RepresenterPoints

        variant = "lje" if method == "representer_lje" else "refit"
        if variant == "lje" and damping is not None:
            options = {"damping": damping, **options}
        return RepresenterPoints(variant=variant, **options)
    if method == "boundary":
        from .boundary import BoundaryInfluence

        # negative distance: higher = closer to the boundary = more influential, as every
        # other method's self-influence ranks (Influenciae's sign)
        return BoundaryInfluence(**{"score": "negative", **options})
    if method == "gex":
        from .gex import GeometricEnsembleInfluence

        return GeometricEnsembleInfluence(seed=seed, **options)
    raise ValueError(f"method={method!r}: use one of {list(METHODS)}.")
