"""Every influence method by name: a table name -> (class, the options it takes), for
``InfluenceAnalysis(method=...)`` and :func:`make_method` (math core, torch only)."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple, Type

from torch import nn

from .methods import (
    ArnoldiInfluence,
    BoundaryInfluence,
    ExactInfluence,
    GeometricEnsembleInfluence,
    InfluenceMethod,
    KFACInfluence,
    RandProjInfluence,
    RelatIFInfluence,
    RepresenterPoints,
)

__all__ = [
    "METHODS",
    "HESSIAN_METHODS",
    "MethodSpec",
    "make_method",
    "check_method",
    "method_options",
    "default_layer_types",
]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of the registry.

    Attributes:
        cls: the method's class.
        options: the keyword options :func:`make_method` accepts for this name (constructor
            arguments of ``cls``; for ``"relatif"`` its own, the base's are added).
        fixed: constructor arguments the name itself sets (e.g. ``ekfac=True``).
        defaults: defaults of this name that differ from the class's (overridable).
        takes_modules: the constructor's first argument is ``{name: layer}``.
    """

    cls: Type[InfluenceMethod]
    options: Tuple[str, ...]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    takes_modules: bool = False


_KFAC = ("damping", "fisher", "max_examples", "seed")
_REPRESENTER = ("layer", "target", "targets", "input_fn", "label_fn")
_BOUNDARY = ("overshoot", "max_iter", "eps", "num_classes", "input_fn", "forward_fn")
_BOUNDARY += ("binary_logit", "score", "line_search")
_GEX = ("num_ens", "ft_lr", "ft_step", "schedule", "momentum", "max_grad_norm", "weight_decay")
_GEX += ("start", "center", "loss_floor", "shuffle_buffer", "seed")

#: name -> :class:`MethodSpec`; ``list(METHODS)`` are the method names
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        "ekfac": MethodSpec(KFACInfluence, _KFAC, {"ekfac": True}, takes_modules=True),
        "kfac": MethodSpec(KFACInfluence, _KFAC, {"ekfac": False}, takes_modules=True),
        "arnoldi": MethodSpec(
            ArnoldiInfluence, ("damping", "arnoldi_dim", "arnoldi_k", "seed", "force_hermitian")
        ),
        "exact": MethodSpec(ExactInfluence, ("damping", "curvature"), {"solver": "direct"}),
        "cg": MethodSpec(
            ExactInfluence,
            ("damping", "cg_tol", "cg_max_iter"),
            {"solver": "cg", "curvature": "hessian"},
        ),
        "relatif": MethodSpec(
            RelatIFInfluence, ("relatif_base",), defaults={"relatif_base": "ekfac"}
        ),
        "randproj": MethodSpec(RandProjInfluence, ("projection_dim", "seed"), takes_modules=True),
        "representer": MethodSpec(
            RepresenterPoints,
            _REPRESENTER + ("l2", "self_measure", "tol", "max_iter"),
            {"variant": "refit"},
        ),
        "representer_lje": MethodSpec(
            RepresenterPoints,
            _REPRESENTER + ("ascent_lr", "damping", "rcond", "max_params"),
            {"variant": "lje"},
        ),
        # negative distance: higher = closer to the boundary = more influential, as every
        # other method's self-influence ranks (Influenciae's sign)
        "boundary": MethodSpec(BoundaryInfluence, _BOUNDARY, defaults={"score": "negative"}),
        "gex": MethodSpec(GeometricEnsembleInfluence, _GEX),
    }
)
#: the methods with a curvature (the bases RelatIF accepts)
HESSIAN_METHODS = ("ekfac", "kfac", "arnoldi", "exact", "cg")


def _spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {list(METHODS)}.")
    return METHODS[method]


def _base_name(method: str, options: Mapping[str, Any]) -> Optional[str]:
    """RelatIF's base method (checked), ``None`` for the other methods."""
    if method != "relatif":
        return None
    base = options.get("relatif_base", METHODS["relatif"].defaults["relatif_base"])
    if base not in HESSIAN_METHODS:
        raise ValueError(
            f"relatif_base={base!r}: RelatIF needs a Hessian; use one of {list(HESSIAN_METHODS)}."
        )
    return base


def method_options(method: str, relatif_base: Optional[str] = None) -> Tuple[str, ...]:
    """The options :func:`make_method` accepts for ``method`` (RelatIF: ``relatif_base`` plus
    those of its base)."""
    spec = _spec(method)
    base = _base_name(method, {} if relatif_base is None else {"relatif_base": relatif_base})
    return spec.options + (METHODS[base].options if base else ())


def make_method(
    method: str, modules: Optional[Dict[str, nn.Module]] = None, **options: Any
) -> InfluenceMethod:
    """Build a method by name (see :data:`METHODS`).

    Args:
        method: a key of :data:`METHODS`.
        modules: ``{name: layer}`` differentiated (needed by K-FAC / EK-FAC and randproj; RelatIF
            passes them to its base).
        **options: the method's options (:func:`method_options`), e.g. ``damping=1e-3``,
            ``arnoldi_k=20``, ``fisher="empirical"``, ``projection_dim=256``, ``num_ens=8``.

    Raises:
        ValueError: an unknown method, an option the method does not take (the message names
            the method and its options), or a bad option value.
    """
    spec = _spec(method)
    base = _base_name(method, options)
    accepted = method_options(method, base)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(
            f"method={method!r} takes no option {', '.join(map(repr, unknown))}; its options are "
            f"{', '.join(accepted)}."
        )
    if base is not None:
        rest = {k: v for k, v in options.items() if k != "relatif_base"}
        return RelatIFInfluence(make_method(base, modules, **rest))
    kwargs = {**spec.defaults, **options, **spec.fixed}
    if spec.takes_modules:
        return spec.cls(modules if modules is not None else {}, **kwargs)
    return spec.cls(**kwargs)


def check_method(method: str, **options: Any) -> None:
    """Validate a method's name and options now (before any model exists): builds it on a
    stand-in layer (on the meta device: no memory, no draw from the global RNG) and raises what
    :func:`make_method` raises."""
    make_method(method, {"stand_in": nn.Linear(2, 2, device="meta")}, **options)


def default_layer_types(method: str, relatif_base: Optional[str] = None) -> Tuple[type, ...]:
    """The layer types a method differentiates when no layers are named (``nn.Linear``, plus
    ``nn.Conv2d`` for K-FAC / EK-FAC and randproj)."""
    base = _base_name(method, {} if relatif_base is None else {"relatif_base": relatif_base})
    return METHODS[base or method].cls.layer_types
