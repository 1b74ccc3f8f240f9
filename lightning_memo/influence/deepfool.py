"""DeepFool (Moosavi-Dezfooli, Fawzi, Frossard, CVPR 2016): the smallest input perturbation
that changes a classifier's predicted class, batched, with a line search refining the crossing.

At the current point x with original class k, linearise every logit difference f_j - f_k and
step to the nearest linearised boundary,

    l = argmin_{j != k} |f_j(x) - f_k(x)| / ||grad f_j(x) - grad f_k(x)||
    r_i = |f_l - f_k| / ||w_l||^2 * w_l,        w_l = grad f_l(x) - grad f_k(x)

accumulate r = sum_i r_i and repeat from x = x0 + (1 + overshoot) r until the prediction changes.
For a linear classifier one step lands exactly on the nearest boundary, so the distance equals
the closed form min_{j != k} ((w_k - w_j) . x + b_k - b_j) / ||w_k - w_j|| (times 1 + overshoot).
Used by :class:`~lightning_memo.influence.methods.BoundaryInfluence`. Math core: torch only.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["deepfool", "LINE_POINTS", "LINE_BISECTIONS"]


def deepfool(
    f: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    overshoot: float = 0.02,
    max_iter: int = 50,
    eps: float = 1e-6,
    num_classes: Optional[int] = None,
    line_search: bool = True,
) -> Dict[str, torch.Tensor]:
    """Batched multi-class DeepFool: the smallest perturbation changing each sample's class.

    DeepFool's linearised steps overshoot where the boundary curves towards the sample; with
    ``line_search`` the result is refined along the found direction u: the first of
    ``LINE_POINTS`` evenly spaced points of [0, ||r||] u whose predicted class differs, then
    bisection to 1e-12 relative to the crossing t*, and the perturbation is
    (1 + overshoot) t* u (t* u, already across, where the overshoot would land back). On a
    linear model both give (1 + overshoot) x the exact distance. Without it,
    the distance is DeepFool's ||(1 + overshoot) r||.

    Args:
        f: ``inputs (B, *shape) -> logits (B, C)``; samples must not interact (eval mode).
        x0: (B, *shape) floating inputs.
        overshoot: each iterate is x0 + (1 + overshoot) r, to step past the boundary.
        max_iter: linearisation steps per sample.
        eps: a point where the original class's logit is within ``eps`` of another logit
            counts as on (across) the boundary (as Influenciae's ``eps``).
        num_classes: consider only the ``num_classes`` largest clean logits as target classes
            (DeepFool's ``num_classes``; ``None``: all classes).

        line_search: refine along the found direction (see above).

    Returns:
        ``{"perturbation": (B, *shape) float64, a perturbation across the boundary;
        "distance": (B,) float64 its L2 norm (inf where all logit-difference gradients vanish);
        "converged": (B,) bool, the class changed or reached the boundary; "iterations": (B,)
        steps taken; "label": (B,) the original predicted class}``.
    """
    x0 = x0.detach()
    b = x0.shape[0]
    dev = x0.device
    with torch.no_grad():
        logits0 = f(x0)
    c = logits0.shape[1]
    k0 = logits0.argmax(dim=1)
    if num_classes is not None and num_classes < c:
        cand = logits0.topk(max(int(num_classes), 2), dim=1).indices  # (B, n), k0 included
    else:
        cand = torch.arange(c, device=dev).expand(b, c)
    is_k0 = cand == k0[:, None]  # (B, n)
    flat = x0.reshape(b, -1)
    r_tot = torch.zeros(b, flat.shape[1], dtype=torch.float64, device=dev)
    converged = torch.zeros(b, dtype=torch.bool, device=dev)
    stuck = torch.zeros(b, dtype=torch.bool, device=dev)
    iters = torch.zeros(b, dtype=torch.long, device=dev)
    scale = 1.0 + float(overshoot)

    for it in range(max_iter + 1):
        idx = torch.nonzero(~(converged | stuck)).reshape(-1)
        if idx.numel() == 0:
            break
        x = (flat[idx] + (scale * r_tot[idx]).to(flat.dtype)).reshape(idx.numel(), *x0.shape[1:])
        x.requires_grad_(True)
        with torch.enable_grad():
            out = f(x)
            fc = out.gather(1, cand[idx])  # (A, n) candidate logits, k0's among them
            diff = fc.detach().double() - out.detach().gather(1, k0[idx, None]).double()
            diff_o = diff.masked_fill(is_k0[idx], float("-inf"))  # f_j - f_k0, j != k0
            done = (out.detach().argmax(dim=1) != k0[idx]) | (diff_o.max(dim=1).values >= -eps)
            converged[idx[done]] = True
            if it == max_iter or bool(done.all()):
                continue
            # gradient of every candidate logit (one backward each; samples are independent)
            n, a = fc.shape[1], idx.numel()
            grads = [
                torch.autograd.grad(fc[:, j].sum(), x, retain_graph=j < n - 1)[0].reshape(a, -1)
                for j in range(n)
            ]
        g = torch.stack(grads, dim=1).double()  # (A, n, D)
        pos = is_k0[idx].to(torch.int8).argmax(dim=1)
        w = g - g[torch.arange(a, device=dev), pos][:, None, :]  # grad f_j - grad f_k0
        keep = ~done
        sel, w, fp = idx[keep], w[keep], diff[keep].abs()
        wn = w.norm(dim=2)  # (A', n)
        ratio = fp / wn
        ratio = ratio.masked_fill(is_k0[sel] | (wn == 0) | ~torch.isfinite(ratio), float("inf"))
        best = ratio.argmin(dim=1)
        rows = torch.arange(sel.numel(), device=dev)
        bad = ~torch.isfinite(ratio[rows, best])
        stuck[sel[bad]] = True
        wl, wnl, fpl = w[rows, best], wn[rows, best], fp[rows, best]
        step = (fpl / wnl.square().clamp(min=torch.finfo(torch.float64).tiny))[:, None] * wl
        step[bad] = 0.0
        r_tot[sel] += step
        iters[sel[~bad]] += 1

    pert = scale * r_tot
    dist = pert.norm(dim=1)
    if line_search:
        ok = converged & ~stuck & (dist > 0)
        idx = torch.nonzero(ok).reshape(-1)
        if idx.numel():
            t = _first_crossing(f, flat[idx], pert[idx], dist[idx], k0[idx], x0.shape[1:], scale)
            pert[idx] = pert[idx] * (t / dist[idx])[:, None]
            dist[idx] = t
    dist[stuck] = float("inf")
    return {
        "perturbation": pert.reshape(x0.shape),
        "distance": dist,
        "converged": converged,
        "iterations": iters,
        "label": k0,
    }


LINE_POINTS = 16  # coarse scan of the line search
LINE_BISECTIONS = 45  # bisection steps (stops early at 1e-12 relative width)


def _first_crossing(
    f: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    pert: torch.Tensor,
    dist: torch.Tensor,
    k0: torch.Tensor,
    shape: Tuple[int, ...],
    scale: float,
) -> torch.Tensor:
    """(A,) float64: ``scale`` x the first t in (0, dist] where x0 + t u is predicted another
    class than k0 (u = pert / dist; t itself where that point is not across; ``dist`` where no
    point of the line is, a tie at the end).

    x0: (A, D) flat inputs; pert: (A, D) float64 perturbations that cross at t = dist.
    """
    u = pert / dist[:, None]

    @torch.no_grad()
    def crossed(t: torch.Tensor) -> torch.Tensor:
        x = (x0 + (t[:, None] * u).to(x0.dtype)).reshape(-1, *shape)
        return f(x).argmax(dim=1) != k0

    a = x0.shape[0]
    lo = torch.zeros(a, dtype=torch.float64, device=x0.device)
    hi = dist.clone()
    found = torch.zeros(a, dtype=torch.bool, device=x0.device)
    for i in range(1, LINE_POINTS + 1):  # first crossing on the coarse grid
        t = dist * (i / LINE_POINTS)
        c = crossed(t) & ~found
        hi = torch.where(c, t, hi)
        lo = torch.where(c, dist * ((i - 1) / LINE_POINTS), lo)
        found |= c
    lo = torch.where(found, lo, torch.zeros_like(lo))  # none crossed (rounding): whole range
    for _ in range(LINE_BISECTIONS):
        if bool(((hi - lo) <= 1e-12 * hi).all()):
            break
        mid = (lo + hi) / 2
        c = crossed(mid)
        hi, lo = torch.where(c, mid, hi), torch.where(c, lo, mid)
    if scale == 1.0:
        return hi
    past = hi * scale  # the overshoot, as in DeepFool, puts the point safely across
    return torch.where(crossed(past), past, hi)
