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
class-major over (C, d): ``train_rows(z) = vec(alpha_z f_z^T)`` (refit) or ``vec(M_z)`` (LJE);
``query_rows(q) = vec(e_{c_q} f_q^T)``, so ``<query_rows(q), train_rows(z)>`` is the score.

Conventions:
    * Features ``f`` are the input of the final ``nn.Linear`` (captured by a forward hook), in
      float64. A bias is folded in as a constant feature 1 (``f~ = [f, 1]``, ``Theta = [W | b]``),
      so the decomposition covers the whole logit, bias included, and the refit's L2 penalty
      covers the bias as well.
    * Loss: softmax cross-entropy on the logits (``loss_fn`` of ``fit`` is not used), against the
      labels (``targets="label"``) or the trained model's own softmax probabilities
      (``targets="model"``, as in Yeh et al.'s released code).
    * ``self_influence(z)``: by default the score of z on itself at its label class,
      ``alpha_{z,y_z} ||f_z||^2`` (refit) and ``[M_z f_z]_{y_z}`` (LJE, the "self_influence" of the
      authors' code); ``self_measure="alpha"`` (refit only) gives Yeh et al.'s importance
      ``|alpha_{z,y_z}|`` (``= (1 - p_{y_z}) / (2 lambda n)`` for labels).
    * The row functions receive the batch (``uses_gradients = False``) and run the model; the
      rows are float64 on the model's device, of width C * (d + 1).

Cost: one forward pass over the training set; features (n, d + 1) float64 are kept. Refit:
LBFGS then Newton-CG on exact Hessian-vector products, O(n C d) each. LJE: the exact
(C (d + 1))^2 Hessian, built in O(n (C d)^2) and eigendecomposed (``max_params`` bounds C (d + 1)).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..data import get_labels, make_accessor
from ..exceptions import LayerNotFoundError
from .hessian import conjugate_gradient
from .methods import InfluenceMethod

__all__ = ["RepresenterPoints", "find_output_linear"]

VARIANTS = ("refit", "lje")
#: largest C x (d + 1) for which the LJE variant builds and eigendecomposes the exact Hessian
MAX_LJE_PARAMS = 10_000


def _describe_module(name: str, module: nn.Module) -> str:
    return f"{name or '<root>'!r} ({type(module).__name__})"


def find_output_linear(
    model: nn.Module,
    layer: Union[None, str, nn.Module] = None,
) -> Tuple[str, nn.Linear]:
    """The ``nn.Linear`` meant to produce the model's output (not yet checked by a forward pass).

    Args:
        model: the network.
        layer: ``None`` (the last ``nn.Linear`` in ``model.named_modules()`` order), a module
            name or the module itself.

    Returns:
        ``(name, module)``.
    """
    named = dict(model.named_modules())
    if layer is None:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            kinds = [_describe_module(n, m) for n, m in named.items() if n][:8]
            raise ValueError(
                f"Representer points need a model whose output is an nn.Linear layer (its input "
                f"is the feature vector of each sample), but {type(model).__name__} has no "
                f"nn.Linear module (its modules: {', '.join(kinds) or 'none'}). Give the model a "
                "final nn.Linear head that returns the logits."
            )
        return linears[-1]
    if isinstance(layer, str):
        if layer not in named:
            raise LayerNotFoundError.for_name(layer, named)
        name, module = layer, named[layer]
    else:
        found = [n for n, m in named.items() if m is layer]
        if not found:
            raise ValueError(
                f"layer={type(layer).__name__}(...) is not a module of {type(model).__name__}."
            )
        name, module = found[0], layer
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"layer={name!r} is a {type(module).__name__}; representer points need the "
            "nn.Linear layer whose output is the model's output."
        )
    return name, module


class RepresenterPoints(InfluenceMethod):
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
        input_fn: ``batch -> inputs`` for ``model(inputs)``; ``None``: ``batch[0]`` /
            ``batch["input"]`` (see :func:`lightning_memo.data.make_accessor`).
        label_fn: ``batch -> (B,)`` integer labels; ``None``: ``batch[1]`` / ``batch["label"]``.
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
            the fit batches; ``labels`` (n,); ``indices`` (n,) sample indices when the batches
            carry them (else positions).
        trained_weights: (C, d') ``[W | b]`` of the trained layer.
        weights: (C, d') the weights the decomposition sums to: ``W*`` (refit) or ``Theta_N``
            (LJE); ``sum_i rows_i`` reproduces ``weights @ f``.
        alpha: (n, C) representer values (refit; ``None`` for LJE).
        refit_gap: max |logits of the trained layer - logits of ``weights``| over the training set.
        stationarity: max |grad J(W*)| (refit) or max |grad L(Theta_N)| (LJE, diagnostic).
    """

    uses_gradients = False
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
        input_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        label_fn: Optional[Callable[[Any], torch.Tensor]] = None,
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
        self.variant = variant
        self.name = "representer" if variant == "refit" else "representer_lje"
        self.l2, self.layer_spec, self.target, self.targets = float(l2), layer, target, targets
        self.self_measure = self_measure
        self.input_fn = make_accessor(input_fn, "input")
        self.label_fn = make_accessor(label_fn, "label")
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

    # ------------------------------------------------------------------ forward passes
    def _forward(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, d') float64, model output (B, C))`` of one batch, no autograd."""
        if self.model is None or self.layer is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(...) first.")
        got: Dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, inp: Tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            got["f"] = inp[0]

        handle = self.layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = self.model(self.input_fn(batch))
        finally:
            handle.remove()
        if "f" not in got:
            raise RuntimeError(
                f"The layer {self.layer_name!r} did not run in the model's forward pass."
            )
        return self._augment(got["f"]), out

    def _augment(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim != 2:
            raise ValueError(
                f"The input of {self.layer_name!r} has shape {tuple(f.shape)}; representer points "
                "need one feature vector per sample (B, d): pool sequence features before the "
                "final nn.Linear."
            )
        f = f.detach().to(torch.float64)
        if self.layer.bias is not None:
            f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
        return f

    def _verify(self, model: nn.Module, batch: Any) -> None:
        """Check on one batch that the layer's output IS the model's output; else say which
        module the output came from."""
        calls: List[Tuple[str, nn.Module, Any]] = []
        got: Dict[str, Any] = {}

        def leaf_hook(name: str) -> Callable:
            def hook(m: nn.Module, _inp: Any, out: Any) -> None:
                calls.append((name, m, out))

            return hook

        def layer_hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            got["out"] = out

        handles = [self.layer.register_forward_hook(layer_hook)]
        for name, m in model.named_modules():
            if m is not self.layer and not list(m.children()):
                handles.append(m.register_forward_hook(leaf_hook(name)))
        try:
            with torch.no_grad():
                out = model(self.input_fn(batch))
        finally:
            for h in handles:
                h.remove()
        found = _describe_module(self.layer_name, self.layer)
        if "out" not in got:
            raise ValueError(f"The last nn.Linear {found} did not run in the model's forward pass.")
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"The model returned a {type(out).__name__}, not a tensor of logits; representer "
                f"points need a model whose output is its last nn.Linear ({found}). Wrap the "
                "model so forward() returns the logits tensor."
            )
        lin = got["out"]
        if out is lin or (out.shape == lin.shape and torch.equal(out, lin)):
            if out.ndim != 2:
                raise ValueError(
                    f"The model's output has shape {tuple(out.shape)}; representer points need "
                    "(batch, classes) logits."
                )
            return
        source = None
        for name, m, o in reversed(calls):
            if o is out or (isinstance(o, torch.Tensor) and o.shape == out.shape and
                            torch.equal(o, out)):  # fmt: skip
                source = f"module {_describe_module(name, m)}"
                break
        if source is None:
            last = _describe_module(calls[-1][0], calls[-1][1]) if calls else "none"
            source = (
                "an operation in forward() after the last module call (no module returned it; "
                f"the last module called was {last})"
            )
        raise ValueError(
            f"Representer points need a model whose output is a Linear layer: the last "
            f"nn.Linear found is {found}, but the model's output comes from {source}. Return the "
            "Linear layer's logits from forward() (put softmax / normalisation into the loss), "
            "or pass layer= naming the nn.Linear whose output the model returns."
        )

    # ------------------------------------------------------------------ fit
    def _targets(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C) targets of the cross-entropy: one-hot labels or the model's probabilities."""
        if self.targets == "model":
            return torch.softmax(out.detach().to(torch.float64), dim=1)
        return F.one_hot(y, out.shape[1]).to(torch.float64)

    def _labels(self, batch: Any, num_classes: int) -> torch.Tensor:
        y = get_labels(batch, self.label_fn)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
            raise ValueError(
                f"Label {bad} is out of range for a model with {num_classes} outputs (classes "
                f"0..{num_classes - 1})."
            )
        return y

    def _fit(self, model, params, loss_fn, batches, progress=None, **kw):
        self.model = model
        self.layer_name, self.layer = find_output_linear(model, self.layer_spec)
        w = self.layer.weight.detach().to(torch.float64)
        if self.layer.bias is not None:
            w = torch.cat([w, self.layer.bias.detach().to(torch.float64)[:, None]], dim=1)
        self.trained_weights = w
        feats, labels, targets, idx = [], [], [], []
        index_fn = make_accessor(None, "index")
        has_index = True
        it = progress(batches) if progress is not None else batches
        for i, batch in enumerate(it):
            if i == 0:
                self._verify(model, batch)
            f, out = self._forward(batch)
            y = self._labels(batch, out.shape[1]).to(f.device)
            feats.append(f)
            labels.append(y)
            targets.append(self._targets(out, y))
            if has_index:
                try:
                    idx.append(torch.as_tensor(index_fn(batch)).reshape(-1).long().cpu())
                except (KeyError, IndexError, TypeError):
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
            self._refit(fmat, tmat, w)
        else:
            self._lje(fmat, tmat, w)
        self.refit_gap = float((fmat @ (w - self.weights).T).abs().max())

    def _objective(self, fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = fmat @ w.T
        ce = -(tmat * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        return ce + self.l2 * w.square().sum()

    def _refit(self, fmat: torch.Tensor, tmat: torch.Tensor, w0: torch.Tensor) -> None:
        """LBFGS (float64, strong Wolfe) on J from the trained weights, then alpha."""
        n = fmat.shape[0]
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [w],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self._objective(fmat, tmat, w)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        w_star = self._newton_polish(fmat, tmat, w.detach())
        g = torch.softmax(fmat @ w_star.T, dim=1) - tmat  # (n, C) dCE/dPhi
        self.alpha = -g / (2.0 * self.l2 * n)
        self.stationarity = float(self._grad_j(fmat, tmat, w_star).abs().max())
        self.weights = w_star

    def _grad_j(self, fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(C, d') gradient of J at w."""
        g = torch.softmax(fmat @ w.T, dim=1) - tmat
        return g.T @ fmat / fmat.shape[0] + 2.0 * self.l2 * w

    def _newton_polish(self, fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor):
        """Newton steps on J (CG on exact Hessian-vector products, damping 2 lambda; step halved
        until the largest gradient entry drops) until it is <= tol: LBFGS alone stalls near
        |grad| ~ 1e-10 in float64 and is slow in J's flat directions (curvature 2 lambda)."""
        n, d = fmat.shape
        c = w.shape[0]
        grad = self._grad_j(fmat, tmat, w)
        best = float(grad.abs().max())
        for _ in range(30):
            if best <= self.tol:
                break
            prob = torch.softmax(fmat @ w.T, dim=1)

            def hvp(v: torch.Tensor, prob: torch.Tensor = prob) -> torch.Tensor:
                vv = v.T.reshape(-1, c, d)  # (m, C, d')
                z = torch.einsum("nd,mcd->mnc", fmat, vv)
                az = prob * z - prob * (prob * z).sum(dim=-1, keepdim=True)
                return (torch.einsum("mnc,nd->mcd", az, fmat) / n).reshape(-1, c * d).T

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = conjugate_gradient(hvp, grad.reshape(-1), 2.0 * self.l2, tol=1e-13)
            step = step.reshape(c, d)
            for _half in range(30):
                w_new = w - step
                grad_new = self._grad_j(fmat, tmat, w_new)
                new = float(grad_new.abs().max())
                if new < best:
                    break
                step = step / 2
            else:
                break  # no step lowers the gradient: float64 precision reached
            w, grad, best = w_new, grad_new, new
        return w

    def _hessian(self, fmat: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(C d', C d') Hessian of the mean cross-entropy in vec(W) (class-major):
        (1/n) sum_i (diag p_i - p_i p_i^T) kron f_i f_i^T."""
        n, d = fmat.shape
        c = prob.shape[1]
        h = torch.zeros(c * d, c * d, dtype=torch.float64, device=fmat.device)
        step = max(1, (1 << 22) // (c * d))
        for s in range(0, n, step):
            f, p = fmat[s : s + step], prob[s : s + step]
            for a in range(c):
                h[a * d : (a + 1) * d, a * d : (a + 1) * d] += (f * p[:, a : a + 1]).T @ f
            g = (p[:, :, None] * f[:, None, :]).reshape(f.shape[0], c * d)
            h -= g.T @ g
        return h / n

    def _lje(self, fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor) -> None:
        n, d = fmat.shape
        c = w.shape[0]
        if c * d > self.max_params:
            raise ValueError(
                f"variant='lje' builds the exact {c * d} x {c * d} Hessian of the last layer "
                f"({c} classes x {d} features); that is more than max_params={self.max_params}. "
                "Use variant='refit', or raise max_params if memory allows."
            )
        if self.ascent_lr > 0:
            g = torch.softmax(fmat @ w.T, dim=1) - tmat
            w = w + self.ascent_lr * (g.T @ fmat / n)
        self.expansion_weights = w
        prob = torch.softmax(fmat @ w.T, dim=1)
        h = self._hessian(fmat, prob)
        evals, evecs = torch.linalg.eigh((h + h.T) / 2)
        if self.damping is not None:
            inv = 1.0 / (evals.clamp(min=0) + self.damping)
        else:
            keep = evals > self.rcond * evals.max().clamp(min=torch.finfo(torch.float64).tiny)
            inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
        self.hinv = (evecs * inv) @ evecs.T
        grad = ((prob - tmat).T @ fmat / n).reshape(-1)
        self.weights = w - (self.hinv @ grad).reshape(c, d)
        g_n = torch.softmax(fmat @ self.weights.T, dim=1) - tmat
        self.stationarity = float((g_n.T @ fmat / n).abs().max())

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

    def query_rows(self, batch: Any) -> torch.Tensor:
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

    def train_rows(self, batch: Any) -> torch.Tensor:
        """(B, C d') float64: ``vec(alpha_z f_z^T)`` (refit) or ``vec(M_z)`` (LJE)."""
        m, _, _ = self._terms(batch)
        return m.reshape(m.shape[0], -1)

    def self_influence(self, batch: Any) -> torch.Tensor:
        """(B,) float64: the score of each sample on itself at its label class (refit:
        ``alpha_{z,y_z} ||f_z||^2``; LJE: ``[M_z f_z]_{y_z}``), or ``|alpha_{z,y_z}|``
        (``self_measure="alpha"``)."""
        if self.self_measure == "alpha":
            f, out = self._forward(batch)
            y = self._labels(batch, out.shape[1]).to(f.device)
            return self._alpha(f, out, y).gather(1, y[:, None]).squeeze(1).abs()
        m, f, y = self._terms(batch)
        return (m[torch.arange(m.shape[0], device=m.device), y] * f).sum(dim=1)

    def hinv_norm(self, batch: Any) -> torch.Tensor:
        """(B,) NaN: representer points have no Hessian-inverse norm (no forward pass run)."""
        b = len(self.input_fn(batch))
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
