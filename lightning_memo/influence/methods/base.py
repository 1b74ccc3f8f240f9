"""The interface every influence method implements, and the drivers that run it over data.

A method turns per-sample gradients ``{param name: (B, *shape)}`` (from
``GradientFeaturizer.grad_dict``: the one gradient code path shared with TracIn) into rows, so
that

    score(q, z) = <query_rows(g_q), train_rows(g_z)> = g_q^T (H + damping I)^{-1} g_z

A positive score makes z a *proponent* of q (up-weighting z lowers q's loss to first order; Koh &
Liang's I_up,loss is its negative). ``self_influence(g_z) = g_z^T (H + damping I)^{-1} g_z`` and
``hinv_norm(g_z) = ||(H + damping I)^{-1} g_z||`` (RelatIF's normaliser). H is the Hessian (or
GGN / Fisher) of the mean per-sample loss over the fit data.

Methods that read the batch itself instead of gradients (:class:`BatchInfluenceMethod`:
random projection, representer points, boundary, GEX) have the same entry points with a
``_batch`` suffix (``self_influence_batch(batch)``, ...); :func:`entry` picks the right one and
the drivers :func:`query_matrix` / :func:`train_pass` use it. Math core: torch only.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..hessian import _check_damping

__all__ = [
    "FitContext",
    "InfluenceMethod",
    "BatchInfluenceMethod",
    "check_damping",
    "entry",
    "param_checksum",
    "query_matrix",
    "train_pass",
]

Grads = Dict[str, torch.Tensor]  # {param name: (B, *param.shape)}
LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> (B,)
OutputFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> logits (B, C)
GradFn = Callable[[Any], Any]  # batch -> grads (or the batch itself: BatchInfluenceMethod)
IndexFn = Callable[[Any], torch.Tensor]  # batch -> (B,) sample indices
Progress = Callable[[Iterable[Any]], Iterable[Any]]  # wraps an iterable (e.g. tqdm)


def param_checksum(params: Dict[str, torch.Tensor]) -> str:
    """SHA-1 of the parameters' values (detects a model changed after fitting)."""
    h = hashlib.sha1()
    for name, p in params.items():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_damping(damping: Any) -> Optional[float]:
    """``None`` or a positive finite number (as float); anything else raises ``ValueError``."""
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise ValueError(
            f"damping={damping!r}: use a positive number (e.g. 1e-3), or None for the "
            "automatic damping (0.1 x the mean eigenvalue of the curvature)."
        )
    _check_damping(float(damping))
    return float(damping)


@dataclasses.dataclass
class FitContext:
    """What a method may need from its caller besides the model, parameters, loss and data.

    Every field is optional; a method reads the ones it uses (``InfluenceAnalysis`` fills them
    from its accessors and the Trainer; in a notebook pass a dict with the keys you need).

    Attributes:
        output_fn: ``(model, batch) -> logits (B, C)`` (or ``(B, T, C)``): the true Fisher of
            K-FAC / EK-FAC, the GGN of ``ExactInfluence(curvature="ggn")``.
        output_loss_fn: ``(outputs, batch) -> (B,)``: the GGN's loss on the outputs.
        mask_fn: ``batch -> (B, T)`` padding mask (1 = real token) for token-level statistics.
        reduce: ``{name: tensor} -> {name: summed over ranks}``; a method whose
            ``fit_shardable`` is True uses it to merge the statistics of its shard.
        progress: wraps an iterable for a progress bar (e.g. ``tqdm``).
        input_fn: ``batch -> inputs (B, *shape)`` (boundary, representer points).
        label_fn: ``batch -> (B,)`` integer labels (representer points).
        index_fn: ``batch -> (B,)`` sample indices (representer points' ``indices``).
    """

    output_fn: Optional[OutputFn] = None
    output_loss_fn: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None
    mask_fn: Optional[Callable[[Any], Optional[torch.Tensor]]] = None
    reduce: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
    progress: Optional[Progress] = None
    input_fn: Optional[Callable[[Any], torch.Tensor]] = None
    label_fn: Optional[Callable[[Any], torch.Tensor]] = None
    index_fn: Optional[IndexFn] = None

    @classmethod
    def of(cls, context: Union[None, FitContext, Mapping[str, Any]]) -> FitContext:
        """A ``FitContext`` from ``None``, a context or a dict (unknown keys raise)."""
        if context is None:
            return cls()
        if isinstance(context, cls):
            return context
        if not isinstance(context, Mapping):
            raise TypeError(
                f"context must be a FitContext or a dict, got {type(context).__name__}."
            )
        names = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(context) - set(names))
        if bad:
            raise ValueError(f"context keys {bad} are unknown; the fit context has {names}.")
        return cls(**context)


class InfluenceMethod:
    """Base class: ``fit`` on the fit data, then rows and scores for any gradients.

    Args:
        damping: lambda > 0 added to the curvature; ``None``: 0.1 x the mean eigenvalue of the
            curvature the method uses (per layer for K-FAC; over the kept eigenvalues for Arnoldi).
    """

    name = "base"
    #: what the entry points receive: per-sample gradients ``{param: (B, *shape)}`` (True) or the
    #: batch itself, on the model's device (False: :class:`BatchInfluenceMethod`)
    uses_gradients = True
    #: the data ``fit`` receives: ``"hessian"`` (the curvature subset) or ``"train"`` (the whole
    #: training set, e.g. to refit a last layer)
    fit_data = "hessian"
    #: whether each rank may fit on its own shard of the fit data (plain-sum statistics merged
    #: by the context's ``reduce``); otherwise every rank fits on all of it
    fit_shardable = False
    #: whether pairwise scores exist (boundary influence has only a per-sample score)
    has_scores = True
    #: whether ``state_dict`` / ``load_state_dict`` restore a fitted method (factor caching)
    cacheable = False
    #: the layer types differentiated by default (when no layers are named)
    layer_types: Tuple[type, ...] = (nn.Linear,)
    #: whether the method works on whole layers (all of a layer's parameters), not on any
    #: subset of parameters
    whole_layers = False

    def __init__(self, damping: Optional[float] = None) -> None:
        self.damping = check_damping(damping)
        self.checksum: Optional[str] = None
        self.fitted = False

    # -- to implement
    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        raise NotImplementedError

    def query_rows(self, grads: Grads) -> torch.Tensor:
        """(B, k): preconditioned query gradients."""
        raise NotImplementedError

    def train_rows(self, grads: Grads) -> torch.Tensor:
        """(B, k): training gradients in the same coordinates as :meth:`query_rows`."""
        raise NotImplementedError

    def self_influence(self, grads: Grads) -> torch.Tensor:
        """(B,) float64: g^T (H + lambda I)^{-1} g."""
        raise NotImplementedError

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        """(B,) float64: ||(H + lambda I)^{-1} g|| (NaN for methods without a Hessian)."""
        rows = self.train_rows(grads)
        return torch.full((rows.shape[0],), float("nan"), dtype=torch.float64)

    def train_scores(self, query_rows: torch.Tensor, grads: Grads) -> torch.Tensor:
        """(n_query, B) scores of preconditioned ``query_rows: (n_query, k)`` against a batch's
        training gradients: ``query_rows @ train_rows(grads).T`` (a method may avoid forming the
        whole (B, k) rows)."""
        t = self.train_rows(grads).to(device=query_rows.device, dtype=query_rows.dtype)
        return query_rows @ t.T

    def self_influence_and_hinv_norm(self, grads: Grads) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(self_influence, hinv_norm)`` of one batch; a method that can share work between
        the two (K-FAC: one rotation) overrides it."""
        return self.self_influence(grads), self.hinv_norm(grads)

    # -- shared
    def fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: Union[None, FitContext, Mapping[str, Any]] = None,
    ) -> InfluenceMethod:
        """Fit at the model's current weights.

        Args:
            model: the network (any ``nn.Module``; no Trainer needed).
            params: ``{name: parameter}`` differentiated (e.g. ``GradientFeaturizer.params``).
            loss_fn: ``(model, batch) -> (B,)`` per-sample losses.
            data: re-iterable batches (a DataLoader or a list): the Hessian data
                (``fit_data == "hessian"``) or the training set (``"train"``).
            context: a :class:`FitContext` or a dict of its fields (``output_fn``,
                ``mask_fn``, ``reduce``, ``progress``, ``input_fn``, ...).

        Returns:
            ``self``, fitted.
        """
        self._fit(model, params, loss_fn, data, FitContext.of(context))
        self.checksum = param_checksum(params)
        self.fitted = True
        return self

    def check_model(self, params: Dict[str, torch.Tensor]) -> None:
        """Raise if the parameters changed since :meth:`fit` (the curvature is stale)."""
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(...) first.")
        if self.checksum is not None and param_checksum(params) != self.checksum:
            raise RuntimeError(
                "The model's parameters changed after the influence factors were fitted (parameter "
                "checksum differs): the curvature no longer matches the model. Refit (run the "
                "analysis again) after changing the model."
            )

    def scores(self, query_grads: Grads, train_grads: Grads) -> torch.Tensor:
        """(n_query, B) influence of each training sample on each query."""
        q, t = self.query_rows(query_grads), self.train_rows(train_grads)
        return q @ t.to(q.dtype).T

    def damping_used(self) -> Any:
        """The damping the fitted method uses (``None`` for the methods without one)."""
        return self.damping

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "damping": self.damping, "checksum": self.checksum}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.damping, self.checksum = state["damping"], state["checksum"]
        self.fitted = True


class BatchInfluenceMethod(InfluenceMethod):
    """A method whose entry points read the batch (on the model's device), not gradients:
    ``query_rows_batch``, ``train_rows_batch``, ``self_influence_batch``, ``hinv_norm_batch``,
    ``scores_batch``. The gradient entry points raise ``TypeError`` naming the batch one."""

    uses_gradients = False

    def _batch_only(self, name: str) -> TypeError:
        return TypeError(
            f"{type(self).__name__} ({self.name!r}) reads batches, not gradients: call "
            f"{name}_batch(batch)."
        )

    def query_rows(self, grads: Grads) -> torch.Tensor:
        raise self._batch_only("query_rows")

    def train_rows(self, grads: Grads) -> torch.Tensor:
        raise self._batch_only("train_rows")

    def self_influence(self, grads: Grads) -> torch.Tensor:
        raise self._batch_only("self_influence")

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        raise self._batch_only("hinv_norm")

    def scores(self, query_grads: Grads, train_grads: Grads) -> torch.Tensor:
        raise self._batch_only("scores")

    def scores_batch(self, query_batch: Any, train_batch: Any) -> torch.Tensor:
        """(n_query, B) influence of each training sample of a batch on each query."""
        q, t = self.query_rows_batch(query_batch), self.train_rows_batch(train_batch)
        return q @ t.to(q.dtype).T

    def query_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, k) query rows of a batch."""
        raise NotImplementedError

    def train_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, k) training rows of a batch (same coordinates as the query rows)."""
        raise NotImplementedError

    def self_influence_batch(self, batch: Any) -> torch.Tensor:
        """(B,) float64 self-influence of the batch's samples."""
        raise NotImplementedError

    def hinv_norm_batch(self, batch: Any) -> torch.Tensor:
        """(B,) NaN: no Hessian."""
        raise NotImplementedError


def entry(method: InfluenceMethod, name: str) -> Callable[[Any], torch.Tensor]:
    """The entry point ``name`` (``"query_rows"``, ``"train_rows"``, ``"self_influence"``,
    ``"hinv_norm"``) for what the method reads: ``method.<name>`` (gradients) or
    ``method.<name>_batch`` (batches, ``uses_gradients=False``)."""
    return getattr(method, name if method.uses_gradients else f"{name}_batch")


# ----------------------------------------------------------------------------- drivers
def _wrap(batches: Iterable[Any], progress: Optional[Progress]) -> Iterable[Any]:
    return progress(batches) if progress is not None else batches


def query_matrix(
    method: InfluenceMethod,
    grad_fn: GradFn,
    query_batches: Iterable[Any],
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """(n_query, k) preconditioned query rows, in the order of ``query_batches``.

    Args:
        grad_fn: ``batch -> {param: (B, *shape)}`` per-sample gradients, or for a method with
            ``uses_gradients=False`` ``batch -> batch`` (e.g. moved to the model's device).
    """
    rows_of = entry(method, "query_rows")
    return torch.cat([rows_of(grad_fn(b)) for b in _wrap(query_batches, progress)])


def train_pass(
    method: InfluenceMethod,
    grad_fn: GradFn,
    train_batches: Iterable[Any],
    num_train: int,
    index_fn: Optional[IndexFn] = None,
    query_rows: Optional[torch.Tensor] = None,
    want_self: bool = True,
    want_norm: bool = False,
    progress: Optional[Progress] = None,
) -> Dict[str, torch.Tensor]:
    """One pass over the training data: self-influence ``(N,)``, scores ``(n_query, N)`` against
    ``query_rows`` and the RelatIF norms ``(N,)``, placed by sample index (``index_fn``) or by
    position. Never holds more than one batch of training gradients.

    Args:
        grad_fn: as in :func:`query_matrix`.

    Returns:
        ``{"self_influence", "scores", "hinv_norm", "seen"}`` (only those asked for; ``seen``: (N,)
        bool, the samples the pass covered).
    """
    self_of, norm_of = entry(method, "self_influence"), entry(method, "hinv_norm")
    rows_of = entry(method, "train_rows")
    dev = query_rows.device if query_rows is not None else None
    out: Dict[str, torch.Tensor] = {"seen": torch.zeros(num_train, dtype=torch.bool)}
    if want_self:
        out["self_influence"] = torch.zeros(num_train, dtype=torch.float64)
    if want_norm:
        out["hinv_norm"] = torch.zeros(num_train, dtype=torch.float64)
    if query_rows is not None:
        out["scores"] = torch.zeros(query_rows.shape[0], num_train, dtype=query_rows.dtype)
    pos = 0
    for batch in _wrap(train_batches, progress):
        grads = grad_fn(batch)
        vals: Dict[str, torch.Tensor] = {}
        if want_self and want_norm and method.uses_gradients:
            si, hn = method.self_influence_and_hinv_norm(grads)
            vals["self_influence"] = si.detach().double().cpu()
            vals["hinv_norm"] = hn.detach().double().cpu()
        elif want_self:
            vals["self_influence"] = self_of(grads).detach().double().cpu()
        if want_norm and "hinv_norm" not in vals:
            vals["hinv_norm"] = norm_of(grads).detach().double().cpu()
        if query_rows is not None:
            if method.uses_gradients:
                vals["scores"] = method.train_scores(query_rows, grads).detach().cpu()
            else:
                t = rows_of(grads).to(device=dev, dtype=query_rows.dtype)
                vals["scores"] = (query_rows @ t.T).detach().cpu()
        b = next(iter(vals.values())).shape[-1] if vals else 0
        idx = index_fn(batch).reshape(-1).cpu() if index_fn is not None else None
        if idx is None:
            idx = torch.arange(pos, pos + b)
        pos += b
        out["seen"][idx] = True
        for key, v in vals.items():
            if key == "scores":
                out[key][:, idx] = v
            else:
                out[key][idx] = v
    return out
