"""Arnoldi iteration and the low-rank inverse-Hessian embedding of Schioppa et al.

Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence Functions", AAAI 2022: run Arnoldi
with Hessian-vector products to build a Krylov basis, keep the top-k eigenpairs ("distill") of
the projected Hessian, and embed a gradient g as (U^T g) / sqrt(Lambda + damping), so that
influence scores g_q^T U (Lambda + damping)^{-1} U^T g_z are dot products of embeddings.
Math core: torch only.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional, Tuple

import torch

from .hessian import _check_damping, check_eigenvalues

__all__ = ["arnoldi_iteration", "arnoldi_eigen", "arnoldi_embedding"]

Matvec = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[Iterable[Any]], Iterable[Any]]  # wraps an iterable (e.g. tqdm)


def arnoldi_iteration(
    matvec: Matvec,
    dim: int,
    n_iters: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    progress: Optional[Progress] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Arnoldi iteration with full re-orthogonalisation (two Gram-Schmidt passes).

    The start vector is a normal draw from ``torch.Generator().manual_seed(seed)``, normalised.

    Args:
        matvec: ``v: (dim,) -> A v: (dim,)`` (e.g. :func:`~.hessian.make_hvp`); called with
            vectors of ``dtype`` on ``device``.
        dim: the operator's size (parameter count P).
        n_iters: number of iterations n (the Krylov dimension, Captum's ``arnoldi_dim``).
        progress: wraps the iterations' ``range(n_iters)`` for a progress bar, e.g.
            ``lambda it: tqdm(it, desc="Arnoldi")`` (one Hessian-vector product per step; the
            bar is closed if the iteration stops early).

    Returns:
        ``Q: (n+1, dim)`` with orthonormal rows and the upper-Hessenberg ``Hbar: (n+1, n)`` with
        ``A Q[:n]^T = Q^T Hbar``. On breakdown (the Krylov space is invariant, residual norm
        below ``1e-10 * max ||A q||``, always at n = dim) after n' iterations the shapes are
        ``Q: (n', dim)``, ``Hbar: (n', n')`` and ``A Q^T = Q^T Hbar`` holds exactly.
    """
    if dim < 1 or n_iters < 1:
        raise ValueError(
            f"arnoldi_iteration needs dim >= 1 and n_iters >= 1, got {dim}, {n_iters}."
        )
    if n_iters > dim:
        raise ValueError(
            f"arnoldi_dim={n_iters} is larger than the number of parameters ({dim}); "
            f"use at most {dim}."
        )
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    q_mat = torch.zeros(n_iters + 1, dim, dtype=dtype, device=q.device)
    hbar = torch.zeros(n_iters + 1, n_iters, dtype=torch.float64)
    q_mat[0] = q / q.norm()
    rel_tol = max(1e-10, 100 * torch.finfo(dtype).eps)
    steps = progress(range(n_iters)) if progress is not None else range(n_iters)
    try:
        return _iterate(matvec, dim, n_iters, q_mat, hbar, rel_tol, steps)
    finally:
        close = getattr(steps, "close", None)
        if callable(close):
            close()


def _iterate(
    matvec: Matvec,
    dim: int,
    n_iters: int,
    q_mat: torch.Tensor,
    hbar: torch.Tensor,
    rel_tol: float,
    steps: Iterable[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The iterations of :func:`arnoldi_iteration` over ``steps`` (``range(n_iters)``, wrapped)."""
    dtype, device = q_mat.dtype, q_mat.device
    scale = 0.0
    for k in steps:
        w = matvec(q_mat[k]).to(device=device, dtype=dtype).reshape(-1)
        if w.shape[0] != dim:
            raise ValueError(f"matvec returned {w.shape[0]} entries; expected dim={dim}.")
        scale = max(scale, float(w.norm()))
        basis = q_mat[: k + 1]
        h = basis @ w
        w = w - basis.T @ h
        h2 = basis @ w  # second pass: restores orthogonality lost to round-off
        w = w - basis.T @ h2
        hbar[: k + 1, k] = (h + h2).to(torch.float64).cpu()
        beta = float(w.norm())
        if k + 1 >= dim or beta <= rel_tol * scale:
            return q_mat[: k + 1], hbar[: k + 1, : k + 1]
        hbar[k + 1, k] = beta
        q_mat[k + 1] = w / beta
    return q_mat, hbar


def arnoldi_eigen(
    matvec: Matvec,
    dim: int,
    n_iters: int,
    top_k: int,
    seed: int = 0,
    force_hermitian: bool = True,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    progress: Optional[Progress] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k (largest magnitude) Ritz pairs of a symmetric operator from an Arnoldi run.

    The Ritz pairs come from ``Hbar[:n, :n]`` (n = iterations done), symmetrised and solved by
    ``eigh`` when ``force_hermitian`` (else ``torch.linalg.eig``, real parts kept).

    Args:
        matvec: ``v: (dim,) -> A v: (dim,)``.
        dim: operator size P; n_iters: Krylov dimension (<= dim); top_k: pairs kept (<= n_iters).
        progress: progress-bar wrapper of the iterations (see :func:`arnoldi_iteration`).

    Returns:
        ``eigvals: (k,)`` float64 in descending order and ``eigvecs: (dim, k)`` of ``dtype`` with
        orthonormal columns (sign fixed: largest-magnitude entry positive). k = top_k, or the
        Krylov dimension reached when Arnoldi broke down earlier (a warning says so).
    """
    if n_iters > dim:
        raise ValueError(
            f"arnoldi_dim={n_iters} is larger than the number of parameters ({dim}); "
            f"use at most {dim}."
        )
    if top_k < 1 or top_k > n_iters:
        raise ValueError(
            f"top_k={top_k} must be between 1 and arnoldi_dim={n_iters}: the Krylov space holds at "
            f"most {n_iters} eigenpairs. Use a smaller top_k or a larger arnoldi_dim (about 3-4x "
            "top_k; Captum's defaults are projection_dim 50 for arnoldi_dim 200)."
        )
    q_mat, hbar = arnoldi_iteration(
        matvec, dim, n_iters, seed=seed, dtype=dtype, device=device, progress=progress
    )
    n = hbar.shape[1]
    h_n = hbar[:n, :n]
    if force_hermitian:
        evals, evecs = torch.linalg.eigh((h_n + h_n.T) / 2)
    else:
        ev, vec = torch.linalg.eig(h_n)
        evals, evecs = ev.real.contiguous(), vec.real.contiguous()
    k = min(top_k, n)
    if k < top_k:
        warnings.warn(
            f"Arnoldi stopped after {n} of {n_iters} iterations (the Krylov space from the start "
            f"vector is invariant), so only {n} eigenpairs exist; returning {n} instead of "
            f"top_k={top_k}. The missing directions carry no component of the start vector "
            "(typically an exact null space or repeated eigenvalues).",
            stacklevel=2,
        )
    idx = torch.argsort(evals.abs(), descending=True)[:k]
    idx = idx[torch.argsort(evals[idx], descending=True)]
    evals, small = evals[idx], evecs[:, idx]
    vecs = q_mat[:n].T @ small.to(device=q_mat.device, dtype=q_mat.dtype)  # (dim, k)
    vecs = vecs / vecs.norm(dim=0, keepdim=True)
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(k, device=vecs.device)])
    vecs = vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return evals, vecs


def arnoldi_embedding(
    grads: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor, damping: float
) -> torch.Tensor:
    """Influence embeddings ``(grads @ U) / sqrt(clamp(Lambda, 0) + damping)``.

    Dot products of embeddings equal g_q^T U (Lambda + damping)^{-1} U^T g_z. Negative
    eigenvalues are clamped to 0 (with a warning giving their count).

    Args:
        grads: (B, P) flattened per-sample gradients; eigvals: (k,); eigvecs: (P, k).
        damping: >= 0 (0 only when every kept eigenvalue is positive).

    Returns:
        (B, k) in the promoted dtype of grads and eigvecs (float64 with float64 eigvecs).
    """
    _check_damping(damping, allow_zero=True)
    if grads.ndim != 2 or eigvecs.ndim != 2 or grads.shape[1] != eigvecs.shape[0]:
        raise ValueError(
            f"arnoldi_embedding needs grads: (B, P) and eigvecs: (P, k); got "
            f"{tuple(grads.shape)} and {tuple(eigvecs.shape)}."
        )
    if eigvals.shape != (eigvecs.shape[1],):
        raise ValueError(
            f"eigvals must have shape ({eigvecs.shape[1]},) to match eigvecs; got "
            f"{tuple(eigvals.shape)}."
        )
    lam = check_eigenvalues(eigvals.to(torch.float64), "Arnoldi Hessian") + damping
    if (lam <= 0).any():
        raise ValueError(
            f"{int((lam <= 0).sum())} eigenvalues + damping are <= 0 (damping={damping}): "
            "use a positive damping (e.g. 1e-3)."
        )
    dt = torch.promote_types(grads.dtype, eigvecs.dtype)
    proj = grads.to(dt) @ eigvecs.to(device=grads.device, dtype=dt)  # (B, k)
    return proj / lam.sqrt().to(device=grads.device, dtype=dt)
