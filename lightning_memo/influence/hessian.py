"""Exact Hessians, Gauss-Newton matrices, Hessian-vector products and damped solves.

The curvature used by influence functions (Koh & Liang, ICML 2017): I(z, q) =
-grad l(q)^T (H + damping I)^{-1} grad l(z), with H the Hessian of the *mean* per-sample loss over
all samples of ``batches`` (each batch weighted by its size). Math core: torch only.

Conventions: ``params`` is ``{name: tensor}`` (e.g. from ``select_parameters``); a flat vector
concatenates the tensors in the dict's order, each flattened row-major. ``loss_fn(model, batch)``
returns per-sample losses ``(B,)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .grads import _LossModule

__all__ = [
    "flatten",
    "unflatten",
    "flatten_batch",
    "make_hvp",
    "exact_hessian",
    "exact_ggn",
    "solve_damped",
    "conjugate_gradient",
    "check_eigenvalues",
    "drop_negative",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> (B,)
OutputFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> (B, C)
OutputLossFn = Callable[[torch.Tensor, Any], torch.Tensor]  # (outputs (B, C), batch) -> (B,)
Matvec = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- flattening
def flatten(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: tensor}`` -> ``(P,)``, in the dict's order, each tensor row-major."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vec: torch.Tensor, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``vec: (P,)`` -> ``{name: (shape of like[name])}`` (views of ``vec``; inverse of flatten)."""
    total = sum(t.numel() for t in like.values())
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ValueError(
            f"unflatten needs a vector of {total} entries (the parameter count), got shape "
            f"{tuple(vec.shape)}."
        )
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vec[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


def flatten_batch(grads: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: (B, *shape)}`` -> ``(B, P)`` (per-sample gradients as rows)."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


# ----------------------------------------------------------------------------- helpers
def _unflatten_cols(cols: torch.Tensor, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``cols: (P, m)`` -> ``{name: (m, *shape)}`` (columns as a leading batch dimension)."""
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = cols[offset : offset + t.numel()].T.reshape(cols.shape[1], *t.shape)
        offset += t.numel()
    return out


def _flatten_cols(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``{name: (m, *shape)}`` -> ``(P, m)`` (inverse of :func:`_unflatten_cols`)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors.values()], dim=1).T


def _unsqueeze0(t: Any) -> Any:
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _in_dims(batch: Any) -> Any:
    return tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)


def _prefixed(p: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in p.items()}


def _check_losses(loss: torch.Tensor, what: str = "loss_fn") -> torch.Tensor:
    if loss.ndim != 1:
        raise ValueError(
            f"{what} must return per-sample losses of shape (B,), got shape {tuple(loss.shape)}. "
            "Use reduction='none' (the Hessian is taken of the mean over all samples)."
        )
    return loss


def _detached(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if not params:
        raise ValueError("params is empty: select at least one parameter tensor.")
    return {k: v.detach() for k, v in params.items()}


def _empty_batches() -> ValueError:
    return ValueError("batches is empty: the Hessian of the mean loss needs at least one sample.")


def _check_damping(damping: float, allow_zero: bool = False) -> None:
    ok = damping >= 0 if allow_zero else damping > 0
    if not (ok and math.isfinite(damping)):
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(
            f"damping={damping} is not allowed: use a {need} finite damping (e.g. 1e-3; "
            "the damped matrix H + damping * I must be positive definite)."
        )


def round_off(eigvals: torch.Tensor) -> float:
    """``max|eigvals| * max(1e-6, k * eps)``: negative values above minus this are round-off of a
    positive semi-definite matrix (also one computed in float32), i.e. 0."""
    if eigvals.numel() == 0:
        return 0.0
    eps = torch.finfo(eigvals.dtype).eps if eigvals.is_floating_point() else 0.0
    return float(eigvals.abs().max()) * max(1e-6, eigvals.numel() * eps)


def check_eigenvalues(eigvals: torch.Tensor, what: str = "Hessian") -> torch.Tensor:
    """Clamp negative eigenvalues to 0; warn once with the count of the truly negative ones.

    Values above ``-max|eigvals| * max(1e-6, k * eps)`` (round-off of a PSD matrix, also one
    computed in float32) are clamped silently.

    Args:
        eigvals: (k,) eigenvalues.
        what: the matrix's name in the warning ("Hessian", "Arnoldi Hessian", ...).

    Returns:
        (k,) eigenvalues clamped at 0 (same dtype).
    """
    if eigvals.numel() == 0:
        return eigvals
    neg = eigvals < -round_off(eigvals)
    n_neg = int(neg.sum())
    if n_neg:
        warnings.warn(
            f"{n_neg} of {eigvals.numel()} {what} eigenvalues are negative (min "
            f"{float(eigvals.min()):.1e}); the influence methods give their directions no weight "
            "(solve_damped clamps them to 0). Use the GGN/Fisher (method='kfac'/'ekfac') or a "
            "larger damping.",
            stacklevel=3,
        )
    return eigvals.clamp(min=0)


def drop_negative(
    evals: torch.Tensor, evecs: torch.Tensor, what: str = "Hessian"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the eigenpairs of non-negative curvature (round-off negatives count as 0); the
    directions of truly negative curvature are dropped (no weight), with a warning giving their
    count (:func:`check_eigenvalues`).

    Args:
        evals: (n,) eigenvalues; evecs: (P, n) eigenvectors as columns.
        what: the matrix's name in the warning.

    Returns:
        ``(evals (m,), evecs (P, m))``, m <= n, eigenvalues clamped at 0.
    """
    clamped = check_eigenvalues(evals, what)  # warns with the count of the negative ones
    keep = evals >= -round_off(evals)
    return clamped[keep], evecs[:, keep]


# ----------------------------------------------------------------------------- HVP
def make_hvp(
    model: nn.Module,
    params: Dict[str, torch.Tensor],
    loss_fn: LossFn,
    batches: Iterable[Any],
    device: Optional[torch.device] = None,
    chunk: int = 64,
) -> Matvec:
    """Hessian-vector product of the mean per-sample loss (forward-over-reverse, ``torch.func``).

    Args:
        model: the module (parameters not in ``params`` and buffers are used as they are).
        params: ``{name: tensor}`` to differentiate; their values are captured now (detached).
        loss_fn: ``(model, batch) -> (B,)`` per-sample losses.
        batches: re-iterable batches (list, DataLoader); each call of the HVP passes over all.
        device: where batches are moved (default: left where they are).
        chunk: columns of ``v: (P, m)`` pushed through one vectorised (``vmap``) pass.

    Returns:
        ``hvp(v)``: ``v: (P,)`` or ``(P, m)`` -> ``H v`` of the same shape and dtype as ``v``;
        computed in the parameters' dtype, accumulated over batches in float64.
    """
    from torch.func import functional_call, grad, jvp, vmap

    like = _detached(params)
    wrapper = _LossModule(model, loss_fn)
    pdtype = {k: t.dtype for k, t in like.items()}

    def total_loss(p: Dict[str, torch.Tensor], batch: Any):
        loss = _check_losses(functional_call(wrapper, _prefixed(p), (batch,)))
        return loss.sum(), loss.detach()

    grad_fn = grad(total_loss, has_aux=True)

    def one(t: Dict[str, torch.Tensor], batch: Any):
        # outer no_grad: no graph towards the model's other parameters (torch.func transforms
        # differentiate regardless)
        _, hv, losses = jvp(lambda p: grad_fn(p, batch), (like,), (t,), has_aux=True)
        return hv, losses

    many = vmap(one, in_dims=(0, None))
    cached = [_to_device(b, device) for b in batches] if isinstance(batches, list) else None

    def hvp(v: torch.Tensor) -> torch.Tensor:
        squeeze = v.ndim == 1
        cols = v.reshape(v.shape[0], 1) if squeeze else v
        if cols.ndim != 2:
            raise ValueError(f"hvp needs v of shape (P,) or (P, m), got {tuple(v.shape)}.")
        if cols.shape[1] == 0:
            return v.clone()
        acc = torch.zeros(cols.shape, dtype=torch.float64, device=v.device)
        n = 0
        for batch in cached if cached is not None else batches:
            batch = batch if cached is not None else _to_device(batch, device)
            for s in range(0, cols.shape[1], chunk):
                block = cols[:, s : s + chunk]
                t = {
                    k: x.to(device=like[k].device, dtype=pdtype[k])
                    for k, x in _unflatten_cols(block, like).items()
                }
                with torch.no_grad():
                    hv, losses = many(t, batch)
                acc[:, s : s + chunk] += _flatten_cols(hv).to(device=v.device, dtype=torch.float64)
            n += losses.shape[1]
        if n == 0:
            raise _empty_batches()
        out = (acc / n).to(v.dtype)
        return out.reshape(-1) if squeeze else out

    return hvp


# ----------------------------------------------------------------------------- exact matrices
def exact_hessian(
    model: nn.Module,
    params: Dict[str, torch.Tensor],
    loss_fn: LossFn,
    batches: Iterable[Any],
) -> torch.Tensor:
    """Full Hessian of the mean per-sample loss w.r.t. the flattened ``params``.

    Only for small P (memory P^2, cost ~P backward passes per batch).

    Returns:
        (P, P) float64, symmetrised.
    """
    from torch.func import functional_call, jacfwd, jacrev

    like = _detached(params)
    wrapper = _LossModule(model, loss_fn)
    theta = flatten(like)

    def total_loss(th: torch.Tensor, batch: Any):
        loss = _check_losses(functional_call(wrapper, _prefixed(unflatten(th, like)), (batch,)))
        return loss.sum(), loss.detach()

    hess_fn = jacfwd(jacrev(total_loss, has_aux=True), has_aux=True)
    acc = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64, device=theta.device)
    n = 0
    for batch in batches:
        with torch.no_grad():
            h, losses = hess_fn(theta, batch)
        acc += h.to(torch.float64)
        n += losses.shape[0]
    if n == 0:
        raise _empty_batches()
    acc /= n
    return (acc + acc.T) / 2


def exact_ggn(
    model: nn.Module,
    params: Dict[str, torch.Tensor],
    output_fn: OutputFn,
    output_loss_fn: OutputLossFn,
    batches: Iterable[Any],
) -> torch.Tensor:
    """Generalised Gauss-Newton matrix mean_i J_i^T H_out,i J_i of the mean per-sample loss.

    J_i: (C, P) Jacobian of sample i's outputs w.r.t. ``params``; H_out,i: (C, C) Hessian of its
    loss w.r.t. its outputs (both per sample with ``vmap``, so the functions must not mix samples).

    Args:
        output_fn: ``(model, batch) -> (B, C)`` (or ``(B, *out_shape)``) outputs.
        output_loss_fn: ``(outputs, batch) -> (B,)`` per-sample loss on the outputs.

    Returns:
        (P, P) float64, symmetrised (PSD when every loss is convex in the outputs).
    """
    from torch.func import functional_call, hessian, jacrev, vmap

    like = _detached(params)
    wrapper = _LossModule(model, output_fn)
    theta = flatten(like)
    p_count = theta.numel()
    acc = torch.zeros(p_count, p_count, dtype=torch.float64, device=theta.device)
    n = 0
    for batch in batches:
        with torch.no_grad():
            outputs = functional_call(wrapper, _prefixed(like), (batch,))
        out_shape = outputs.shape[1:]
        flat_out = outputs.reshape(outputs.shape[0], -1)  # (B, C)

        def out_one(th: torch.Tensor, sample: Any) -> torch.Tensor:
            o = functional_call(
                wrapper, _prefixed(unflatten(th, like)), (tree_map(_unsqueeze0, sample),)
            )
            return o.reshape(-1)  # (C,)

        def loss_one(
            o: torch.Tensor, sample: Any, out_shape: torch.Size = out_shape
        ) -> torch.Tensor:
            loss = output_loss_fn(o.reshape(1, *out_shape), tree_map(_unsqueeze0, sample))
            return _check_losses(loss, "output_loss_fn").reshape(-1)[0]

        dims = _in_dims(batch)
        with torch.no_grad():
            jac = vmap(jacrev(out_one), in_dims=(None, dims))(theta, batch)  # (B, C, P)
            h_out = vmap(hessian(loss_one), in_dims=(0, dims))(flat_out, batch)  # (B, C, C)
        jac = jac.to(torch.float64)
        acc += torch.einsum("bcp,bcd,bdq->pq", jac, h_out.to(torch.float64), jac)
        n += flat_out.shape[0]
    if n == 0:
        raise _empty_batches()
    acc /= n
    return (acc + acc.T) / 2


# ----------------------------------------------------------------------------- solves
def solve_damped(H: torch.Tensor, b: torch.Tensor, damping: float) -> torch.Tensor:
    """Solve (H + damping I) x = b by eigendecomposition in float64.

    Negative eigenvalues of H are clamped to 0 (with a warning giving their count).

    Args:
        H: (P, P) symmetric; b: (P,) or (P, m); damping: > 0.

    Returns:
        x of b's shape, float64.

    Raises:
        ValueError: damping <= 0, or shapes that do not match.
    """
    _check_damping(damping)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or b.shape[0] != H.shape[0] or b.ndim > 2:
        raise ValueError(
            f"solve_damped needs H: (P, P) and b: (P,) or (P, m); got H {tuple(H.shape)} and "
            f"b {tuple(b.shape)}."
        )
    h64 = H.to(torch.float64)
    evals, evecs = torch.linalg.eigh((h64 + h64.T) / 2)
    evals = check_eigenvalues(evals, "Hessian")
    b64 = b.to(device=H.device, dtype=torch.float64)
    coef = evecs.T @ b64
    inv = 1.0 / (evals + damping)
    coef = coef * (inv if b.ndim == 1 else inv[:, None])
    return evecs @ coef


def conjugate_gradient(
    matvec: Matvec,
    b: torch.Tensor,
    damping: float,
    tol: float = 1e-8,
    max_iter: Optional[int] = None,
) -> torch.Tensor:
    """Solve (A + damping I) x = b by conjugate gradients (float64 iterates).

    Args:
        matvec: ``v: (P,) float64 -> A v: (P,)`` for a symmetric positive (semi-)definite A,
            e.g. :func:`make_hvp`.
        b: (P,) or (P, m) (independent solves, iterated together: one matvec of all
            still-unconverged columns per iteration).
        damping: >= 0, added to A.
        tol: stop when ||r|| <= tol * ||b|| (per column).
        max_iter: default ``min(10 * P, 1000)``; a warning says when it was not enough.

    Returns:
        x of b's shape, float64.

    Raises:
        ValueError: negative damping, or non-positive curvature p^T (A + damping I) p <= 0 met
            (A + damping I is not positive definite).
    """
    _check_damping(damping, allow_zero=True)
    if b.ndim not in (1, 2):
        raise ValueError(
            f"conjugate_gradient needs b of shape (P,) or (P, m), got {tuple(b.shape)}."
        )
    p_count = b.shape[0]
    if max_iter is None:
        max_iter = min(10 * p_count, 1000)
    b64 = b.to(torch.float64)
    x = _cg_block(matvec, b64.reshape(p_count, -1), damping, tol, max_iter)
    return x.reshape(b64.shape)


def _cg_block(
    matvec: Matvec, b: torch.Tensor, damping: float, tol: float, max_iter: int
) -> torch.Tensor:
    """Independent conjugate-gradient runs for the columns of ``b: (P, m)`` float64, advanced
    together so each iteration costs one ``matvec`` of the still-active columns ``(P, m')``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(dim=0)
    b_norm = rs.sqrt()
    active = b_norm > 0
    res = torch.zeros_like(rs)
    for it in range(max_iter):
        idx = torch.nonzero(active).reshape(-1)
        if idx.numel() == 0:
            return x
        pa = p[:, idx]
        ap = matvec(pa).to(device=b.device, dtype=torch.float64).reshape(pa.shape) + damping * pa
        curv = (pa * ap).sum(dim=0)
        if not bool((curv > 0).all()):
            j = int(idx[torch.nonzero(~(curv > 0))[0, 0]])
            raise ValueError(
                f"Conjugate gradient met non-positive curvature p^T (H + damping I) p = "
                f"{float(curv.min()):.3e} at iteration {it} (column {j}): the damped Hessian is "
                f"not positive definite with damping={damping}. Use a damping larger than the "
                "most negative Hessian eigenvalue, or the GGN/Fisher (method='kfac'/'ekfac')."
            )
        alpha = rs[idx] / curv
        x[:, idx] += alpha * pa
        r[:, idx] -= alpha * ap
        rs_new = (r[:, idx] ** 2).sum(dim=0)
        res[idx] = rs_new.sqrt() / b_norm[idx]
        p[:, idx] = r[:, idx] + (rs_new / rs[idx]) * pa
        rs[idx] = rs_new
        active[idx[res[idx] <= tol]] = False
    if bool(active.any()):
        j = int(torch.nonzero(active)[0, 0])
        warnings.warn(
            f"Conjugate gradient did not converge in {max_iter} iterations ({int(active.sum())} "
            f"of {b.shape[1]} columns; column {j}: relative residual {float(res[j]):.1e} > tol "
            f"{tol:.1e}). Increase max_iter or the damping (a larger damping makes the system "
            "better conditioned), or use an Arnoldi/K-FAC approximation.",
            stacklevel=3,
        )
    return x
