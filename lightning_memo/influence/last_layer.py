"""The last ``nn.Linear`` layer of a classifier: finding it, reading its input features, and the
two decompositions of its weights used by representer points (math core, torch only).

* :func:`refit_l2` (Yeh, Kim, Yen, Ravikumar, NeurIPS 2018): a stationary point ``W*`` of
  ``J(W) = (1/n) sum_i CE(W f_i, t_i) + lambda ||W||^2`` and ``alpha_i = -g_i / (2 lambda n)``
  with ``g_i = softmax(W* f_i) - t_i``, so ``W* = sum_i alpha_i f_i^T``.
* :func:`lje_step` (Sui, Wu, Sanner, NeurIPS 2021): one Newton step from the expansion point
  ``Theta_dot = Theta + eta grad L(Theta)``, ``Theta_N = Theta_dot - H^{-1} grad L(Theta_dot)``.

Features ``f`` are float64 rows ``(n, d')`` (bias folded in as a constant 1), targets ``t`` are
``(n, C)`` distributions (one-hot labels or the model's probabilities), weights ``(C, d')``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..exceptions import LayerNotFoundError
from .hessian import conjugate_gradient

__all__ = [
    "find_output_linear",
    "check_output_layer",
    "layer_features",
    "refit_l2",
    "ce_hessian",
    "lje_step",
]


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


def check_output_layer(model: nn.Module, name: str, layer: nn.Linear, inputs: Any) -> None:
    """Check on one input batch that ``layer``'s output IS ``model(inputs)``; else say which
    module (or operation) the output came from."""
    calls: List[Tuple[str, nn.Module, Any]] = []
    got: Dict[str, Any] = {}

    def leaf_hook(leaf: str) -> Callable:
        def hook(m: nn.Module, _inp: Any, out: Any) -> None:
            calls.append((leaf, m, out))

        return hook

    def layer_hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        got["out"] = out

    handles = [layer.register_forward_hook(layer_hook)]
    for leaf, m in model.named_modules():
        if m is not layer and not list(m.children()):
            handles.append(m.register_forward_hook(leaf_hook(leaf)))
    try:
        with torch.no_grad():
            out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    found = _describe_module(name, layer)
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
    for leaf, m, o in reversed(calls):
        if o is out or (isinstance(o, torch.Tensor) and o.shape == out.shape and
                        torch.equal(o, out)):  # fmt: skip
            source = f"module {_describe_module(leaf, m)}"
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


def layer_features(
    model: nn.Module, name: str, layer: nn.Linear, inputs: Any
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(features (B, d') float64, model output (B, C))`` of ``model(inputs)``, no autograd:
    the input of ``layer`` (read by a forward hook), with a constant 1 column when it has a bias.
    """
    got: Dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, inp: Tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        got["f"] = inp[0]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(inputs)
    finally:
        handle.remove()
    if "f" not in got:
        raise RuntimeError(f"The layer {name!r} did not run in the model's forward pass.")
    f = got["f"]
    if f.ndim != 2:
        raise ValueError(
            f"The input of {name!r} has shape {tuple(f.shape)}; representer points "
            "need one feature vector per sample (B, d): pool sequence features before the "
            "final nn.Linear."
        )
    f = f.detach().to(torch.float64)
    if layer.bias is not None:
        f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
    return f, out


# ----------------------------------------------------------------------------- L2 refit
def _objective(fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor, l2: float):
    logits = fmat @ w.T
    ce = -(tmat * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return ce + l2 * w.square().sum()


def _grad_j(fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """(C, d') gradient of J at w."""
    g = torch.softmax(fmat @ w.T, dim=1) - tmat
    return g.T @ fmat / fmat.shape[0] + 2.0 * l2 * w


def _newton_polish(
    fmat: torch.Tensor, tmat: torch.Tensor, w: torch.Tensor, l2: float, tol: float
) -> torch.Tensor:
    """Newton steps on J (CG on exact Hessian-vector products, damping 2 lambda; step halved
    until the largest gradient entry drops) until it is <= tol: LBFGS alone stalls near
    |grad| ~ 1e-10 in float64 and is slow in J's flat directions (curvature 2 lambda)."""
    n, d = fmat.shape
    c = w.shape[0]
    grad = _grad_j(fmat, tmat, w, l2)
    best = float(grad.abs().max())
    for _ in range(30):
        if best <= tol:
            break
        prob = torch.softmax(fmat @ w.T, dim=1)

        def hvp(v: torch.Tensor, prob: torch.Tensor = prob) -> torch.Tensor:
            vv = v.T.reshape(-1, c, d)  # (m, C, d')
            z = torch.einsum("nd,mcd->mnc", fmat, vv)
            az = prob * z - prob * (prob * z).sum(dim=-1, keepdim=True)
            return (torch.einsum("mnc,nd->mcd", az, fmat) / n).reshape(-1, c * d).T

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = conjugate_gradient(hvp, grad.reshape(-1), 2.0 * l2, tol=1e-13)
        step = step.reshape(c, d)
        for _half in range(30):
            w_new = w - step
            grad_new = _grad_j(fmat, tmat, w_new, l2)
            new = float(grad_new.abs().max())
            if new < best:
                break
            step = step / 2
        else:
            break  # no step lowers the gradient: float64 precision reached
        w, grad, best = w_new, grad_new, new
    return w


def refit_l2(
    fmat: torch.Tensor,
    tmat: torch.Tensor,
    w0: torch.Tensor,
    l2: float,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> Dict[str, Any]:
    """Refit the last layer on fixed features: LBFGS (float64, strong Wolfe) on J from ``w0``,
    then Newton polishing to ``max |grad J| <= tol``.

    Args:
        fmat: (n, d') features; tmat: (n, C) targets; w0: (C, d') start (the trained layer).
        l2: lambda > 0; tol: gradient target; max_iter: LBFGS iterations.

    Returns:
        ``{"weights": W* (C, d'), "alpha": (n, C), "stationarity": max |grad J(W*)|}``.
    """
    n = fmat.shape[0]
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(fmat, tmat, w, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_star = _newton_polish(fmat, tmat, w.detach(), l2, tol)
    g = torch.softmax(fmat @ w_star.T, dim=1) - tmat  # (n, C) dCE/dPhi
    return {
        "weights": w_star,
        "alpha": -g / (2.0 * l2 * n),
        "stationarity": float(_grad_j(fmat, tmat, w_star, l2).abs().max()),
    }


# ----------------------------------------------------------------------------- LJE
def ce_hessian(fmat: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """(C d', C d') Hessian of the mean cross-entropy in vec(W) (class-major):
    (1/n) sum_i (diag p_i - p_i p_i^T) kron f_i f_i^T. fmat: (n, d'), prob: (n, C)."""
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


def lje_step(
    fmat: torch.Tensor,
    tmat: torch.Tensor,
    w: torch.Tensor,
    ascent_lr: float = 0.0,
    damping: Optional[float] = None,
    rcond: float = 1e-10,
    max_params: int = 10_000,
) -> Dict[str, Any]:
    """One Newton step of the local Jacobian expansion from ``Theta_dot = w + ascent_lr grad L``.

    Args:
        fmat: (n, d') features; tmat: (n, C) targets; w: (C, d') trained layer.
        ascent_lr: gradient-ascent step to the expansion point (0: expand at ``w``).
        damping: ``None``: pseudo-inverse of H (eigenvalues below ``rcond`` x the largest
            dropped); a float > 0: ``(H + damping I)^{-1}``.
        max_params: the largest C d' for which the exact Hessian is built.

    Returns:
        ``{"expansion_weights": Theta_dot, "hinv": (C d', C d'), "weights": Theta_N,
        "stationarity": max |grad L(Theta_N)|}``.
    """
    n, d = fmat.shape
    c = w.shape[0]
    if c * d > max_params:
        raise ValueError(
            f"variant='lje' builds the exact {c * d} x {c * d} Hessian of the last layer "
            f"({c} classes x {d} features); that is more than max_params={max_params}. "
            "Use variant='refit', or raise max_params if memory allows."
        )
    if ascent_lr > 0:
        g = torch.softmax(fmat @ w.T, dim=1) - tmat
        w = w + ascent_lr * (g.T @ fmat / n)
    prob = torch.softmax(fmat @ w.T, dim=1)
    h = ce_hessian(fmat, prob)
    evals, evecs = torch.linalg.eigh((h + h.T) / 2)
    if damping is not None:
        inv = 1.0 / (evals.clamp(min=0) + damping)
    else:
        keep = evals > rcond * evals.max().clamp(min=torch.finfo(torch.float64).tiny)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    hinv = (evecs * inv) @ evecs.T
    grad = ((prob - tmat).T @ fmat / n).reshape(-1)
    weights = w - (hinv @ grad).reshape(c, d)
    g_n = torch.softmax(fmat @ weights.T, dim=1) - tmat
    return {
        "expansion_weights": w,
        "hinv": hinv,
        "weights": weights,
        "stationarity": float((g_n.T @ fmat / n).abs().max()),
    }
