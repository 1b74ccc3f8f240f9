"""LEACE: least-squares concept erasure (math core, torch only).

Reference: N. Belrose, D. Schneider-Joseph, S. Ravfogel, R. Cotterell, E. Raff, S. Biderman,
"LEACE: Perfect linear concept erasure in closed form", NeurIPS 2023. Same statistics and defaults
as EleutherAI's ``concept-erasure`` (0.2.4); the code is ours.

Given features x (n, d) and a concept z (n, k), with covariance S_xx and cross-covariance S_xz,
the eraser is r(x) = x - W^+ P W (x - mu_x) with W = S_xx^{-1/2} (whitening; W = I for
``method="orth"``) and P the orthogonal projection onto the column space of W S_xz. Afterwards
Cov(r(x), z) = 0: no linear classifier predicts z better than a constant, and among all such
affine edits r is the smallest in the S_xx-weighted (whitened) norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

__all__ = ["LeaceFitter", "LeaceEraser", "linear_shrinkage", "concept_matrix", "edit_norm"]


def _as_tensor(a: Any) -> torch.Tensor:
    """A tensor as is; a numpy array (or nested list) as a CPU tensor, without a copy if writable.

    numpy is not imported here: ``torch.as_tensor`` reads arrays through the buffer protocol.
    """
    if isinstance(a, torch.Tensor):
        return a
    flags = getattr(a, "flags", None)
    if flags is not None and not flags.writeable:
        return torch.tensor(a)  # a copy: torch warns on read-only arrays it would share
    return torch.as_tensor(a)


def linear_shrinkage(s: torch.Tensor, n: int) -> torch.Tensor:
    """Optimal linear shrinkage of a sample covariance toward ``tr(S)/p * I``.

    Random-matrix estimator (Ledoit-Wolf type, arXiv 1308.2608), distribution-free, for ``p/n`` not
    small; this is what ``concept-erasure`` applies, except that the intensity ``a`` is clipped to
    [0, 1] (as in Ledoit-Wolf): for a near-isotropic S (d = 1 always, whitened features, small d)
    the unclipped formula gives ``a`` << 0 (down to -1e14 by cancellation) and an indefinite
    "covariance", which breaks the erasure guarantee.

    Args:
        s: (p, p) sample covariance normalised by ``n``.
        n: number of samples.

    Returns:
        (p, p) shrunk covariance ``a * S + b * I``.
    """
    p = s.shape[-1]
    tr = torch.trace(s)
    mu = tr / p  # Sigma0 = mu I
    s0_sq = mu * mu * p  # ||Sigma0||_F^2
    s_sq = s.square().sum()  # ||S||_F^2
    prod = mu * tr  # tr(S Sigma0)
    eps = torch.finfo(s.dtype).eps
    alpha = 1 - (tr * tr * s0_sq / n + eps) / (s_sq * s0_sq - prod * prod + eps)
    alpha = alpha.clamp(0, 1)  # a < 0 extrapolates past the target: indefinite for S ~ c I
    beta = (1 - alpha) * (prod + eps) / (s0_sq + eps)
    out = alpha * s
    out.diagonal().add_(beta * mu)
    return out


def concept_matrix(z: torch.Tensor, z_dim: int) -> torch.Tensor:
    """Concept as a float matrix ``(n, z_dim)``: integer classes ``(n,)`` become one-hot.

    Raises:
        ValueError: class ids outside ``[0, z_dim)``, or a shape that is not ``(n,)``/``(n, k)``.
    """
    if z.ndim == 1 and not z.is_floating_point():
        if z.numel() and (int(z.min()) < 0 or int(z.max()) >= z_dim):
            raise ValueError(
                f"concept class ids must lie in [0, {z_dim}); got range [{int(z.min())}, "
                f"{int(z.max())}]. Set z_dim to the number of classes."
            )
        return torch.nn.functional.one_hot(z.long(), z_dim)
    z = z.reshape(z.shape[0], -1) if z.ndim != 2 else z
    if z.shape[1] != z_dim:
        raise ValueError(
            f"concept has {z.shape[1]} columns but z_dim={z_dim}; pass (n,) integer classes or "
            f"(n, {z_dim}) one-hot / continuous values."
        )
    return z


@dataclass(frozen=True)
class LeaceEraser:
    """Frozen eraser r(x) = x - ((x - bias) @ right.T) @ left.T, stored as rank-r factors.

    ``left``, ``right``: (d, r) with r <= 2k (k concept dimensions), so memory is O(d k).
    ``bias``: (d,) mean of x, or ``None`` (non-affine).
    """

    left: torch.Tensor
    right: torch.Tensor
    bias: Optional[torch.Tensor]

    @classmethod
    def fit(cls, x: Any, z: Any, **kwargs) -> LeaceEraser:
        """Fit on x: (n, d) and z: (n,) classes or (n, k), tensors or numpy arrays; kwargs go to
        :class:`LeaceFitter`. The factors are tensors (float64 for float64 numpy input)."""
        return LeaceFitter.fit(x, z, **kwargs).eraser

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        """Rank of the edit (columns of the factors)."""
        return self.left.shape[1]

    @property
    def P(self) -> torch.Tensor:
        """The (d, d) linear part I - left @ right.T (materialised; for inspection and tests)."""
        eye = torch.eye(self.dim, dtype=self.left.dtype, device=self.left.device)
        return eye - self.left @ self.right.T

    def __call__(self, x: Any) -> Any:
        """Erase the concept from x: (..., d); returns the same shape and dtype.

        A numpy array in gives a numpy array of the same dtype out (computed on the CPU); an integer
        array is erased in the eraser's dtype, since integer factors would be truncated.
        """
        if not isinstance(x, torch.Tensor):
            t = _as_tensor(x)
            if not t.is_floating_point():
                t = t.to(self.left.dtype)
            return self(t).detach().numpy()
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"The eraser was fitted on {self.dim}-dimensional features but got input of shape "
                f"{tuple(x.shape)}; erase the layer it was fitted on (last dimension {self.dim})."
            )
        right = self.right.to(device=x.device, dtype=x.dtype)
        left = self.left.to(device=x.device, dtype=x.dtype)
        delta = x - self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else x
        return x - (delta @ right) @ left.T

    def to(self, device: Union[str, torch.device, None] = None, dtype=None) -> LeaceEraser:
        """A copy on ``device`` / in ``dtype``."""
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return LeaceEraser(mv(self.left), mv(self.right), mv(self.bias))

    def state_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        """Tensors to save (``left``, ``right``, ``bias``)."""
        return {"left": self.left, "right": self.right, "bias": self.bias}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Optional[torch.Tensor]]) -> LeaceEraser:
        """Rebuild from :meth:`state_dict`."""
        return cls(state["left"], state["right"], state.get("bias"))


class LeaceFitter:
    """Streaming statistics for LEACE; ``.eraser`` is computed lazily from them.

    Statistics: count n, means of x and z, co-moments C_xx = sum (x - mu_x)(x - mu_x)^T (LEACE
    only, O(d^2)) and C_xz (O(d k)), accumulated in float64 (Welford updates per batch, Chan's
    pairwise merge across fitters), so batch updates and the merge of DDP ranks are exact up to
    rounding.

    Args:
        x_dim: feature dimension d.
        z_dim: concept dimension k (number of classes for integer concepts); ``None`` for integer
            classes whose count is not known in advance: one-hot columns are added as new classes
            appear, which is exact (earlier samples had 0 in the new column).
        method: ``"leace"`` (whitened, minimal edit) or ``"orth"`` (orthogonal projection, no
            covariance needed).
        shrinkage: shrink S_xx toward a scaled identity (helps when n is not >> d); else Bessel.
        affine: keep the mean of x unchanged (erase around mu_x).
        constrain_cov_trace: if the edit would raise tr Cov(x), mix it with the orthogonal
            projection so the trace does not grow (stable when re-injected into a network). When
            it acts, ``trace_mix`` holds the weight of LEACE in the mix and Cov(r(x), z) = 0 then
            holds only approximately (as in ``concept-erasure``); pass ``False`` for the exact
            guarantee.
        svd_tol: singular values of W S_xz at or below it are dropped.
        dtype: dtype of the eraser (statistics are float64).
        device: device of statistics and eraser.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: Optional[int],
        method: str = "leace",
        *,
        shrinkage: bool = True,
        affine: bool = True,
        constrain_cov_trace: bool = True,
        svd_tol: float = 0.01,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if method not in ("leace", "orth"):
            raise ValueError(f"method={method!r}: use 'leace' or 'orth'.")
        self.grow = z_dim is None  # integer classes, one-hot columns added as classes appear
        z_dim = 1 if z_dim is None else z_dim
        if x_dim < 1 or z_dim < 1:
            raise ValueError(f"x_dim={x_dim}, z_dim={z_dim}: both must be >= 1.")
        if svd_tol <= 0:
            raise ValueError(f"svd_tol={svd_tol!r} must be positive for numerical stability.")
        self.x_dim, self.z_dim, self.method = int(x_dim), int(z_dim), method
        self.shrinkage, self.affine = shrinkage, affine
        self.constrain_cov_trace, self.svd_tol = constrain_cov_trace, float(svd_tol)
        self.dtype = dtype
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.mean_x = torch.zeros(x_dim, **f64)
        self.mean_z = torch.zeros(z_dim, **f64)
        self.c_xz = torch.zeros(x_dim, z_dim, **f64)
        self.c_xx = torch.zeros(x_dim, x_dim, **f64) if method == "leace" else None
        self._eraser: Optional[LeaceEraser] = None
        self.trace_mix: Optional[float] = None  # weight of LEACE when the trace constraint acted

    @classmethod
    def fit(cls, x: Any, z: Any, **kwargs) -> LeaceFitter:
        """One-shot fit on x: (n, d) and z: (n,) classes or (n, k) (``z_dim`` inferred).

        Tensors or numpy arrays; the eraser's dtype defaults to that of x (float32 for integers).
        """
        x, z = _as_tensor(x), _as_tensor(z)
        z_dim = kwargs.pop("z_dim", None)
        if z_dim is None and z.ndim == 1 and z.is_floating_point():
            raise ValueError(
                "The concept is a float vector (n,): pass z_dim=1 for a continuous concept, or "
                "integer class ids (z.long()) for classes."
            )
        if z_dim is None:
            z_dim = (
                int(z.max()) + 1
                if z.ndim == 1 and not z.is_floating_point()
                else (z.reshape(z.shape[0], -1).shape[1])
            )
        kwargs.setdefault("dtype", x.dtype if x.is_floating_point() else torch.float32)
        kwargs.setdefault("device", x.device)
        return cls(x.shape[-1], z_dim, **kwargs).update(x, z)

    # ------------------------------------------------------------------ statistics
    def _check(self, x: Any, z: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        x, z = _as_tensor(x), _as_tensor(z)
        if x.shape[-1] != self.x_dim:
            raise ValueError(
                f"x has {x.shape[-1]} features but the fitter was built with x_dim={self.x_dim}."
            )
        x = x.reshape(-1, self.x_dim)
        if z.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but z has {z.shape[0]}; one z per row.")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x).all(dim=1)).sum())
            raise ValueError(
                f"{bad} of {x.shape[0]} rows of x contain NaN or inf; drop them before update()."
            )
        dev = self.mean_x.device
        if z.ndim == 1 and z.is_floating_point() and self.grow:
            raise ValueError(
                "The concept is a float vector (n,): pass z_dim=1 for a continuous concept, or "
                "integer class ids (z.long()) for classes."
            )
        if self.grow and z.ndim == 1 and z.numel():
            self.grow_to(int(z.max()) + 1)
        f64 = torch.float64  # float32 products would cost ~1e-6 relative in the eraser
        return x.to(dev, f64), concept_matrix(z.to(dev), self.z_dim).to(f64)

    def grow_to(self, z_dim: int) -> None:
        """Widen the one-hot concept to ``z_dim`` classes (exact: new columns were all 0)."""
        extra = z_dim - self.z_dim
        if extra <= 0:
            return
        self.mean_z = torch.cat([self.mean_z, self.mean_z.new_zeros(extra)])
        self.c_xz = torch.cat([self.c_xz, self.c_xz.new_zeros(self.x_dim, extra)], dim=1)
        self.z_dim = z_dim

    @torch.no_grad()
    def update(self, x: Any, z: Any) -> LeaceFitter:
        """Add a batch: x (n, d) (or (..., d), z matching its leading size), z (n,) or (n, k).

        Tensors or numpy arrays (the statistics are float64 tensors either way).
        """
        x, z = self._check(x, z)
        n = x.shape[0]
        if n == 0:
            return self
        # Welford with one GEMM per co-moment: C += (x - mean_old)^T (x - mean_new), exact like
        # Chan's merge, in float64 (the speed of concept-erasure in float64; its float32 default
        # is faster but its float32 solve is off by 5-26 % relative on activation-like features)
        total = self.n + n
        dx_old = x - self.mean_x
        dz_old = z - self.mean_z
        self.mean_x += dx_old.sum(dim=0, dtype=torch.float64) / total
        self.mean_z += dz_old.sum(dim=0, dtype=torch.float64) / total
        dz_new = z - self.mean_z
        if self.c_xx is not None:
            dx_new = x - self.mean_x
            self.c_xx += dx_old.T @ dx_new
        self.c_xz += dx_old.T @ dz_new
        self.n = total
        self._eraser = None
        return self

    def _merge(
        self,
        n: int,
        mx: torch.Tensor,
        mz: torch.Tensor,
        c_xx: Optional[torch.Tensor],
        c_xz: torch.Tensor,
    ) -> None:
        """Chan's merge of (n, means, co-moments) into the running statistics."""
        total = self.n + n
        ex, ez = mx - self.mean_x, mz - self.mean_z
        w = self.n * n / total
        if self.c_xx is not None:
            self.c_xx += c_xx + w * torch.outer(ex, ex)
        self.c_xz += c_xz + w * torch.outer(ex, ez)
        self.mean_x += ex * (n / total)
        self.mean_z += ez * (n / total)
        self.n = total
        self._eraser = None

    def merge(self, other: LeaceFitter) -> LeaceFitter:
        """Fold another fitter's statistics into this one (e.g. another DDP rank's)."""
        if self.grow and other.grow:
            k = max(self.z_dim, other.z_dim)
            self.grow_to(k)
            other.grow_to(k)
        if (other.x_dim, other.z_dim, other.method) != (self.x_dim, self.z_dim, self.method):
            raise ValueError("merge needs fitters with the same x_dim, z_dim and method.")
        if other.n:
            self._merge(other.n, other.mean_x, other.mean_z, other.c_xx, other.c_xz)
        return self

    def stats(self) -> Dict[str, torch.Tensor]:
        """The statistics as tensors (for checkpoints and collectives)."""
        out = {
            "n": torch.tensor(float(self.n), dtype=torch.float64, device=self.mean_x.device),
            "mean_x": self.mean_x,
            "mean_z": self.mean_z,
            "c_xz": self.c_xz,
        }
        if self.c_xx is not None:
            out["c_xx"] = self.c_xx
        return out

    def load_stats(self, stats: Dict[str, torch.Tensor]) -> LeaceFitter:
        """Replace the statistics by :meth:`stats` output."""
        dev = self.mean_x.device
        self.n = int(round(float(stats["n"])))
        self.mean_x = stats["mean_x"].to(dev, torch.float64).clone()
        self.mean_z = stats["mean_z"].to(dev, torch.float64).clone()
        self.c_xz = stats["c_xz"].to(dev, torch.float64).clone()
        if self.c_xx is not None:
            self.c_xx = stats["c_xx"].to(dev, torch.float64).clone()
        self._eraser = None
        return self

    @property
    def sigma_xx(self) -> torch.Tensor:
        """Covariance of x (d, d): shrunk, or with Bessel's correction."""
        self._need_samples()
        if self.c_xx is None:
            raise RuntimeError("method='orth' does not track the covariance of x.")
        s = (self.c_xx + self.c_xx.T) / 2
        return linear_shrinkage(s / self.n, self.n) if self.shrinkage else s / (self.n - 1)

    @property
    def sigma_xz(self) -> torch.Tensor:
        """Cross-covariance of x and z (d, k), with Bessel's correction."""
        self._need_samples()
        return self.c_xz / (self.n - 1)

    def _need_samples(self) -> None:
        if self.n < max(2, self.z_dim):
            raise ValueError(
                f"LEACE needs at least max(2, z_dim={self.z_dim}) samples to estimate the "
                f"cross-covariance; the fitter has seen {self.n}. Fit on more data (or fewer "
                "concept classes)."
            )

    # ------------------------------------------------------------------ eraser
    @property
    def eraser(self) -> LeaceEraser:
        """The eraser for the statistics seen so far (cached until the next update)."""
        if self._eraser is None:
            self._eraser = self._solve()
        return self._eraser

    @torch.no_grad()
    def _solve(self) -> LeaceEraser:
        self.trace_mix = None
        if self.method == "orth":
            u = self._basis(self.sigma_xz)
            left, right = u, u
        else:
            sigma = self.sigma_xx
            # any whitening W (W S W^T = I) gives the same eraser W^+ P W; the Cholesky factor
            # is ~15x cheaper than eigh at d = 4096, eigh is the fallback for singular S
            whiten = _cholesky_whitening(sigma) or _eigh_whitening(sigma)
            u = self._basis(whiten.w(self.sigma_xz))
            left, right = whiten.w_pinv(u), whiten.w_t(u)
            if self.constrain_cov_trace and _tr_pspt(sigma, left, right, left, right) > torch.trace(
                sigma
            ):  # the mix uses Q = I - u u^T in the symmetric whitening, as concept-erasure
                sym = _eigh_whitening(sigma)
                u = self._basis(sym.w(self.sigma_xz))
                left, right = self._constrain_trace(sigma, u, sym.w_pinv(u), sym.w_t(u))
        bias = self.mean_x if self.affine else None
        mk = lambda t: None if t is None else t.to(self.dtype).contiguous()  # noqa: E731
        return LeaceEraser(mk(left), mk(right), mk(bias))

    def _basis(self, m: torch.Tensor) -> torch.Tensor:
        """(d, r) orthonormal basis of the column space of m, singular values > svd_tol."""
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        return u[:, s > self.svd_tol]

    def _constrain_trace(
        self, sigma: torch.Tensor, u: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """If P = I - left right^T raises tr(P S P^T), mix with Q = I - u u^T so it does not.

        P_a = a P + (1 - a) Q = I - [a left, (1 - a) u] [right, u]^T keeps the rank-2r form.
        """
        old = torch.trace(sigma)
        new = _tr_pspt(sigma, left, right, left, right)
        if new <= old:
            return left, right
        x = new
        y = 2 * _tr_pspt(sigma, left, right, u, u)
        z = _tr_pspt(sigma, u, u, u, u)
        w = old
        disc = torch.sqrt((4 * w * x - 4 * w * y + 4 * w * z - 4 * x * z + y * y).clamp_min(0))
        a1 = (-y / 2 + z - disc / 2) / (x - y + z)
        a2 = (-y / 2 + z + disc / 2) / (x - y + z)
        a = torch.where(a1 > 0, a1, a2).clamp(0, 1)
        self.trace_mix = float(a)
        return torch.cat([a * left, (1 - a) * u], dim=1), torch.cat([right, u], dim=1)


@dataclass(frozen=True)
class _Whitening:
    """Products with a whitening matrix W (W S W^T = I), its transpose and pseudo-inverse."""

    w: Callable[[torch.Tensor], torch.Tensor]
    w_t: Callable[[torch.Tensor], torch.Tensor]
    w_pinv: Callable[[torch.Tensor], torch.Tensor]


def _cholesky_whitening(sigma: torch.Tensor) -> Optional[_Whitening]:
    """W = L^{-1} with S = L L^T, or None when S is singular or badly conditioned."""
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info) != 0:
        return None
    diag = torch.diagonal(chol).square()  # rough eigenvalue range of S
    if float(diag.min()) <= float(diag.max()) * sigma.shape[0] * 1e3 * torch.finfo(sigma.dtype).eps:
        return None
    tri = torch.linalg.solve_triangular
    return _Whitening(
        w=lambda m: tri(chol, m, upper=False),
        w_t=lambda m: tri(chol.T, m, upper=True),
        w_pinv=lambda m: chol @ m,
    )


def _eigh_whitening(sigma: torch.Tensor) -> _Whitening:
    """The symmetric W = S^{-1/2} (pseudo-inverse square root for singular S)."""
    evals, evecs = torch.linalg.eigh(sigma)
    keep = evals > evals[-1] * sigma.shape[0] * torch.finfo(evals.dtype).eps
    evals = evals.clamp_min(0)
    inv_sqrt = torch.where(keep, evals.rsqrt(), torch.zeros_like(evals))[:, None]
    sqrt = torch.where(keep, evals.sqrt(), torch.zeros_like(evals))[:, None]
    return _Whitening(
        w=lambda m: evecs @ (inv_sqrt * (evecs.T @ m)),
        w_t=lambda m: evecs @ (inv_sqrt * (evecs.T @ m)),
        w_pinv=lambda m: evecs @ (sqrt * (evecs.T @ m)),
    )


def _tr_pspt(
    sigma: torch.Tensor, al: torch.Tensor, ar: torch.Tensor, bl: torch.Tensor, br: torch.Tensor
) -> torch.Tensor:
    """tr((I - al ar^T) S (I - bl br^T)^T) without forming d x d products beyond S itself."""
    # = tr S - tr(al ar^T S) - tr(S br bl^T) + tr(al ar^T S br bl^T)
    s_ar = sigma @ ar  # (d, r) ; ar^T S = s_ar^T since S symmetric
    s_br = sigma @ br
    t1 = (al * s_ar).sum()  # tr(al ar^T S) = sum(al * (S ar))
    t2 = (bl * s_br).sum()
    t3 = torch.trace((bl.T @ al) @ (ar.T @ s_br))
    return torch.trace(sigma) - t1 - t2 + t3


def edit_norm(x: torch.Tensor, erased: torch.Tensor) -> torch.Tensor:
    """Mean squared size of an erasure's edit: ``mean_i ||x_i - r(x_i)||^2`` (summed over features).

    The quantity LEACE minimises among erasers with ``Cov(r(x), z) = 0`` (in the Euclidean norm;
    Belrose et al., NeurIPS 2023).

    Args:
        x: (n, d) features; erased: (n, d) their erased version ``r(x)``.

    Returns:
        A 0-dim tensor in the dtype of ``x - erased``.
    """
    if x.shape != erased.shape:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but erased has {tuple(erased.shape)}; pass the features "
            "and their erased version, row for row."
        )
    return (x - erased).square().sum(dim=-1).mean()
