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

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

__all__ = ["LeaceFitter", "LeaceEraser", "linear_shrinkage", "concept_matrix", "edit_norm"]

# Below this many features the float32 products are no faster than float64 ones (the per-batch
# overhead dominates; measured 0.9-1.1x at d = 32), so the default keeps float64 there.
_FLOAT32_MIN_DIM = 64


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
    only, O(d^2)) and C_xz (O(d k)), held in float64 (Chan's pairwise merge across batches and
    fitters), so batch updates and the merge of DDP ranks are exact up to rounding.

    Two ways to form a batch's products (``precision``):

    * ``"float32"`` (the default for float32 input with d >= 64): the rows are centred on a
      float32 shift (the mean of the first batch of a window), their products ``X_c^T X_c``
      accumulate in a float32 (d, d) buffer over a window of batches (only the upper
      block-triangle: the product is symmetric, so ~40 % of the GEMM is skipped), and each window
      is flushed into the float64 statistics with its exact mean correction and Chan's merge
      (every ``flush_rows`` rows and before any read of the statistics). The column sums are
      float32 sums of the centred rows (error ~1e-7 of a standard deviation in the means). The
      products carry float32 accumulation error, ~1e-7 relative in C_xx, which the eraser
      amplifies with the conditioning of S_xx: ~1e-5 relative in the erased features on the
      benchmark's activation-like features (condition number 1e5 with a dominant shared
      component), ~1e-7 on features whose variances span 1e5 without such structure. On the
      activation-like features ``concept-erasure``'s float32 solve costs 1e-1 and its uncentred
      float32 accumulation 1e-4. Below 64 features float32 products are no faster, so the
      default stays float64 there.
    * ``"float64"``: every batch in float64 (Welford with one float64 GEMM), as before; about
      twice the GEMM time on CPUs.

    Reading ``n``, ``mean_x``, ``c_xx`` etc. (or ``stats()``, ``eraser``, ``merge``) flushes the
    pending window first, so the statistics never depend on when they are read.

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
        precision: arithmetic of the batch products: ``None`` (float32 for float32 input with
            at least 64 features, float64 otherwise), ``"float32"`` (any input is converted to
            float32) or ``"float64"``.
    """

    flush_rows: int = 1024  # rows per float32 window (its error grows like their square root)

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
        precision: Optional[str] = None,
    ) -> None:
        if method not in ("leace", "orth"):
            raise ValueError(f"method={method!r}: use 'leace' or 'orth'.")
        if precision not in (None, "float32", "float64"):
            raise ValueError(
                f"precision={precision!r}: use None (float32 products for float32 input), "
                "'float32' or 'float64'."
            )
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
        self.precision = precision
        f64 = dict(dtype=torch.float64, device=device)
        self._n = 0
        self._mean_x = torch.zeros(x_dim, **f64)
        self._mean_z = torch.zeros(z_dim, **f64)
        self._c_xz = torch.zeros(x_dim, z_dim, **f64)
        self._c_xx = torch.zeros(x_dim, x_dim, **f64) if method == "leace" else None
        self._win: Optional[_Float32Window] = None
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
    @property
    def n(self) -> int:
        """Rows seen."""
        self._flush()
        return self._n

    @property
    def mean_x(self) -> torch.Tensor:
        """Mean of x (d,), float64."""
        self._flush()
        return self._mean_x

    @property
    def mean_z(self) -> torch.Tensor:
        """Mean of z (k,), float64."""
        self._flush()
        return self._mean_z

    @property
    def c_xx(self) -> Optional[torch.Tensor]:
        """Co-moment sum (x - mu_x)(x - mu_x)^T (d, d), float64; ``None`` for ``"orth"``."""
        self._flush()
        return self._c_xx

    @property
    def c_xz(self) -> torch.Tensor:
        """Co-moment sum (x - mu_x)(z - mu_z)^T (d, k), float64."""
        self._flush()
        return self._c_xz

    def _check(self, x: Any, z: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        x, z = _as_tensor(x), _as_tensor(z)
        if x.shape[-1] != self.x_dim:
            raise ValueError(
                f"x has {x.shape[-1]} features but the fitter was built with x_dim={self.x_dim}."
            )
        x = x.reshape(-1, self.x_dim)
        if z.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but z has {z.shape[0]}; one z per row.")
        dev = self._mean_x.device
        if z.ndim == 1 and z.is_floating_point() and self.grow:
            raise ValueError(
                "The concept is a float vector (n,): pass z_dim=1 for a continuous concept, or "
                "integer class ids (z.long()) for classes."
            )
        if self.grow and z.ndim == 1 and z.numel():
            self.grow_to(int(z.max()) + 1)
        return x.to(dev), concept_matrix(z.to(dev), self.z_dim)

    @staticmethod
    def _refuse_nonfinite(x: torch.Tensor, sums: torch.Tensor) -> None:
        """One check per batch on its column sums (NaN / inf propagate into them); the rows are
        counted only when a sum is not finite."""
        if bool(torch.isfinite(sums).all()):
            return
        bad = int((~torch.isfinite(x).all(dim=1)).sum())
        if bad:
            raise ValueError(
                f"{bad} of {x.shape[0]} rows of x contain NaN or inf; drop them before update()."
            )

    def grow_to(self, z_dim: int) -> None:
        """Widen the one-hot concept to ``z_dim`` classes (exact: new columns were all 0)."""
        extra = z_dim - self.z_dim
        if extra <= 0:
            return
        self._flush()
        self._win = None  # its (d, k) buffer has the old width
        self._mean_z = torch.cat([self._mean_z, self._mean_z.new_zeros(extra)])
        self._c_xz = torch.cat([self._c_xz, self._c_xz.new_zeros(self.x_dim, extra)], dim=1)
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
        fast = self.precision == "float32" or (
            self.precision is None and x.dtype == torch.float32 and self.x_dim >= _FLOAT32_MIN_DIM
        )
        self._eraser = None
        if fast:
            x, z = x.to(torch.float32), z.to(torch.float32)
            step = max(1, self.flush_rows)  # a big batch in windows: the same error as small ones
            if n > step:  # refuse bad rows before any window is accumulated
                self._refuse_nonfinite(x, x.sum(dim=0))
            for s in range(0, n, step):
                self._update_float32(x[s : s + step], z[s : s + step])
            return self
        self._flush()
        x, z = x.to(torch.float64), z.to(torch.float64)
        # Welford with one GEMM per co-moment: C += (x - mean_old)^T (x - mean_new), exact like
        # Chan's merge, in float64
        total = self._n + n
        dx_old = x - self._mean_x
        dz_old = z - self._mean_z
        sums = dx_old.sum(dim=0)
        self._refuse_nonfinite(x, sums)
        self._mean_x += sums / total
        self._mean_z += dz_old.sum(dim=0) / total
        dz_new = z - self._mean_z
        if self._c_xx is not None:
            dx_new = x - self._mean_x
            self._c_xx += dx_old.T @ dx_new
        self._c_xz += dx_old.T @ dz_new
        self._n = total
        return self

    def _update_float32(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """One batch into the float32 window: x (B, d), z (B, k), both float32."""
        b = x.shape[0]
        win = self._win
        first = win is None or win.n == 0
        # the window's shift: the first batch's means (float32; any nearby point would do)
        shift_x = x.mean(dim=0) if first else win.shift_x
        xc = x - shift_x
        sxc = xc.sum(dim=0)  # small centred values: float32 is exact enough; the NaN check too
        self._refuse_nonfinite(x, sxc)
        if win is None:
            win = self._win = _Float32Window(
                self.x_dim, self.z_dim, self._c_xx is not None, x.device
            )
        if first:
            win.shift_x, win.shift_z = shift_x, z.mean(dim=0)
        zc = z - win.shift_z
        beta = 0.0 if first else 1.0  # beta 0: the stale buffer is not read
        if win.xx is not None:
            for a0, a1 in win.blocks:  # upper block-triangle of the symmetric X_c^T X_c
                win.xx[a0:a1, a0:].addmm_(xc[:, a0:a1].T, xc[:, a0:], beta=beta)
        win.xz.addmm_(xc.T, zc, beta=beta)
        win.sx += sxc
        win.sz += z.sum(dim=0, dtype=torch.float64) - b * win.shift_z.double()
        win.n += b
        if win.n >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        """Fold the pending float32 window into the float64 statistics (exact mean correction
        and Chan's merge; the (d, d) float32 buffer is kept for the next window)."""
        win = self._win
        if win is None or win.n == 0:
            return
        nw = win.n
        mean_w = win.shift_x.double() + win.sx / nw
        mean_wz = win.shift_z.double() + win.sz / nw
        total = self._n + nw
        ex, ez = mean_w - self._mean_x, mean_wz - self._mean_z
        w = self._n * nw / total
        # window co-moment about its own mean: P - sx sx^T / nw (P: products about the shift)
        if self._c_xx is not None:
            for a0, a1 in win.blocks:
                self._c_xx[a0:a1, a0:] += win.xx[a0:a1, a0:]
                self._c_xx[a1:, a0:a1] += win.xx[a0:a1, a1:].T
            u, v = win.sx / math.sqrt(nw), ex * math.sqrt(w)  # -u u^T + v v^T in one product
            self._c_xx.addmm_(torch.stack([u, v], dim=1), torch.stack([-u, v], dim=0))
        self._c_xz += win.xz
        self._c_xz.addr_(win.sx, win.sz, alpha=-1.0 / nw)
        self._c_xz.addr_(ex, ez, alpha=w)
        self._mean_x += ex * (nw / total)
        self._mean_z += ez * (nw / total)
        self._n = total
        win.n = 0
        win.sx.zero_()
        win.sz.zero_()

    def _merge(
        self,
        n: int,
        mx: torch.Tensor,
        mz: torch.Tensor,
        c_xx: Optional[torch.Tensor],
        c_xz: torch.Tensor,
    ) -> None:
        """Chan's merge of (n, means, co-moments) into the running statistics."""
        self._flush()
        total = self._n + n
        ex, ez = mx - self._mean_x, mz - self._mean_z
        w = self._n * n / total
        if self._c_xx is not None:
            self._c_xx += c_xx + w * torch.outer(ex, ex)
        self._c_xz += c_xz + w * torch.outer(ex, ez)
        self._mean_x += ex * (n / total)
        self._mean_z += ez * (n / total)
        self._n = total
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
        """Replace the statistics by :meth:`stats` output (a pending window is discarded)."""
        dev = self._mean_x.device
        if self._win is not None:
            self._win.n = 0
            self._win.sx.zero_()
            self._win.sz.zero_()
        self._n = int(round(float(stats["n"])))
        self._mean_x = stats["mean_x"].to(dev, torch.float64).clone()
        self._mean_z = stats["mean_z"].to(dev, torch.float64).clone()
        self._c_xz = stats["c_xz"].to(dev, torch.float64).clone()
        if self._c_xx is not None:
            self._c_xx = stats["c_xx"].to(dev, torch.float64).clone()
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


class _Float32Window:
    """Pending float32 products of a window of batches (see :class:`LeaceFitter`).

    ``xx``: (d, d) float32 sum of (x - shift_x)(x - shift_x)^T, valid on the upper
    block-triangle ``blocks`` (row block [a0, a1) holds columns a0 onward); ``xz``: (d, k) float32
    sum of (x - shift_x)(z - shift_z)^T; ``sx``, ``sz``: float64 sums of the shifted rows.
    """

    def __init__(self, d: int, k: int, with_xx: bool, device: torch.device) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.xx = torch.empty(d, d, **f32) if with_xx else None
        self.xz = torch.empty(d, k, **f32)
        self.sx = torch.zeros(d, **f64)
        self.sz = torch.zeros(k, **f64)
        self.shift_x = torch.zeros(d, **f32)
        self.shift_z = torch.zeros(k, **f32)
        # row blocks of >= 192 columns, at most 8: the upper block-triangle is (nb + 1) / (2 nb)
        # of the full product (62 % for 4 blocks, 56 % for 8)
        nb = max(1, min(8, d // 192))
        edges = [round(i * d / nb) for i in range(nb + 1)]
        self.blocks = list(zip(edges[:-1], edges[1:]))


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
