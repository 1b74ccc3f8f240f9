"""Pointwise sliced mutual information (PSMI) between features and discrete labels.

Math core: torch only, no Lightning. API and statistics follow the ``psmi`` package (0.2.0) so its
users can switch; the densities are evaluated in log space, the work is chunked, and the random
directions are seeded.

Reference: S. Wongso, R. Ghosh, M. Motani, "Pointwise Sliced Mutual Information for Neural Network
Explainability", ISIT 2023, Algorithm 1.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch

from .exceptions import NotFittedError

__all__ = ["PSMI", "sample_directions"]

# Elements of the (classes, rows, directions) work tensor per chunk: 8 MB in float64; larger chunks
# mean fewer small kernel launches, which matters when other processes share the cores.
_CHUNK_ELEMENTS = 1 << 20


def _positive_int(name: str, value: Any, allowed: str = "a positive integer") -> int:
    """``value`` as an int >= 1: ints and integral floats pass; booleans, None and 2.7 do not."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if isinstance(value, (float, np.floating)):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok or int(value) < 1:
        raise ValueError(f"{name}={value!r}: use {allowed} (got {type(value).__name__}).")
    return int(value)


def sample_directions(
    m: int,
    d: int,
    generator: torch.Generator,
    kind: str = "gaussian",
    unit: int = 500,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Draw ``m`` unit directions in ``R^d``, each uniform on the sphere.

    Directions are drawn in units of ``unit`` rows so that the first ``k * unit`` directions do not
    depend on ``m`` (this makes ``"auto"`` and fixed ``n_estimators`` agree).

    Args:
        m: number of directions.
        d: dimension.
        generator: CPU ``torch.Generator``; the only source of randomness.
        kind: ``"gaussian"`` (i.i.d. normalised Gaussian vectors, as the paper) or ``"orthogonal"``
            (blocks of ``min(d, unit)`` mutually orthonormal directions from a Haar-random rotation;
            each direction is still uniform on the sphere, the block is variance-reduced).
        unit: rows drawn per generator call.
        dtype: dtype of the result.

    Returns:
        theta: (m, d), rows of unit norm, on the CPU.
    """
    if kind not in ("gaussian", "orthogonal"):
        raise ValueError(f"directions={kind!r} is not supported; use 'gaussian' or 'orthogonal'.")
    blocks = []
    left = m
    while left > 0:
        rows = min(unit, left)
        if kind == "gaussian":
            g = torch.randn(rows, d, generator=generator, dtype=torch.float64)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            parts = []
            todo = rows
            while todo > 0:
                k = min(d, todo)
                a = torch.randn(d, d, generator=generator, dtype=torch.float64)
                q, r = torch.linalg.qr(a)
                q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
                parts.append(q[:, :k].T)
                todo -= k
            g = torch.cat(parts)
        blocks.append(g)
        left -= rows
    return torch.cat(blocks).to(dtype)


@dataclass
class _Fit:
    """Fitted statistics. classes: (C,), priors: (C,), means/stds: (C, m), theta: (m, d)."""

    classes: torch.Tensor
    priors: torch.Tensor
    theta: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    n_floored: int


class PSMI:
    """Pointwise sliced mutual information estimator (Wongso et al., ISIT 2023, Algorithm 1).

    For directions theta_j uniform on the sphere, each 1-D projection p_ij = theta_j^T x_i gets a
    Gaussian per class (mean and population std over the class's samples) and the class
    frequencies as mixture weights; pmi_ij = log N(p_ij; mu_{y_i j}, s_{y_i j}) -
    log sum_c pi_c N(p_ij; mu_cj, s_cj) and PSMI_i = mean_j pmi_ij.

    Drop-in for ``psmi.PSMI`` (same constructor, ``fit``, ``transform``, ``fit_transform`` returning
    ``(mean, std, full)``), plus: seeded directions, log-space densities (finite for outliers), a
    variance floor for degenerate directions, a cap on ``"auto"``, chunked computation within a
    memory budget, ``return_full=False`` and variance-reduced ``directions="orthogonal"``.

    Args:
        n_estimators: number of directions, or ``"auto"`` (blocks of ``min_n_estimators`` until the
            lowest-PSMI samples are stable, as the ``psmi`` package; capped by
            ``max_n_estimators``).
        min_n_estimators: block size of ``"auto"``.
        lowest_psmi_quantile: share of samples with the lowest PSMI checked by ``"auto"``.
        max_variation_of_the_lowest: relative variation below which ``"auto"`` stops.
        milestone: ``"auto"`` compares the first ``floor(milestone * B)`` blocks with all ``B``.
        max_n_estimators: cap for ``"auto"`` (a warning says when it is reached).
        seed: seed of the directions; ``generator`` takes precedence. Neither: drawn from torch's
            global RNG (so ``torch.manual_seed`` makes runs reproducible).
        generator: a CPU ``torch.Generator`` to draw the directions from.
        directions: ``"gaussian"`` or ``"orthogonal"`` (see :func:`sample_directions`).
        variance_floor: per-class variances below ``variance_floor * var_all_j`` (plus float
            rounding) are raised to it; the count is reported in a warning.
        memory_budget_mb: bound for the intermediate projection block ``(n, m_block)``.
        return_full: whether ``transform`` returns the ``(n, m)`` array (``None`` otherwise).
        dtype: compute dtype; default the input's floating dtype (float32 at least). Accumulation
            of means and std over directions is always float64.
    """

    def __init__(
        self,
        n_estimators: Union[int, str] = "auto",
        min_n_estimators: int = 500,
        lowest_psmi_quantile: float = 0.05,
        max_variation_of_the_lowest: float = 0.05,
        milestone: float = 0.5,
        *,
        max_n_estimators: int = 50_000,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        directions: str = "gaussian",
        variance_floor: float = 1e-10,
        memory_budget_mb: float = 128.0,
        return_full: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        auto = isinstance(n_estimators, str) and n_estimators == "auto"
        if not auto:
            n_estimators = _positive_int(
                "n_estimators", n_estimators, "a positive integer or 'auto'"
            )
        min_n_estimators = _positive_int("min_n_estimators", min_n_estimators)
        max_n_estimators = _positive_int("max_n_estimators", max_n_estimators)
        for name, value, lo, hi in (
            ("lowest_psmi_quantile", lowest_psmi_quantile, 0.0, 1.0),
            ("milestone", milestone, 0.0, 1.0),
        ):
            if not lo < value < hi:
                raise ValueError(f"{name}={value!r}: must lie strictly between {lo} and {hi}.")
        if max_n_estimators < min_n_estimators:
            raise ValueError(
                f"max_n_estimators={max_n_estimators!r} is below "
                f"min_n_estimators={min_n_estimators!r}; raise it."
            )
        if directions not in ("gaussian", "orthogonal"):
            raise ValueError(
                f"directions={directions!r} is not supported; use 'gaussian' or 'orthogonal'."
            )
        if memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb={memory_budget_mb!r}: must be positive.")
        if not (
            isinstance(variance_floor, numbers.Real)
            and math.isfinite(variance_floor)
            and variance_floor >= 0
        ):
            raise ValueError(
                f"variance_floor={variance_floor!r}: use a finite number >= 0 (a share of each "
                "direction's variance; 0 keeps only the rounding floor, the default is 1e-10)."
            )
        self.n_estimators: Optional[int] = None if auto else n_estimators
        self.auto = auto
        self.min_n_estimators = min_n_estimators
        self.lowest_psmi_quantile = float(lowest_psmi_quantile)
        self.max_variation_of_the_lowest = float(max_variation_of_the_lowest)
        self.milestone = float(milestone)
        self.max_n_estimators = max_n_estimators
        self.directions = directions
        self.variance_floor = float(variance_floor)
        self.memory_budget_mb = float(memory_budget_mb)
        self.return_full = bool(return_full)
        self.dtype = dtype
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(int(seed))
        self.seed = seed
        self.generator = generator
        self._fit: Optional[_Fit] = None
        self._numpy_out = False
        self._label_names: Optional[np.ndarray] = None  # sorted class names of string labels

    # ------------------------------------------------------------------ fitted attributes
    @property
    def fitted(self) -> bool:
        """Whether ``fit`` has run."""
        return self._fit is not None

    def _fitted(self) -> _Fit:
        if self._fit is None:
            raise NotFittedError("This PSMI estimator is not fitted: call fit(features, labels).")
        return self._fit

    def _out(self, t: torch.Tensor) -> Any:
        return t.cpu().numpy() if self._numpy_out else t

    @property
    def thetas(self) -> Any:
        """Directions ``(n_estimators, dim)``."""
        return self._out(self._fitted().theta)

    @property
    def classes_(self) -> Any:
        """Sorted class labels ``(C,)`` (a numpy array of the names for string labels)."""
        f = self._fitted()
        return self._label_names.copy() if self._label_names is not None else self._out(f.classes)

    def _class_keys(self, f: _Fit) -> list:
        """The fitted classes as dict keys: ints, or the names of string labels."""
        if self._label_names is not None:
            return self._label_names.tolist()
        return [int(c) for c in f.classes.tolist()]

    @property
    def frequency_per_label(self) -> dict:
        """``{label: frequency}`` as in the ``psmi`` package."""
        f = self._fitted()
        return {c: float(p) for c, p in zip(self._class_keys(f), f.priors.tolist())}

    @property
    def mean_per_label(self) -> dict:
        """``{label: (n_estimators,) means}`` as in the ``psmi`` package."""
        f = self._fitted()
        return {c: self._out(f.means[i]) for i, c in enumerate(self._class_keys(f))}

    @property
    def std_per_label(self) -> dict:
        """``{label: (n_estimators,) stds}`` (after the variance floor)."""
        f = self._fitted()
        return {c: self._out(f.stds[i]) for i, c in enumerate(self._class_keys(f))}

    @property
    def n_floored(self) -> int:
        """Number of (class, direction) pairs whose variance was raised to the floor."""
        return self._fitted().n_floored

    # ------------------------------------------------------------------ input handling
    def _prepare(
        self, features: Any, labels: Any, fitting: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[np.ndarray]]:
        """Validate and convert once per call.

        Returns:
            x: (n, d) in the compute dtype; y: (n,) long class ids; the sorted class names when
            ``fitting`` on string labels (``np.unique`` order, ids index them), else ``None``.
        """
        self._numpy_out = not isinstance(features, torch.Tensor)
        x = (
            features
            if isinstance(features, torch.Tensor)
            else torch.as_tensor(np.asarray(features))
        )
        if x.is_complex():
            raise ValueError(
                f"features are complex ({x.dtype}); PSMI needs real features and would drop the "
                "imaginary part. Pass x.real, x.abs() or the real and imaginary parts as separate "
                "columns (torch.view_as_real(x).flatten(1))."
            )
        y = labels if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if x.ndim != 2:
            raise ValueError(
                f"features has shape {tuple(x.shape)}; expected (n_samples, dim). Pool or flatten "
                "the layer output first."
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"labels has shape {tuple(y.shape)} but features has {x.shape[0]} rows; expected "
                f"labels of shape ({x.shape[0]},)."
            )
        names = None
        if isinstance(y, np.ndarray):
            if y.dtype.kind == "O" and all(isinstance(v, str) for v in y):
                y = y.astype(str)
            if y.dtype.kind in "US":
                y, names = self._string_label_ids(y, fitting)
            elif y.dtype.kind not in "biuf":
                raise ValueError(
                    f"labels have dtype {y.dtype}; pass integer class ids or class names (str)."
                )
            else:
                y = torch.as_tensor(y)
                if not fitting and self._label_names is not None:
                    raise ValueError(
                        "PSMI was fitted on string labels (classes "
                        f"{self._label_names[:10].tolist()}) but transform got numeric labels; "
                        "pass the class names, as in fit."
                    )
        elif not fitting and self._label_names is not None:
            raise ValueError(
                f"PSMI was fitted on string labels (classes {self._label_names[:10].tolist()}) "
                "but transform got a tensor of labels; pass the class names, as in fit."
            )
        if y.is_complex():
            raise ValueError(f"labels are complex ({y.dtype}); pass integer class ids.")
        if y.is_floating_point():
            bad = ~torch.isfinite(y) | (y.abs() >= 2.0**63)
            if bool(bad.any()):
                pos = torch.nonzero(bad).flatten()[:10].tolist()
                raise ValueError(
                    f"labels must be finite class ids; {int(bad.sum())} of {y.shape[0]} labels are "
                    f"NaN, inf or beyond the int64 range (first positions: {pos}). Drop those "
                    "samples or fix their labels before computing PSMI."
                )
            frac = y != torch.round(y)
            if bool(frac.any()):
                vals = torch.unique(y[frac])[:5].tolist()
                raise ValueError(
                    f"labels must be integer class ids; got {int(frac.sum())} non-integer values "
                    f"such as {vals}. Pass integer class ids (bin or round continuous values "
                    "first), or class names as strings."
                )
        y = y.to(device=x.device, dtype=torch.long)
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            if not isinstance(features, torch.Tensor) and x.dtype != torch.float32:
                dtype = torch.float64  # numpy and lists: float64, as the reference
        x = x.to(dtype)
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()[:10].tolist()
            raise ValueError(
                f"{int(bad.sum())} of {x.shape[0]} feature rows contain NaN or inf (first rows: "
                f"{rows}); remove them (x[torch.isfinite(x).all(1)]) before computing PSMI."
            )
        return x, y, names

    def _string_label_ids(
        self, y: np.ndarray, fitting: bool
    ) -> Tuple[torch.Tensor, Optional[np.ndarray]]:
        """Class ids of string labels: positions in the sorted names (``np.unique`` order), those
        of this call when ``fitting``, else those of ``fit``."""
        if fitting:
            names, ids = np.unique(y, return_inverse=True)
            return torch.as_tensor(ids.reshape(-1).astype(np.int64)), names
        names = self._label_names
        if names is None:
            raise ValueError(
                "PSMI was fitted on integer class ids but transform got string labels; pass the "
                "same kind of labels as in fit."
            )
        pos = np.searchsorted(names, y).clip(max=names.size - 1)
        ok = names[pos] == y
        if not ok.all():
            unknown = np.unique(y[~ok])[:10].tolist()
            raise ValueError(
                f"labels {unknown} were not seen in fit (fitted classes: {names[:20].tolist()}); "
                "transform only samples of fitted classes."
            )
        return torch.as_tensor(pos.astype(np.int64)), None

    def _block_size(self, n: int, itemsize: int) -> int:
        budget = self.memory_budget_mb * 2**20
        return max(1, min(self.min_n_estimators, int(budget // max(1, 3 * n * itemsize))))

    # ------------------------------------------------------------------ core
    def _class_stats(
        self, proj: torch.Tensor, segments: List[Tuple[int, int, int]], priors: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Per-class mean and population std of class-sorted projections.

        Args:
            proj: (n, b), rows sorted by class; segments: (class position, start, end) per class.
            priors: (C,) class frequencies.

        Returns:
            means, stds: (C, b) after the variance floor; the number of floored entries.
        """
        n_classes = len(segments)
        means = proj.new_empty(n_classes, proj.shape[1])
        var = proj.new_empty(n_classes, proj.shape[1])
        for c, s, e in segments:
            seg = proj[s:e]
            means[c] = seg.mean(dim=0)
            var[c] = (seg - means[c]).square_().mean(dim=0)
        # floor: relative to the direction's total variance, plus rounding of the projections
        w = priors.to(proj.dtype).unsqueeze(1)
        rms2 = (w * (var + means.square())).sum(dim=0)
        total_var = (rms2 - (w * means).sum(dim=0).square()).clamp_min(0)
        eps = torch.finfo(proj.dtype).eps
        floor = (
            self.variance_floor * total_var + (4 * eps) ** 2 * rms2 + torch.finfo(proj.dtype).tiny
        )
        low = var < floor
        var = torch.where(low, floor.expand_as(var), var)
        return means, var.sqrt_(), int(low.sum())

    def _pmi_block(
        self,
        proj: torch.Tensor,
        segments: List[Tuple[int, int, int]],
        means: torch.Tensor,
        stds: torch.Tensor,
        log_priors: torch.Tensor,
        keep: bool,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Score one block of directions in log space, in chunks of rows of one class.

        Args:
            proj: (n, b) projections, rows sorted by class; segments as in ``_class_stats``.
            means, stds: (C, b); log_priors: (C,).
            keep: whether to return the (n, b) pmi.

        Returns:
            pmi: (n, b) if ``keep`` else ``None``; row means (n,) and row M2 (n,) in float64.
        """
        n, b = proj.shape
        n_classes = means.shape[0]
        inv = stds.reciprocal().unsqueeze(1)  # (C, 1, b)
        shift = (-means).unsqueeze(1) * inv  # (C, 1, b)
        # log pi_c - log s_c (the -0.5 log 2 pi cancels between numerator and denominator)
        const = (log_priors.to(proj.dtype).unsqueeze(1) - stds.log()).unsqueeze(1)  # (C, 1, b)
        out = torch.empty_like(proj) if keep else None
        sums = torch.empty(n, dtype=torch.float64, device=proj.device)
        m2 = torch.empty(n, dtype=torch.float64, device=proj.device)
        rows = max(1, _CHUNK_ELEMENTS // max(1, n_classes * b))
        for c, s0, e0 in segments:
            lp_own = float(log_priors[c])
            for s in range(s0, e0, rows):
                e = min(e0, s + rows)
                z = torch.addcmul(shift, proj[s:e].unsqueeze(0), inv)  # (C, r, b)
                logp = torch.addcmul(const, z, z, value=-0.5)  # log pi_c N_c - cst
                top = logp.amax(dim=0)
                own = logp[c] - top
                logp.sub_(top).exp_()
                pmi = own.sub_(logp.sum(dim=0).log_()).sub_(lp_own)
                bsum = pmi.sum(dim=1, dtype=torch.float64)
                sums[s:e] = bsum
                centred = pmi - (bsum / b).to(pmi.dtype).unsqueeze(1)
                m2[s:e] = centred.square_().sum(dim=1, dtype=torch.float64)
                if keep:
                    out[s:e] = pmi
        return out, sums / b, m2

    def _sort_by_class(
        self, y: torch.Tensor, classes: torch.Tensor
    ) -> Tuple[torch.Tensor, List[Tuple[int, int, int]]]:
        """Order putting rows in class order, and the (class position, start, end) segments."""
        y_idx = self._labels_to_index(y, classes)
        order = torch.argsort(y_idx, stable=True)
        counts = torch.bincount(y_idx, minlength=classes.numel()).tolist()
        segments, start = [], 0
        for c, k in enumerate(counts):
            if k:
                segments.append((c, start, start + k))
            start += k
        return order, segments

    def _labels_to_index(self, y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(classes, y)
        ok = (pos < classes.numel()) & (classes[pos.clamp_max(classes.numel() - 1)] == y)
        if not bool(ok.all()):
            unknown = sorted(set(y[~ok].tolist()))[:10]
            raise ValueError(
                f"labels {unknown} were not seen in fit (fitted classes: "
                f"{classes.tolist()[:20]}); transform only samples of fitted classes."
            )
        return pos

    def _class_counts(
        self, y: torch.Tensor, names: Optional[np.ndarray] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        classes, counts = torch.unique(y, return_counts=True)
        single = classes[counts < 2].tolist()
        if names is not None:
            single = names[single].tolist()
        if single:
            raise ValueError(
                f"class(es) {single[:10]} have fewer than 2 samples, so their per-class std is "
                "undefined; drop those samples or merge the classes before computing PSMI."
            )
        return classes, counts

    def _run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        theta: Optional[torch.Tensor],
        return_full: bool,
        score: bool = True,
        names: Optional[np.ndarray] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Fit (theta given or drawn) and, if ``score``, transform the same samples blockwise.

        ``names``: sorted class names of string labels (``y`` indexes them), stored with the fit.
        """
        score = score or self.auto
        n, d = x.shape
        classes, counts = self._class_counts(y, names)
        if classes.numel() == 1:
            label = names[0] if names is not None else int(classes[0])
            warnings.warn(
                f"PSMI: all {n} labels are one class ({label!r}), so PSMI is 0 by construction "
                "when there is one class (the label carries no information): every score is 0. "
                "Pass labels of at least two classes.",
                UserWarning,
                stacklevel=3,
            )
        order, segments = self._sort_by_class(y, classes)
        xs, live = _live_columns(x[order])
        priors = counts.to(torch.float64) / n
        log_priors = priors.log().to(x.device)
        bsize = self._block_size(n, x.element_size())
        acc = _MomentAccumulator(n, x.device)
        thetas, means_parts, stds_parts = [], [], []
        block_means = []  # (n,) per unit of min_n_estimators directions, for "auto"
        n_floored = 0
        m_target = self.max_n_estimators if self.auto else self.n_estimators
        full = _FullOutput(n, None if self.auto else m_target, order) if return_full else None
        done = 0
        converged = False
        unit = _MomentAccumulator(n, x.device)
        while done < m_target:
            if theta is not None:
                th = theta[done : done + self.min_n_estimators]
            else:
                rows = min(self.min_n_estimators, m_target - done)
                th = sample_directions(rows, d, self.generator, self.directions, rows)
            th = th.to(device=x.device, dtype=x.dtype)
            for s in range(0, th.shape[0], bsize):
                tb = th[s : s + bsize]
                proj = xs @ (tb.T if live is None else tb[:, live].T)
                mu, sd, nf = self._class_stats(proj, segments, priors)
                n_floored += nf
                means_parts.append(mu)
                stds_parts.append(sd)
                if not score:
                    continue
                pmi, bmean, bm2 = self._pmi_block(proj, segments, mu, sd, log_priors, return_full)
                del proj
                acc.add_moments(tb.shape[0], bmean, bm2)
                unit.add_moments(tb.shape[0], bmean, bm2)
                if full is not None:
                    full.add(pmi)
            thetas.append(th)
            done += th.shape[0]
            if score:
                block_means.append(unit.mean)
                unit = _MomentAccumulator(n, x.device)
            if self.auto and self._auto_should_stop(block_means):
                converged = True
                break
        if self.auto:
            if not converged:
                warnings.warn(
                    f"PSMI 'auto' reached max_n_estimators={self.max_n_estimators} before the "
                    "lowest scores stabilised; raise max_n_estimators or use a fixed n_estimators.",
                    stacklevel=3,
                )
            self.n_estimators = done
        self._fit = _Fit(
            classes=classes,
            priors=priors.to(x.device),
            theta=torch.cat(thetas),
            means=torch.cat(means_parts, dim=1),
            stds=torch.cat(stds_parts, dim=1),
            n_floored=n_floored,
        )
        self._label_names = names
        self._warn_floored(n_floored, classes.numel() * done)
        inv = torch.argsort(order)
        mean, std = acc.result()
        out = full.result() if full is not None else None
        return mean[inv].to(x.dtype), std[inv].to(x.dtype), out

    def _auto_should_stop(self, block_means: list) -> bool:
        nb = len(block_means)
        nm = int(self.milestone * nb)
        if nm == 0:
            return False
        per_block = torch.stack(block_means, dim=1)  # (n, B)
        full = per_block.mean(dim=1)
        early = per_block[:, :nm].mean(dim=1)
        tiny = torch.finfo(torch.float64).tiny
        variation = (early - full).abs() / full.abs().clamp_min(tiny)
        k = max(1, int(self.lowest_psmi_quantile * full.numel()))
        lowest = torch.argsort(full)[:k]
        return bool(variation[lowest].mean() <= self.max_variation_of_the_lowest)

    def _warn_floored(self, n_floored: int, total: int) -> None:
        if n_floored:
            warnings.warn(
                f"PSMI: {n_floored} of {total} (class, direction) variances were below the floor "
                f"(variance_floor={self.variance_floor:g} x the direction's variance) and were "
                "raised to it: some classes have (near-)constant features, e.g. duplicated samples "
                "or dead units.",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ public API
    def fit(self, features: Any, labels: Any, save_projected_features: bool = False) -> PSMI:
        """Draw the directions and fit per-class Gaussians.

        Args:
            features: (n, d) array or tensor.
            labels: (n,) integer labels; every class needs at least 2 samples.
            save_projected_features: accepted for ``psmi`` compatibility; ignored.

        Returns:
            self.
        """
        x, y, names = self._prepare(features, labels, fitting=True)
        self._run(x, y, None, return_full=False, score=False, names=names)
        return self

    def transform(
        self, features: Any, labels: Any, return_full: Optional[bool] = None
    ) -> Tuple[Any, Any, Any]:
        """PSMI of each sample with the fitted directions and class statistics.

        Args:
            features: (n, d).
            labels: (n,), classes seen in ``fit``.
            return_full: override of the constructor's ``return_full``.

        Returns:
            mean: (n,) PSMI; std: (n,) std over directions; full: (n, m) or ``None``.
        """
        f = self._fitted()
        x, y, _ = self._prepare(features, labels, fitting=False)
        if x.shape[1] != f.theta.shape[1]:
            raise ValueError(
                f"features has {x.shape[1]} columns but PSMI was fitted on {f.theta.shape[1]} "
                f"features; transform features of the same layer as in fit ({f.theta.shape[1]} "
                "columns), or fit again on these."
            )
        return_full = self.return_full if return_full is None else return_full
        order, segments = self._sort_by_class(y, f.classes.to(y.device))
        xs, live = _live_columns(x[order])
        log_priors = f.priors.log().to(x.device)
        bsize = self._block_size(x.shape[0], x.element_size())
        acc = _MomentAccumulator(x.shape[0], x.device)
        theta = f.theta.to(device=x.device, dtype=x.dtype)
        full = _FullOutput(x.shape[0], theta.shape[0], order) if return_full else None
        means = f.means.to(device=x.device, dtype=x.dtype)
        stds = f.stds.to(device=x.device, dtype=x.dtype)
        for s in range(0, theta.shape[0], bsize):
            tb = theta[s : s + bsize]
            proj = xs @ (tb.T if live is None else tb[:, live].T)
            pmi, bmean, bm2 = self._pmi_block(
                proj,
                segments,
                means[:, s : s + bsize],
                stds[:, s : s + bsize],
                log_priors,
                return_full,
            )
            acc.add_moments(proj.shape[1], bmean, bm2)
            if full is not None:
                full.add(pmi)
        inv = torch.argsort(order)
        mean, std = acc.result()
        out = full.result() if full is not None else None
        return self._triple(mean[inv].to(x.dtype), std[inv].to(x.dtype), out)

    def fit_transform(
        self, features: Any, labels: Any, return_full: Optional[bool] = None
    ) -> Tuple[Any, Any, Any]:
        """``fit`` then ``transform`` on the same samples, without storing the projections.

        Args:
            features: (n, d) array or tensor (numpy in gives numpy out).
            labels: (n,) integer labels.
            return_full: override of the constructor's ``return_full``.

        Returns:
            mean: (n,), std: (n,), full: (n, m) or ``None``.
        """
        x, y, names = self._prepare(features, labels, fitting=True)
        return_full = self.return_full if return_full is None else return_full
        mean, std, full = self._run(x, y, None, return_full, names=names)
        return self._triple(mean, std, full)

    def fit_transform_with_directions(
        self, features: Any, labels: Any, theta: Any, return_full: Optional[bool] = None
    ) -> Tuple[Any, Any, Any]:
        """``fit_transform`` with given directions ``theta: (m, d)`` (rows of unit norm)."""
        x, y, names = self._prepare(features, labels, fitting=True)
        th = theta if isinstance(theta, torch.Tensor) else torch.as_tensor(np.asarray(theta))
        if th.ndim != 2 or th.shape[1] != x.shape[1]:
            raise ValueError(f"theta has shape {tuple(th.shape)}; expected (m, {x.shape[1]}).")
        if th.is_complex():
            raise ValueError(f"theta is complex ({th.dtype}); pass real unit directions.")
        self.auto, self.n_estimators = False, th.shape[0]
        return_full = self.return_full if return_full is None else return_full
        return self._triple(*self._run(x, y, th, return_full, names=names))

    def _triple(self, mean: torch.Tensor, std: torch.Tensor, full: Optional[torch.Tensor]):
        return self._out(mean), self._out(std), None if full is None else self._out(full)


def _live_columns(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop all-zero feature columns (e.g. dead ReLU units): they add nothing to any projection,
    so the result is exact and the projection cheaper. Returns (x without them, kept mask)."""
    live = (x != 0).any(dim=0)
    if bool(live.all()):
        return x, None
    return x[:, live], live


class _FullOutput:
    """The (n, m) pmi array filled block by block in the caller's row order (``order`` maps the
    class-sorted rows back); preallocated when m is known, else concatenated once at the end."""

    def __init__(self, n: int, m: Optional[int], order: torch.Tensor) -> None:
        self.n, self.m, self.order, self.col = n, m, order, 0
        self.buf: Optional[torch.Tensor] = None
        self.parts: List[torch.Tensor] = []

    def add(self, pmi: torch.Tensor) -> None:
        """pmi: (n, b) in class-sorted row order."""
        if self.m is not None:
            if self.buf is None:
                self.buf = pmi.new_empty(self.n, self.m)
            self.buf[self.order, self.col : self.col + pmi.shape[1]] = pmi
        else:
            self.parts.append(pmi)
        self.col += pmi.shape[1]

    def result(self) -> torch.Tensor:
        if self.m is not None:
            return self.buf
        return torch.cat(self.parts, dim=1)[torch.argsort(self.order)]


class _MomentAccumulator:
    """Per-row mean and population std over columns added block by block (Chan's merge, float64)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(n, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n, dtype=torch.float64, device=device)

    def add_moments(self, b: int, bmean: torch.Tensor, bm2: torch.Tensor) -> None:
        """Merge a block of ``b`` columns: row means ``bmean: (n,)``, row M2 ``bm2: (n,)``."""
        total = self.count + b
        delta = bmean - self.mean
        self.mean += delta * (b / total)
        self.m2 += bm2 + delta.square() * (self.count * b / total)
        self.count = total

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.mean, (self.m2 / max(1, self.count)).clamp_min(0).sqrt()
