"""Representer points: the last Linear layer's prediction as a sum over training samples.

Two variants behind :class:`RepresenterPoints` (math core, torch only):

* ``variant="refit"`` (Yeh, Kim, Yen, Ravikumar, NeurIPS 2018, "Representer Point Selection for
  Explaining Deep Neural Networks"; name ``"representer"``). The last layer ``Theta`` (C, d) is
  refitted on the fixed training features ``f_i`` to a stationary point ``W*`` of

      J(W) = (1/n) sum_i CE(W f_i, y_i) + lambda ||W||^2

  Stationarity, ``(1/n) sum_i g_i f_i^T + 2 lambda W* = 0`` with
  ``g_i = dCE/dPhi_i = p_i - e_{y_i}`` (``Phi_i = W* f_i``, ``p_i = softmax(Phi_i)``), is the
  representer theorem

      W* = sum_i alpha_i f_i^T,   alpha_i = -g_i / (2 lambda n)   (C,)

  so the refitted pre-activation output of any input t decomposes exactly as
  ``W* f_t = sum_i alpha_i <f_i, f_t>``. The score of training sample z on query q is the
  representer value ``alpha_{z, c_q} <f_z, f_q>`` for the query's class ``c_q``.

* ``variant="lje"`` (Sui, Wu, Sanner, NeurIPS 2021, "Representer Point Selection via Local
  Jacobian Expansion for Post-hoc Classifier Explanation of Deep Neural Networks and Ensemble
  Models"; name ``"representer_lje"``). No refit: a first-order Taylor expansion of the Jacobian
  of the mean training loss ``L`` around weights ``Theta_dot`` near the trained ``Theta``
  (``Theta_dot = Theta + eta grad L(Theta)``: one gradient-*ascent* step of size ``ascent_lr``,
  as in the authors' code; ``eta = 0`` expands at the trained weights), set to zero at the
  trained optimum, gives one Newton step

      Theta_N = Theta_dot - H^{-1} grad L(Theta_dot) = sum_i M_i,
      M_i = (Theta_dot - H^{-1}[g_i f_i^T]) / n      (C, d) per training sample

  (``H``: Hessian of ``L`` in the last-layer weights at ``Theta_dot``, inverted on its range:
  softmax logits have a null direction; ``g_i``: dCE/dPhi at ``Theta_dot``). The identity
  ``sum_i M_i f_t = Theta_N f_t`` holds exactly. When ``Theta`` is a stationary point of ``L``,
  ``Theta_N = Theta`` (the ascent step is then void): the decomposition reproduces the *trained*
  network, not a refitted one; a layer ``eps`` away from the stationary point gives logits
  within O(eps^2) of it (one Newton step), and ``refit_gap`` reports the distance. The
  paper writes ``M_i`` as ``alpha_i f_i^T`` with ``alpha_i = M_i / f_i`` taken coordinate by
  coordinate; we keep ``M_i`` itself (no division by zero ReLU features). The score of z on q
  is ``[M_z f_q]_{c_q}``, z's share of the query's logit of class ``c_q``.

Rows (for :func:`~lightning_memo.influence.methods.query_matrix` / ``train_pass``), flattened
class-major over (C, d): ``train_rows_batch(z) = vec(alpha_z f_z^T)`` (refit) or ``vec(M_z)``
(LJE); ``query_rows_batch(q) = vec(e_{c_q} f_q^T)``, so their inner product is the score.

Conventions:
    * Features ``f`` are the input of the final ``nn.Linear`` (captured by a forward hook), in
      float64. A bias is folded in as a constant feature 1 (``f~ = [f, 1]``, ``Theta = [W | b]``),
      so the decomposition covers the whole logit, bias included, and the refit's L2 penalty
      covers the bias as well.
    * Loss: softmax cross-entropy on the logits (``loss_fn`` of ``fit`` is not used), against the
      labels (``targets="label"``) or the trained model's own softmax probabilities
      (``targets="model"``, as in Yeh et al.'s released code).
    * ``self_influence_batch(z)``: by default the score of z on itself at its label class,
      ``alpha_{z,y_z} ||f_z||^2`` (refit) and ``[M_z f_z]_{y_z}`` (LJE, the "self_influence" of the
      authors' code); ``self_measure="alpha"`` (refit only) gives Yeh et al.'s importance
      ``|alpha_{z,y_z}|`` (``= (1 - p_{y_z}) / (2 lambda n)`` for labels).
    * The entry points receive the batch (``uses_gradients = False``) and run the model on
      ``input_fn(batch)``; labels come from ``label_fn(batch)`` (both callables, given to the
      constructor or in the fit context); the rows are float64 on the model's device, of width
      C * (d + 1). The weight math is :mod:`lightning_memo.influence.last_layer`.

Cost: one forward pass over the training set; features (n, d + 1) float64 are kept. Refit:
LBFGS then Newton-CG on exact Hessian-vector products, O(n C d) each. LJE: the exact
(C (d + 1))^2 Hessian, built in O(n (C d)^2) and eigendecomposed (``max_params`` bounds C (d + 1)).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ...exceptions import MissingIndexError
from ..last_layer import check_output_layer, find_output_linear, layer_features, lje_step, refit_l2
from .base import BatchInfluenceMethod, FitContext, LossFn

__all__ = ["RepresenterPoints"]

VARIANTS = ("refit", "lje")
#: largest C x (d + 1) for which the LJE variant builds and eigendecomposes the exact Hessian
MAX_LJE_PARAMS = 10_000
BatchFn = Callable[[Any], Any]


class RepresenterPoints(BatchInfluenceMethod):
    """Representer points of the last Linear layer: Yeh et al. (NeurIPS 2018, L2 refit) or the
    local Jacobian expansion of Sui, Wu & Sanner (NeurIPS 2021). See the module docstring.

    Args:
        variant: ``"refit"`` (Yeh et al.; name ``"representer"``) or ``"lje"`` (Sui et al.;
            name ``"representer_lje"``). ``"l2"`` is accepted for ``"refit"``.
        l2: lambda > 0 of the refit objective ``(1/n) sum CE + lambda ||W||^2`` (refit only).
        layer: the final ``nn.Linear`` (name or module); ``None``: the last ``nn.Linear`` in
            ``model.named_modules()`` order. A forward pass checks that its output is the
            model's output.
        target: the query class ``c_q`` scored: ``"predicted"`` (argmax of the model's output)
            or ``"label"`` (the query batch's label).
        targets: the refit / expansion loss: ``"label"`` (cross-entropy with the labels) or
            ``"model"`` (with the trained model's softmax probabilities).
        self_measure: ``"score"`` (the sample's score on itself at its label class) or
            ``"alpha"`` (``|alpha_{z,y_z}|``, refit only).
        input_fn: ``batch -> inputs`` for ``model(inputs)``; ``None``: the fit context's.
        label_fn: ``batch -> (B,)`` integer labels; ``None``: the fit context's.
        ascent_lr: LJE only: size of the gradient-ascent step from the trained weights to the
            expansion point (0: expand at the trained weights).
        damping: LJE only: ``None`` solves with the pseudo-inverse of ``H`` (eigenvalues below
            ``rcond`` x the largest dropped: softmax logits have a null direction); a float > 0
            uses ``(H + damping I)^{-1}``.
        rcond: LJE pseudo-inverse cutoff, relative to the largest eigenvalue.
        tol: refit target for the largest gradient entry of J (LBFGS from the trained weights,
            then Newton-CG steps on exact Hessian-vector products).
        max_iter: LBFGS iterations before the Newton steps.
        max_params: LJE only: the largest ``C * (d + 1)`` for which the exact Hessian is built.

    Attributes (after ``fit``):
        features: (n, d') float64 training features (``d' = d + 1`` with a bias), in the order of
            the fit batches; ``labels`` (n,); ``indices`` (n,) sample indices when the fit
            context has an ``index_fn`` (else positions).
        trained_weights: (C, d') ``[W | b]`` of the trained layer.
        weights: (C, d') the weights the decomposition sums to: ``W*`` (refit) or ``Theta_N``
            (LJE); ``sum_i rows_i`` reproduces ``weights @ f``.
        alpha: (n, C) representer values (refit; ``None`` for LJE).
        refit_gap: max |logits of the trained layer - logits of ``weights``| over the training set.
        stationarity: max |grad J(W*)| (refit) or max |grad L(Theta_N)| (LJE, diagnostic).
    """

    fit_data = "train"
    has_scores = True
    cacheable = False

    def __init__(
        self,
        variant: str = "refit",
        l2: float = 1e-3,
        layer: Union[None, str, nn.Module] = None,
        target: str = "predicted",
        targets: str = "label",
        self_measure: str = "score",
        input_fn: Optional[BatchFn] = None,
        label_fn: Optional[BatchFn] = None,
        ascent_lr: float = 0.0,
        damping: Optional[float] = None,
        rcond: float = 1e-10,
        tol: float = 1e-10,
        max_iter: int = 100,
        max_params: int = MAX_LJE_PARAMS,
    ) -> None:
        super().__init__(damping)
        variant = "refit" if variant == "l2" else variant
        if variant not in VARIANTS:
            raise ValueError(
                f"variant={variant!r}: use 'refit' (Yeh et al.) or 'lje' (Sui et al.)."
            )
        if not float(l2) > 0:
            raise ValueError(f"l2={l2!r}: the refit's L2 weight must be > 0.")
        if target not in ("predicted", "label"):
            raise ValueError(f"target={target!r}: use 'predicted' or 'label'.")
        if targets not in ("label", "model"):
            raise ValueError(f"targets={targets!r}: use 'label' or 'model'.")
        if self_measure not in ("score", "alpha"):
            raise ValueError(f"self_measure={self_measure!r}: use 'score' or 'alpha'.")
        if self_measure == "alpha" and variant == "lje":
            raise ValueError(
                "self_measure='alpha' is Yeh et al.'s |alpha_{z,y_z}| of the refit; the LJE "
                "variant has per-sample weight matrices, not alpha vectors: use 'score'."
            )
        if not float(ascent_lr) >= 0:
            raise ValueError(f"ascent_lr={ascent_lr!r}: must be >= 0.")
        if not (float(tol) > 0 and int(max_iter) >= 1 and float(rcond) > 0):
            raise ValueError(f"tol={tol}, max_iter={max_iter}, rcond={rcond}: need > 0, >= 1, > 0.")
        for what, fn in (("input_fn", input_fn), ("label_fn", label_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} must be a callable batch -> tensor, got {fn!r}.")
        self.variant = variant
        self.name = "representer" if variant == "refit" else "representer_lje"
        self.l2, self.layer_spec, self.target, self.targets = float(l2), layer, target, targets
        self.self_measure = self_measure
        self.input_fn, self.label_fn = input_fn, label_fn
        self.ascent_lr, self.rcond = float(ascent_lr), float(rcond)
        self.tol, self.max_iter, self.max_params = float(tol), int(max_iter), int(max_params)
        self.model: Optional[nn.Module] = None
        self.layer: Optional[nn.Linear] = None
        self.layer_name: Optional[str] = None
        self.features: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.indices: Optional[torch.Tensor] = None
        self.trained_weights: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.expansion_weights: Optional[torch.Tensor] = None  # LJE: Theta_dot
        self.hinv: Optional[torch.Tensor] = None  # LJE: (C d', C d')
        self.alpha: Optional[torch.Tensor] = None
        self.num_train = 0
        self.refit_gap = float("nan")
        self.stationarity = float("nan")

    # ------------------------------------------------------------------ batches
    def _need(self, fn: Optional[BatchFn], what: str, example: str) -> BatchFn:
        if fn is None:
            raise ValueError(
                f"RepresenterPoints needs {what}: pass it to the constructor or in the fit "
                f"context (e.g. context={{{what.split('(')[0]!r}: {example}}})."
            )
        return fn

    def _inputs(self, batch: Any) -> Any:
        return self._need(self.input_fn, "input_fn(batch) -> inputs", "lambda b: b[0]")(batch)

    def _forward(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, d') float64, model output (B, C))`` of one batch, no autograd."""
        if self.model is None or self.layer is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(...) first.")
        return layer_features(self.model, self.layer_name, self.layer, self._inputs(batch))

    def _targets(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C) targets of the cross-entropy: one-hot labels or the model's probabilities."""
        if self.targets == "model":
            return torch.softmax(out.detach().to(torch.float64), dim=1)
        return F.one_hot(y, out.shape[1]).to(torch.float64)

    def _labels(self, batch: Any, num_classes: int) -> torch.Tensor:
        fn = self._need(self.label_fn, "label_fn(batch) -> labels", "lambda b: b[1]")
        y = torch.as_tensor(fn(batch))
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(
                f"label_fn must return (B,) integer class ids; got dtype {y.dtype}, shape "
                f"{tuple(y.shape)}."
            )
        y = y.long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
            raise ValueError(
                f"Label {bad} is out of range for a model with {num_classes} outputs (classes "
                f"0..{num_classes - 1})."
            )
        return y

    # ------------------------------------------------------------------ fit
    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        self.model = model
        self.input_fn = self.input_fn or context.input_fn
        self.label_fn = self.label_fn or context.label_fn
        self.layer_name, self.layer = find_output_linear(model, self.layer_spec)
        w = self.layer.weight.detach().to(torch.float64)
        if self.layer.bias is not None:
            w = torch.cat([w, self.layer.bias.detach().to(torch.float64)[:, None]], dim=1)
        self.trained_weights = w
        feats, labels, targets, idx = [], [], [], []
        has_index = context.index_fn is not None
        it = context.progress(data) if context.progress is not None else data
        for i, batch in enumerate(it):
            if i == 0:
                check_output_layer(model, self.layer_name, self.layer, self._inputs(batch))
            f, out = self._forward(batch)
            y = self._labels(batch, out.shape[1]).to(f.device)
            feats.append(f)
            labels.append(y)
            targets.append(self._targets(out, y))
            if has_index:
                try:
                    ids = context.index_fn(batch)
                    idx.append(torch.as_tensor(ids).reshape(-1).long().cpu())
                except (KeyError, IndexError, TypeError, MissingIndexError):
                    has_index = False
        if not feats:
            raise ValueError("Representer points got an empty training set.")
        fmat = torch.cat(feats)
        bad = int((~torch.isfinite(fmat)).any(dim=1).sum())
        if bad:
            raise ValueError(
                f"{bad} training samples have non-finite (NaN/inf) features at the input of "
                f"{self.layer_name!r}; representer points cannot use them. Fix the data or model."
            )
        self.features, self.labels = fmat, torch.cat(labels)
        n = fmat.shape[0]
        self.indices = torch.cat(idx) if has_index and idx else torch.arange(n)
        self.num_train = n
        tmat = torch.cat(targets)
        w = self.trained_weights.to(fmat.device)
        if self.variant == "refit":
            res = refit_l2(fmat, tmat, w, self.l2, self.tol, self.max_iter)
            self.alpha = res["alpha"]
        else:
            res = lje_step(fmat, tmat, w, self.ascent_lr, self.damping, self.rcond, self.max_params)
            self.expansion_weights, self.hinv = res["expansion_weights"], res["hinv"]
        self.weights, self.stationarity = res["weights"], res["stationarity"]
        self.refit_gap = float((fmat @ (w - self.weights).T).abs().max())

    # ------------------------------------------------------------------ rows
    def _terms(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(M (B, C, d'), features (B, d'), labels (B,))``: each sample's term of ``weights``
        (``alpha_z f_z^T`` for the refit, ``M_z`` for LJE)."""
        f, out = self._forward(batch)
        y = self._labels(batch, out.shape[1]).to(f.device)
        if self.variant == "refit":
            alpha = self._alpha(f, out, y)
            return alpha[:, :, None] * f[:, None, :], f, y
        w = self.expansion_weights.to(f.device)
        c, d = w.shape
        g = torch.softmax(f @ w.T, dim=1) - self._targets(out, y)
        v = (g[:, :, None] * f[:, None, :]).reshape(f.shape[0], c * d)
        m = (w.reshape(1, -1) - v @ self.hinv.to(f.device)) / self.num_train
        return m.reshape(-1, c, d), f, y

    def _alpha(self, f: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.softmax(f @ self.weights.to(f.device).T, dim=1) - self._targets(out, y)
        return -g / (2.0 * self.l2 * self.num_train)

    def alpha_of(self, batch: Any) -> torch.Tensor:
        """(B, C) float64 representer values ``alpha`` of the batch's samples (refit only)."""
        if self.variant != "refit":
            raise ValueError("alpha exists for variant='refit' only (LJE keeps matrices M_i).")
        f, out = self._forward(batch)
        return self._alpha(f, out, self._labels(batch, out.shape[1]).to(f.device))

    def query_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, C d') float64: ``vec(e_{c_q} f_q^T)``, the query's class row filled with f_q."""
        f, out = self._forward(batch)
        if self.target == "label":
            cls = self._labels(batch, out.shape[1]).to(f.device)
        else:
            cls = out.argmax(dim=1).to(f.device)
        b, d = f.shape
        rows = torch.zeros(b, out.shape[1], d, dtype=torch.float64, device=f.device)
        rows[torch.arange(b, device=f.device), cls] = f
        return rows.reshape(b, -1)

    def train_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, C d') float64: ``vec(alpha_z f_z^T)`` (refit) or ``vec(M_z)`` (LJE)."""
        m, _, _ = self._terms(batch)
        return m.reshape(m.shape[0], -1)

    def self_influence_batch(self, batch: Any) -> torch.Tensor:
        """(B,) float64: the score of each sample on itself at its label class (refit:
        ``alpha_{z,y_z} ||f_z||^2``; LJE: ``[M_z f_z]_{y_z}``), or ``|alpha_{z,y_z}|``
        (``self_measure="alpha"``)."""
        if self.self_measure == "alpha":
            f, out = self._forward(batch)
            y = self._labels(batch, out.shape[1]).to(f.device)
            return self._alpha(f, out, y).gather(1, y[:, None]).squeeze(1).abs()
        m, f, y = self._terms(batch)
        return (m[torch.arange(m.shape[0], device=m.device), y] * f).sum(dim=1)

    def hinv_norm_batch(self, batch: Any) -> torch.Tensor:
        """(B,) NaN: representer points have no Hessian-inverse norm (no forward pass run)."""
        b = len(self._inputs(batch))
        return torch.full((b,), float("nan"), dtype=torch.float64)

    def decomposed_logits(self, batch: Any) -> torch.Tensor:
        """(B, C) float64 ``sum_i rows_i`` applied to the batch: refit ``sum_i alpha_i <f_i, f_t>``
        from the stored training alphas and features; LJE ``Theta_N f_t`` (= ``sum_i M_i f_t``)."""
        f, _ = self._forward(batch)
        if self.variant == "refit":
            return (f @ self.features.to(f.device).T) @ self.alpha.to(f.device)
        return f @ self.weights.to(f.device).T

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "variant": self.variant, "l2": self.l2}
