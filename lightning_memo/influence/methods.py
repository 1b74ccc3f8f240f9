"""Influence methods behind one interface: exact (direct or CG), Arnoldi, K-FAC and EK-FAC.

Every method turns per-sample gradients ``{param name: (B, *shape)}`` (from
``GradientFeaturizer.grad_dict``: the one gradient code path shared with TracIn) into rows, so
that

    score(q, z) = <query_rows(g_q), train_rows(g_z)> = g_q^T (H + damping I)^{-1} g_z

A positive score makes z a *proponent* of q (up-weighting z lowers q's loss to first order; Koh &
Liang's I_up,loss is its negative). ``self_influence(g_z) = g_z^T (H + damping I)^{-1} g_z`` and
``hinv_norm(g_z) = ||(H + damping I)^{-1} g_z||`` (RelatIF's normaliser). H is the Hessian (or
GGN / Fisher) of the mean per-sample loss over the Hessian data. Math core: torch only.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn

from .arnoldi import arnoldi_eigen
from .hessian import (
    _check_damping,
    check_eigenvalues,
    conjugate_gradient,
    exact_ggn,
    exact_hessian,
    flatten_batch,
    make_hvp,
    round_off,
)
from .kfac import KFAC, check_kfac_modules, fit_kfac, with_bias_column

__all__ = [
    "InfluenceMethod",
    "ExactInfluence",
    "ArnoldiInfluence",
    "KFACInfluence",
    "param_checksum",
    "query_matrix",
    "train_pass",
]

Grads = Dict[str, torch.Tensor]  # {param name: (B, *param.shape)}
LossFn = Callable[[nn.Module, Any], torch.Tensor]
MAX_EXACT_PARAMS = 5_000


def param_checksum(params: Dict[str, torch.Tensor]) -> str:
    """SHA-1 of the parameters' values (detects a model changed after fitting)."""
    h = hashlib.sha1()
    for name, p in params.items():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


class InfluenceMethod:
    """Base class: ``fit`` on Hessian data, then rows and scores for any gradients.

    Args:
        damping: lambda > 0 added to the curvature; ``None``: 0.1 x the mean eigenvalue of the
            curvature the method uses (per layer for K-FAC; over the kept eigenvalues for Arnoldi).
    """

    name = "base"
    #: what the row functions receive: per-sample gradients ``{param: (B, *shape)}`` (True) or
    #: the batch itself, on the model's device (False: e.g. representer points, GEX)
    uses_gradients = True
    #: the data ``fit`` receives: ``"hessian"`` (the curvature subset) or ``"train"`` (the whole
    #: training set, e.g. to refit a last layer)
    fit_data = "hessian"
    #: whether pairwise scores exist (boundary influence has only a per-sample score)
    has_scores = True
    #: whether ``state_dict`` / ``load_state_dict`` restore a fitted method (factor caching)
    cacheable = False

    def __init__(self, damping: Optional[float] = None) -> None:
        if damping is not None:
            if isinstance(damping, bool) or not isinstance(damping, (int, float)):
                raise ValueError(
                    f"damping={damping!r}: use a positive number (e.g. 1e-3), or None for the "
                    "automatic damping (0.1 x the mean eigenvalue of the curvature)."
                )
            _check_damping(float(damping))
        self.damping = None if damping is None else float(damping)
        self.checksum: Optional[str] = None
        self.fitted = False

    # -- to implement
    def _fit(self, model: nn.Module, params: Dict[str, nn.Parameter], loss_fn: LossFn,
             batches: Iterable[Any], **kw: Any) -> None:  # fmt: skip
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

    # -- shared
    def fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: LossFn,
        batches: Iterable[Any],
        **kw: Any,
    ) -> InfluenceMethod:
        """Fit the curvature on ``batches`` (the Hessian data) at the model's current weights."""
        self._fit(model, params, loss_fn, batches, **kw)
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

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "damping": self.damping, "checksum": self.checksum}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.damping, self.checksum = state["damping"], state["checksum"]
        self.fitted = True


# ----------------------------------------------------------------------------- exact
class ExactInfluence(InfluenceMethod):
    """Full Hessian (or GGN) of the chosen parameters, damped, solved by eigendecomposition
    (``solver="direct"``) or by conjugate gradients on Hessian-vector products (``"cg"``).

    Args:
        damping: lambda (``None``: 0.1 x mean eigenvalue; for CG, ``None`` means 1e-3).
        curvature: ``"hessian"`` or ``"ggn"`` (needs ``output_fn`` and ``output_loss_fn`` in fit).
        solver: ``"direct"`` (P <= 5,000) or ``"cg"``.
    """

    name = "exact"

    cacheable = True

    def __init__(
        self,
        damping: Optional[float] = None,
        curvature: str = "hessian",
        solver: str = "direct",
        cg_tol: float = 1e-8,
        cg_max_iter: Optional[int] = None,
    ) -> None:
        super().__init__(damping)
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature={curvature!r}: use 'hessian' or 'ggn'.")
        if solver not in ("direct", "cg"):
            raise ValueError(f"solver={solver!r}: use 'direct' or 'cg'.")
        self.curvature, self.solver = curvature, solver
        self.cacheable = solver == "direct"  # CG keeps a Hessian-vector product, not factors
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.evals: Optional[torch.Tensor] = None
        self.evecs: Optional[torch.Tensor] = None
        self._hvp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._last: Optional[tuple] = None  # (gradients, solve) of the last CG batch

    def _fit(self, model, params, loss_fn, batches, output_fn=None, output_loss_fn=None, **kw):
        size = sum(p.numel() for p in params.values())
        if self.solver == "cg":
            if self.curvature != "hessian":
                raise ValueError("solver='cg' uses Hessian-vector products: curvature='hessian'.")
            self._hvp = make_hvp(model, params, loss_fn, list(batches))
            if self.damping is None:
                self.damping = 1e-3
            return
        if size > MAX_EXACT_PARAMS:
            raise ValueError(
                f"method='exact' builds the full {size} x {size} Hessian of the chosen parameters; "
                f"that is more than {MAX_EXACT_PARAMS} parameters. Choose a small head with "
                "layers= (e.g. the last Linear layer), or use method='arnoldi', 'kfac' or 'ekfac'."
            )
        if self.curvature == "ggn":
            if output_fn is None or output_loss_fn is None:
                raise ValueError(
                    "curvature='ggn' needs output_fn(model, batch) -> outputs (B, C) and "
                    "output_loss_fn(outputs, batch) -> (B,)."
                )
            h = exact_ggn(model, params, output_fn, output_loss_fn, batches)
        else:
            h = exact_hessian(model, params, loss_fn, batches)
        evals, evecs = torch.linalg.eigh((h + h.T) / 2)
        self.evals, self.evecs = _drop_negative(evals, evecs, "Hessian")
        if self.damping is None:
            self.damping = max(0.1 * float(self.evals.mean()), 1e-12)

    def _coef(self, grads: Grads) -> torch.Tensor:
        g = flatten_batch(grads).to(torch.float64)
        return g @ self.evecs.to(g.device)  # (B, P) coordinates in the eigenbasis

    def _solve(self, grads: Grads) -> torch.Tensor:
        """(B, P) float64: (H + lambda I)^{-1} g (CG: the last batch's solve is reused, since
        self-influence and the RelatIF norm of one batch need the same solve)."""
        if self.solver == "cg":
            g = flatten_batch(grads).to(torch.float64)
            if self._last is not None and self._last[0].shape == g.shape:
                if torch.equal(self._last[0], g):
                    return self._last[1]
            x = conjugate_gradient(self._hvp, g.T, self.damping, self.cg_tol, self.cg_max_iter).T
            self._last = (g, x)
            return x
        c = self._coef(grads) / (self.evals.to(self.evecs.device) + self.damping)
        return c @ self.evecs.to(c.device).T

    def query_rows(self, grads: Grads) -> torch.Tensor:
        return self._solve(grads)

    def train_rows(self, grads: Grads) -> torch.Tensor:
        return flatten_batch(grads).to(torch.float64)

    def self_influence(self, grads: Grads) -> torch.Tensor:
        if self.solver == "cg":
            return (self._solve(grads) * self.train_rows(grads)).sum(dim=1)
        c = self._coef(grads)
        return (c.square() / (self.evals.to(c.device) + self.damping)).sum(dim=1)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        return self._solve(grads).norm(dim=1)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "evals": self.evals, "evecs": self.evecs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.evals, self.evecs = state["evals"], state["evecs"]


# ----------------------------------------------------------------------------- Arnoldi
class ArnoldiInfluence(InfluenceMethod):
    """Arnoldi iteration on Hessian-vector products; the top-k eigenpairs approximate H
    (Schioppa et al., AAAI 2022). Gradients become k-vectors ``U^T g / sqrt(Lambda + lambda)``.

    Args:
        arnoldi_dim: Krylov iterations (<= parameter count); top_k: eigenpairs kept.
        seed: start vector; force_hermitian: symmetrise the projected matrix.
    """

    name = "arnoldi"

    cacheable = True

    def __init__(
        self,
        damping: Optional[float] = None,
        arnoldi_dim: int = 200,
        top_k: int = 50,
        seed: int = 0,
        force_hermitian: bool = True,
    ) -> None:
        super().__init__(damping)
        if top_k < 1 or arnoldi_dim < top_k:
            raise ValueError(
                f"arnoldi_dim={arnoldi_dim}, top_k={top_k}: need 1 <= top_k <= arnoldi_dim."
            )
        self.arnoldi_dim, self.top_k, self.seed = int(arnoldi_dim), int(top_k), int(seed)
        self.force_hermitian = force_hermitian
        self._vecs: Dict[str, Any] = {}  # eigenvectors cached in the gradients' dtype / device
        self.evals: Optional[torch.Tensor] = None
        self.evecs: Optional[torch.Tensor] = None

    def _fit(self, model, params, loss_fn, batches, device=None, **kw):
        size = sum(p.numel() for p in params.values())
        hvp = make_hvp(model, params, loss_fn, list(batches))
        dev = next(iter(params.values())).device
        # all Ritz pairs, then the top_k largest *positive* ones (as Captum / Schioppa et al.):
        # a negative-curvature direction would otherwise take a slot and, clamped to 0, get the
        # largest weight 1 / damping
        evals, evecs = arnoldi_eigen(
            hvp,
            size,
            self.arnoldi_dim,
            self.arnoldi_dim,
            seed=self.seed,
            force_hermitian=self.force_hermitian,
            device=dev,
        )
        evals, evecs = _drop_negative(evals, evecs, "Arnoldi Hessian")
        order = torch.argsort(evals, descending=True)[: self.top_k]
        self.evals, self.evecs = evals[order], evecs[:, order]
        if self.damping is None:
            self.damping = max(0.1 * float(self.evals.mean()), 1e-12)

    def _coef(self, grads: Grads) -> torch.Tensor:
        """(B, k) float64 coordinates in the eigenbasis (projected in the gradients' dtype)."""
        g = flatten_batch(grads)
        dt = torch.promote_types(g.dtype, torch.float32)
        key = (g.device, dt)
        if self._vecs.get("key") != key:
            self._vecs = {"key": key, "U": self.evecs.to(device=g.device, dtype=dt)}
        return (g.to(dt) @ self._vecs["U"]).to(torch.float64)

    def train_rows(self, grads: Grads) -> torch.Tensor:
        c = self._coef(grads)
        return c / torch.sqrt(self.evals.to(c.device) + self.damping)

    query_rows = train_rows

    def self_influence(self, grads: Grads) -> torch.Tensor:
        return self.train_rows(grads).square().sum(dim=1)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        c = self._coef(grads)
        return (c / (self.evals.to(c.device) + self.damping)).norm(dim=1)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "evals": self.evals, "evecs": self.evecs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.evals, self.evecs = state["evals"], state["evecs"]
        self._vecs = {}


def _drop_negative(evals: torch.Tensor, evecs: torch.Tensor, what: str):
    """Keep the eigenpairs of non-negative curvature (round-off negatives count as 0); the
    directions of truly negative curvature are dropped (no weight), with a warning giving their
    count. evals: (n,), evecs: (P, n)."""
    clamped = check_eigenvalues(evals, what)  # warns with the count of the negative ones
    keep = evals >= -round_off(evals)
    return clamped[keep], evecs[:, keep]


# ----------------------------------------------------------------------------- K-FAC / EK-FAC
class KFACInfluence(InfluenceMethod):
    """K-FAC (``ekfac=False``) or EK-FAC Fisher of ``nn.Linear`` / ``nn.Conv2d`` layers
    (George et al. 2018; Grosse et al. 2023); scores summed over layers.

    Args:
        modules: ``{name: layer}``; ekfac: eigenvalue correction; fisher: ``"true"`` (labels
            sampled from the model; needs ``output_fn`` in fit) or ``"empirical"``;
        max_examples: cap on the samples used for the factors; seed: label sampling.
    """

    cacheable = True

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        damping: Optional[float] = None,
        ekfac: bool = True,
        fisher: str = "true",
        max_examples: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(damping)
        check_kfac_modules(modules)
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher={fisher!r}: use 'true' or 'empirical'.")
        self.modules, self.ekfac, self.fisher = modules, ekfac, fisher
        self.max_examples, self.seed = max_examples, seed
        self.name = "ekfac" if ekfac else "kfac"
        self.kfac: Optional[KFAC] = None

    def _fit(self, model, params, loss_fn, batches, output_fn=None, progress=None, **kw):
        self.kfac = fit_kfac(
            model,
            self.modules,
            loss_fn,
            batches,
            ekfac=self.ekfac,
            damping=self.damping,
            fisher=self.fisher,
            output_fn=output_fn,
            max_examples=self.max_examples,
            seed=self.seed,
            progress=progress,
            **kw,
        )

    def layer_grads(self, grads: Grads) -> Dict[str, torch.Tensor]:
        """``{layer: (B, d_out, d_in + 1)}`` ([W | b], conv weights flattened per filter)."""
        out = {}
        for name in self.modules:
            pre = f"{name}." if name else ""
            w = grads[pre + "weight"]
            w = w.reshape(w.shape[0], w.shape[1], -1)
            out[name] = with_bias_column(w, grads.get(pre + "bias"))
        return out

    @staticmethod
    def _flat(layers: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(g.shape[0], -1) for g in layers.values()], dim=1)

    def query_rows(self, grads: Grads) -> torch.Tensor:
        return self._flat(self.kfac.precondition(self.layer_grads(grads)))

    def train_rows(self, grads: Grads) -> torch.Tensor:
        return self._flat(self.layer_grads(grads))

    def self_influence(self, grads: Grads) -> torch.Tensor:
        return self.kfac.self_influence(self.layer_grads(grads)).to(torch.float64)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        return self.query_rows(grads).to(torch.float64).norm(dim=1)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "kfac": self.kfac.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kfac = KFAC(self.modules, ekfac=self.ekfac, damping=self.damping)
        self.kfac.load_state_dict(state["kfac"])


# ----------------------------------------------------------------------------- drivers
GradFn = Callable[[Any], Any]  # batch -> {param name: (B, *shape)} (or the batch: uses_gradients)
IndexFn = Callable[[Any], torch.Tensor]  # batch -> (B,) sample indices


def _wrap(batches: Iterable[Any], progress: Optional[Callable]) -> Iterable[Any]:
    return progress(batches) if progress is not None else batches


def query_matrix(
    method: InfluenceMethod,
    grad_fn: GradFn,
    query_batches: Iterable[Any],
    progress: Optional[Callable] = None,
) -> torch.Tensor:
    """(n_query, k) preconditioned query rows, in the order of ``query_batches``."""
    rows = [method.query_rows(grad_fn(b)) for b in _wrap(query_batches, progress)]
    return torch.cat(rows)


def train_pass(
    method: InfluenceMethod,
    grad_fn: GradFn,
    train_batches: Iterable[Any],
    num_train: int,
    index_fn: Optional[IndexFn] = None,
    query_rows: Optional[torch.Tensor] = None,
    want_self: bool = True,
    want_norm: bool = False,
    progress: Optional[Callable] = None,
) -> Dict[str, torch.Tensor]:
    """One pass over the training data: self-influence ``(N,)``, scores ``(n_query, N)`` against
    ``query_rows`` and the RelatIF norms ``(N,)``, placed by sample index (``index_fn``) or by
    position. Never holds more than one batch of training gradients.

    Returns:
        ``{"self_influence", "scores", "hinv_norm", "seen"}`` (only those asked for; ``seen``: (N,)
        bool, the samples the pass covered).
    """
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
        if want_self:
            vals["self_influence"] = method.self_influence(grads).detach().double().cpu()
        if want_norm:
            vals["hinv_norm"] = method.hinv_norm(grads).detach().double().cpu()
        if query_rows is not None:
            t = method.train_rows(grads).to(device=dev, dtype=query_rows.dtype)
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
