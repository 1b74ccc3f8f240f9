"""Seeded random projections of per-sample gradients (math core, torch only).

Entries have variance 1/k, so E[<P u, P v>] = <u, v>: projected inner products are unbiased and
their error shrinks like 1/sqrt(k). For Linear layers the Kronecker-structured projection of LoGra
(Choe et al., 2024) projects the input and the output-gradient separately:
(P_out (x) P_in) vec(g a^T) = vec((P_out g)(P_in a)^T), costing O(d_in k_in + d_out k_out) per
sample instead of O(d_in d_out k).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["random_matrix", "DenseProjector", "KroneckerProjector", "kronecker_dims"]


def random_matrix(
    rows: int, cols: int, seed: int, kind: str = "gaussian", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A seeded (rows, cols) projection matrix P with E[P^T P] = I (CPU).

    Args:
        kind: ``"gaussian"`` (i.i.d. N(0, 1/rows)), ``"rademacher"`` (+-1/sqrt(rows)) or
            ``"orthogonal"`` (Haar-random orthonormal rows scaled by sqrt(cols/rows), rows <= cols:
            same mean, lower variance; an exact isometry when rows == cols).
    """
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "orthogonal":
        if rows > cols:
            raise ValueError(f"an orthogonal projection needs rows <= cols; got {rows} > {cols}.")
        q, r = torch.linalg.qr(torch.randn(cols, rows, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        return (q.T * math.sqrt(cols / rows)).to(dtype)
    if kind == "gaussian":
        m = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        m = torch.randint(0, 2, (rows, cols), generator=gen).to(torch.float64) * 2 - 1
    else:
        raise ValueError(f"projection kind={kind!r}: use 'gaussian', 'rademacher' or 'orthogonal'.")
    return (m / math.sqrt(rows)).to(dtype)


def kronecker_dims(k: int, d_out: int, d_in: int) -> Tuple[int, int]:
    """Split a projection size ``k`` into ``(k_out, k_in)`` with k_out * k_in <= k, each no larger
    than its side, as square as possible."""
    k_in = max(1, min(d_in, int(math.isqrt(k))))
    k_out = max(1, min(d_out, k // k_in))
    k_in = max(1, min(d_in, k // k_out))
    return k_out, k_in


class DenseProjector:
    """Dense projection of flat gradients ``(B, P) -> (B, k)``; the matrix is built lazily.

    Args:
        dim: P; k: projected size; seed; kind: gaussian / rademacher.
    """

    def __init__(self, dim: int, k: int, seed: int, kind: str = "gaussian") -> None:
        self.dim, self.k, self.seed, self.kind = dim, k, seed, kind
        self._m: Optional[torch.Tensor] = None

    def matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(k, P) on ``device``."""
        if self._m is None:
            self._m = random_matrix(self.k, self.dim, self.seed, self.kind)
        if self._m.device != device or self._m.dtype != dtype:
            self._m = self._m.to(device=device, dtype=dtype)
        return self._m

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: (B, P) -> (B, k)."""
        return flat @ self.matrix(flat.device, flat.dtype).T


class KroneckerProjector:
    """LoGra projection of a Linear layer's per-sample gradient from its input and output-grad.

    The bias is folded in as a constant 1 appended to the input, so the projected vector covers
    weight and bias together. The default factors have orthonormal rows: with i.i.d. Gaussian
    factors the error of a product of two sqrt(k)-sized projections shrinks only like
    1/sqrt(k_in) + 1/sqrt(k_out); orthogonal factors cut it markedly (measured in the tests).

    Args:
        d_out, d_in: layer sizes (d_in without the bias column); bias: whether it has one;
        k: total projected size (split by :func:`kronecker_dims`); seed; kind.
    """

    def __init__(
        self, d_out: int, d_in: int, bias: bool, k: int, seed: int, kind: str = "orthogonal"
    ) -> None:
        self.bias = bias
        din = d_in + int(bias)
        self.k_out, self.k_in = kronecker_dims(k, d_out, din)
        self.p_out = random_matrix(self.k_out, d_out, seed * 2 + 1, kind)
        self.p_in = random_matrix(self.k_in, din, seed * 2 + 2, kind)

    @property
    def k(self) -> int:
        return self.k_out * self.k_in

    def _mats(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.p_out.device != like.device or self.p_out.dtype != like.dtype:
            self.p_out = self.p_out.to(device=like.device, dtype=like.dtype)
            self.p_in = self.p_in.to(device=like.device, dtype=like.dtype)
        return self.p_out, self.p_in

    def __call__(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """a: (B, ..., d_in), g: (B, ..., d_out) -> (B, k_out * k_in)."""
        b = a.shape[0]
        a3 = a.reshape(b, -1, a.shape[-1])
        g3 = g.reshape(b, -1, g.shape[-1])
        if self.bias:
            a3 = torch.cat([a3, a3.new_ones(*a3.shape[:2], 1)], dim=-1)
        p_out, p_in = self._mats(a3)
        pa = a3 @ p_in.T  # (B, T, k_in)
        pg = g3 @ p_out.T  # (B, T, k_out)
        return torch.einsum("bto,bti->boi", pg, pa).reshape(b, -1)

    def full_matrix(self) -> torch.Tensor:
        """(k, d_out * (d_in + bias)) = P_out (x) P_in, for tests on small layers."""
        return torch.kron(self.p_out, self.p_in)
