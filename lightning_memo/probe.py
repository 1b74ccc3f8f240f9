"""Linear probes used to verify concept erasure (math core, torch only)."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["probe_accuracy", "probe_r2"]


def probe_accuracy(
    x: torch.Tensor, z: torch.Tensor, l2: float = 1e-4, max_iter: int = 200
) -> Tuple[float, float]:
    """In-sample accuracy of a multinomial logistic-regression probe for classes z from x.

    After LEACE, Cov(x, z) = 0, so the probe's optimum is the constant predictor and its accuracy
    is the majority-class rate (Belrose et al. 2023, Theorem 3.1).

    Args:
        x: (n, d) features; z: (n,) integer classes.
        l2: ridge penalty on the weights (features are standardised first).
        max_iter: L-BFGS iterations.

    Returns:
        (probe accuracy, majority-class rate).
    """
    from torchmetrics.functional.classification import multiclass_accuracy

    x = x.detach().double()
    classes, z_idx = torch.unique(z, return_inverse=True)
    k = classes.numel()
    majority = float(torch.bincount(z_idx).max()) / z.numel()
    if k < 2:
        return 1.0, 1.0
    std = x.std(dim=0)
    # (near-)constant columns carry only rounding noise (e.g. dead units after erasure, where the
    # noise is proportional to the erased direction); standardising would amplify it
    live = std > 1e-6 * std.max().clamp_min(1e-300)
    x, std = x[:, live], std[live]
    xs = (x - x.mean(dim=0)) / std
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    prior = torch.bincount(z_idx, minlength=k).double() / z.numel()
    with torch.no_grad():
        b.copy_(prior.log())  # start at the constant (majority-calibrated) predictor
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, z_idx) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (xs @ w + b).argmax(dim=1)
    acc = multiclass_accuracy(pred, z_idx, num_classes=k, average="micro")
    # torchmetrics returns float32: snap to the exact fraction correct / n (float64, like majority)
    # so that a probe at the constant predictor compares equal to the majority rate
    return round(float(acc) * z.numel()) / z.numel(), majority


def probe_r2(x: torch.Tensor, z: torch.Tensor, rcond: float = 1e-5) -> float:
    """In-sample R^2 of the least-squares linear probe z ~ x W + b (z: (n,) or (n, k)).

    Directions of the centred x whose singular value is below ``rcond`` times the largest are
    dropped: erased features are rank-deficient, and fitting their float32 rounding noise
    (~1e-7 relative) would report a spurious R^2 after exact erasure.
    """
    x = x.detach().double()
    z = z.detach().double().reshape(z.shape[0], -1)
    xc = x - x.mean(dim=0)  # centred x and z: the intercept is the mean, no column needed
    zc = z - z.mean(dim=0)
    coef = torch.linalg.lstsq(xc, zc, rcond=rcond, driver="gelsd").solution
    resid = zc - xc @ coef
    tot = zc.square().sum()
    return float(1 - resid.square().sum() / tot) if tot > 0 else 0.0
