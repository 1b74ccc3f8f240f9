"""K-FAC / EK-FAC curvature for influence functions (math core, torch only).

Per supported layer (``nn.Linear``, ``nn.Conv2d`` with groups=1) with input rows ``a`` (a constant
1 appended when the layer has a bias) and output-gradient rows ``g`` of the per-sample loss:

    A = E[a a^T]  (d_in+1, d_in+1),    S = E[g g^T]  (d_out, d_out),

expectations over samples *and* positions (sequence tokens, conv output locations), as in
Kronfluence: the sums of outer products are divided by the number of rows. ``A = Q_A Λ_A Q_A^T``,
``S = Q_S Λ_S Q_S^T`` (float64 ``eigh``). The curvature block of the layer is approximated in the
Kronecker eigenbasis with eigenvalues

    K-FAC:  Λ[o, i] = Λ_S[o] Λ_A[i]                   (Martens & Grosse 2015)
    EK-FAC: Λ[o, i] = E_n[(Q_S^T G_n Q_A)[o, i]^2]    (George et al. 2018; Grosse et al. 2023)

with ``G_n`` (d_out, d_in+1) the per-sample gradient ``[W | b]`` (summed over positions; expectation
over samples). The preconditioned gradient is ``P(G) = Q_S [(Q_S^T G Q_A) / (Λ + λ)] Q_A^T`` with
damping λ explicit or ``damping_factor * mean(Λ)`` per layer (Kronfluence's heuristic, 0.1).
Influence of a training sample z on a query q (Kronfluence's sign: positive = z lowers the query
loss) is ``<P(G_q), G_z>``; self-influence ``<G_z, P(G_z)>``.

All statistics are plain sums (float64) plus counts, so distributed ranks merge with one
sum-reduce of each entry of :meth:`KFAC.stats`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .grads import (
    LinearGradCapture,
    check_supported_layers,
    layer_dims,
    layer_output_grad_rows,
)

__all__ = ["KFAC", "check_kfac_modules", "fit_kfac", "with_bias_column"]

_F64 = torch.float64
_FALLBACK = (
    "K-FAC/EK-FAC factor only these layers; for any other layer use method='arnoldi' or "
    "method='exact', or select only Linear/Conv2d layers."
)


def _add_sums(totals: Optional[List[torch.Tensor]], sums: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per-power running sums over layers (layers may sit on different devices)."""
    if totals is None:
        return sums
    return [t + s.to(t.device) for t, s in zip(totals, sums)]


def check_kfac_modules(modules: Dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` if a layer is not ``nn.Linear`` / ``nn.Conv2d`` (groups=1)."""
    if not modules:
        raise ValueError("K-FAC needs at least one layer; `modules` is empty.")
    check_supported_layers(modules, fallback=_FALLBACK)


def with_bias_column(w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample gradient in K-FAC layout: ``w`` (B, d_out, d_in), ``b`` (B, d_out) or None
    -> (B, d_out, d_in+1) = ``[W | b]`` (``w`` itself when there is no bias)."""
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor], ones: bool) -> Tuple[torch.Tensor, int]:
    """(B, ..., d) -> float64 rows (n, d[+1]) without masked positions, and n."""
    lead = x.shape[:-1]
    x = x.detach().to(_F64).reshape(-1, x.shape[-1])
    if ones:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    if mask is not None and tuple(mask.shape) == tuple(lead):
        x = x[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
    return x, x.shape[0]


class KFAC:
    """Streaming K-FAC / EK-FAC factors of the layers ``modules`` (George et al. 2018, "Fast
    Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis"; Grosse et al. 2023,
    "Studying Large Language Model Generalization with Influence Functions"; Kronfluence).

    Phases: :meth:`update_covariances` (any number of batches) -> :meth:`compute_eigen` ->
    (EK-FAC only) :meth:`update_eigenvalues` (any number of batches) -> :meth:`precondition` /
    :meth:`self_influence`. Gradients are in the layout (B, d_out, d_in+1) = ``[W | b]`` (no bias
    column for layers without bias; Conv2d weights reshaped to (C_out, C_in*kh*kw)).

    Distributed: sum-reduce every entry of ``stats("covariance")`` before :meth:`compute_eigen`
    and of ``stats("eigenvalues")`` before preconditioning, then :meth:`load_stats` the result.
    Reduce each group once: reducing entries that are already global multiplies them.

    Args:
        modules: ``{name: nn.Linear | nn.Conv2d (groups=1)}``.
        ekfac: eigenvalue correction (EK-FAC) if True, plain K-FAC eigenvalues otherwise.
        damping: λ added to the eigenvalues; None = ``damping_factor * mean(Λ)`` per layer.
        damping_factor: scale of the heuristic damping (Kronfluence: 0.1).
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        ekfac: bool = True,
        damping: Optional[float] = None,
        damping_factor: float = 0.1,
    ) -> None:
        check_kfac_modules(modules)
        if damping is not None and not damping >= 0:
            raise ValueError(f"damping must be None or >= 0, got {damping}.")
        if not damping_factor > 0:
            raise ValueError(f"damping_factor must be > 0, got {damping_factor}.")
        self.modules = dict(modules)
        self.ekfac = bool(ekfac)
        self.damping = damping
        self.damping_factor = float(damping_factor)
        self.dims: Dict[str, Tuple[int, int, bool]] = {n: layer_dims(m) for n, m in modules.items()}
        self._sums: Dict[str, torch.Tensor] = {}
        for n, (d_out, d_in, bias) in self.dims.items():
            k = d_in + int(bias)
            self._sums[f"A_sum/{n}"] = torch.zeros(k, k, dtype=_F64)
            self._sums[f"A_count/{n}"] = torch.zeros((), dtype=torch.int64)
            self._sums[f"S_sum/{n}"] = torch.zeros(d_out, d_out, dtype=_F64)
            self._sums[f"S_count/{n}"] = torch.zeros((), dtype=torch.int64)
            if self.ekfac:
                self._sums[f"lambda_sum/{n}"] = torch.zeros(d_out, k, dtype=_F64)
                self._sums[f"lambda_count/{n}"] = torch.zeros((), dtype=torch.int64)
        # eigen results (float64, CPU): Q_A, Λ_A, Q_S, Λ_S per layer
        self.eigen: Dict[str, Dict[str, torch.Tensor]] = {}
        # versions: covariance sums change -> eigen stale; eigen recomputed -> lambda sums stale
        self._cov_version = 0
        self._eigen_version: Optional[int] = None
        self._lambda_version: Optional[int] = None
        self._cache: Dict[Tuple[str, torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}
        self._checked = False  # phase check passed since the last change (avoids device syncs)

    def _invalidate(self) -> None:
        self._cache.clear()
        self._checked = False

    def to(self, device: torch.device | str) -> KFAC:
        """Move the sums and counts to ``device`` (e.g. before an NCCL all-reduce of
        :meth:`stats` on a rank that saw no batch); eigen results stay on CPU (cached per device
        when used)."""
        self._sums = {k: v.to(device) for k, v in self._sums.items()}
        self._invalidate()
        return self

    # ------------------------------------------------------------------ statistics
    def _acc(self, key: str, value: torch.Tensor) -> None:
        cur = self._sums[key]
        if cur.device != value.device:
            cur = self._sums[key] = cur.to(value.device)
        cur.add_(value)

    def _check_names(self, given: Iterable[str], what: str) -> None:
        unknown = [n for n in given if n not in self.dims]
        if unknown:
            raise ValueError(
                f"{what} has layers {unknown} that this K-FAC does not track; it tracks "
                f"{list(self.dims)}."
            )

    @torch.no_grad()
    def update_covariances(
        self,
        a: Dict[str, torch.Tensor],
        g: Dict[str, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one batch to the sums of ``a a^T`` and ``g g^T`` (float64) and the row counts.

        Args:
            a: ``{name: (B, ..., d_in)}`` layer inputs as :class:`LinearGradCapture` records them
                (Conv2d: unfolded patches (B, L, C_in*kh*kw)); positions are flattened into rows.
            g: ``{name: (B, ..., d_out)}`` output-gradients of the per-sample loss (the gradient
                of the summed batch loss at the layer output).
            mask: optional (B, T) with 1 for real tokens, 0 for padding; applied to every layer
                whose rows have that leading shape (B, T) (others, e.g. a pooled head, use all
                rows). Masked rows are left out of the sums and the counts.
        """
        missing = [n for n in self.dims if n not in a or n not in g]
        if missing:
            raise ValueError(
                f"update_covariances got no input/output-gradient for layers {missing}; pass "
                "a and g for every tracked layer (did the forward/backward pass reach them?)."
            )
        # extra layers in a and g (a capture shared with other consumers) are ignored
        for n, (d_out, d_in, bias) in self.dims.items():
            if a[n].shape[-1] != d_in or g[n].shape[-1] != d_out:
                raise ValueError(
                    f"Layer {n!r}: expected a (..., {d_in}) and g (..., {d_out}), got "
                    f"{tuple(a[n].shape)} and {tuple(g[n].shape)}."
                )
            ar, na = _rows(a[n], mask, bias)
            gr, ng = _rows(g[n], mask, False)
            self._acc(f"A_sum/{n}", ar.T @ ar)
            self._acc(f"A_count/{n}", torch.tensor(na, device=ar.device))
            self._acc(f"S_sum/{n}", gr.T @ gr)
            self._acc(f"S_count/{n}", torch.tensor(ng, device=gr.device))
        self._cov_version += 1
        self._invalidate()

    def covariances(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (A, S)}`` normalised covariances, float64 (A: (d_in+1, d_in+1), S: (d_out,
        d_out))."""
        out = {}
        for n in self.dims:
            ca, cs = int(self._sums[f"A_count/{n}"]), int(self._sums[f"S_count/{n}"])
            if ca == 0 or cs == 0:
                raise RuntimeError(
                    f"K-FAC has no covariance data for layer {n!r}: call update_covariances() "
                    "with batches that reach it (or load_stats()) before compute_eigen()."
                )
            out[n] = (self._sums[f"A_sum/{n}"] / ca, self._sums[f"S_sum/{n}"] / cs)
        return out

    @torch.no_grad()
    def compute_eigen(self) -> None:
        """Eigendecompose A and S of every layer (float64 ``eigh``; tiny negative eigenvalues
        from round-off are clamped to 0). Invalidates EK-FAC corrections from an older basis."""
        eigen = {}
        for n, (a, s) in self.covariances().items():
            res = {}
            for key, m in (("A", a), ("S", s)):
                m = 0.5 * (m + m.T)
                vals, vecs = torch.linalg.eigh(m)
                res[f"Q_{key}"] = vecs.cpu()
                res[f"L_{key}"] = vals.clamp_min(0).cpu()
            eigen[n] = res
        self.eigen = eigen
        self._eigen_version = self._cov_version
        self._invalidate()

    def _require_eigen(self, step: str) -> None:
        if self._eigen_version is None:
            raise RuntimeError(
                f"K-FAC {step} needs the eigendecomposition: call update_covariances() on the "
                "data, then compute_eigen() first."
            )
        if self._eigen_version != self._cov_version:
            raise RuntimeError(
                f"K-FAC {step}: the covariances changed after compute_eigen(); call "
                "compute_eigen() again."
            )

    def _lambda_ready(self) -> bool:
        return (
            self._lambda_version is not None
            and self._lambda_version == self._eigen_version
            and all(int(self._sums[f"lambda_count/{n}"]) > 0 for n in self.dims)
        )

    @torch.no_grad()
    def update_eigenvalues(self, grads: Dict[str, torch.Tensor]) -> None:
        """EK-FAC: add ``sum_n (Q_S^T G_n Q_A)^2`` (float64) and the sample count.

        Args:
            grads: ``{name: (B, d_out, d_in+1)}`` per-sample gradients ``[W | b]``.
        """
        if not self.ekfac:
            raise RuntimeError(
                "update_eigenvalues() is the EK-FAC correction; this KFAC has ekfac=False and "
                "uses the K-FAC eigenvalues Λ_S ⊗ Λ_A. Create it with ekfac=True to correct them."
            )
        self._require_eigen("update_eigenvalues()")
        self._check_names(grads, "update_eigenvalues")
        if self._lambda_version != self._eigen_version:  # sums from an older basis
            for n in self.dims:
                self._sums[f"lambda_sum/{n}"].zero_()
                self._sums[f"lambda_count/{n}"].zero_()
            self._lambda_version = self._eigen_version
        for n, gr in grads.items():
            self._check_grad_shape(n, gr)
            qa, qs = self._basis(n, gr.device, _F64)
            rot = qs.T @ gr.detach().to(_F64) @ qa  # (B, d_out, d_in+1)
            self._acc(f"lambda_sum/{n}", rot.square().sum(dim=0))
            self._acc(f"lambda_count/{n}", torch.tensor(gr.shape[0], device=gr.device))
        self._invalidate()

    @torch.no_grad()
    def update_eigenvalues_from_io(
        self, a: Dict[str, torch.Tensor], g: Dict[str, torch.Tensor]
    ) -> None:
        """EK-FAC correction from layer inputs ``a: (B, ..., d_in)`` and output-gradients
        ``g: (B, ..., d_out)`` (as :class:`LinearGradCapture` records them), without forming the
        per-sample gradients: ``Q_S^T (sum_t g_t a_t^T) Q_A = sum_t (Q_S^T g_t)(Q_A^T a_t)^T``, so
        ``a`` and ``g`` are rotated first; without positions the sum over samples of the square
        is one product ``(g~^2)^T (a~^2)``. Same sums as :meth:`update_eigenvalues`; computed in
        the inputs' precision (float32 stays float32), accumulated in float64."""
        if not self.ekfac:
            raise RuntimeError(
                "update_eigenvalues_from_io() is the EK-FAC correction (ekfac=True)."
            )
        self._require_eigen("update_eigenvalues_from_io()")
        self._check_names(a, "update_eigenvalues_from_io")
        if self._lambda_version != self._eigen_version:
            for n in self.dims:
                self._sums[f"lambda_sum/{n}"].zero_()
                self._sums[f"lambda_count/{n}"].zero_()
            self._lambda_version = self._eigen_version
        for n, an in a.items():
            dt = self._compute_dtype(an.dtype)
            qa, qs = self._basis(n, an.device, dt)
            b = an.shape[0]
            a3 = an.detach().reshape(b, -1, an.shape[-1]).to(dt)
            g3 = g[n].detach().reshape(b, -1, g[n].shape[-1]).to(dt)
            if self.modules[n].bias is not None:
                a3 = torch.cat([a3, torch.ones_like(a3[..., :1])], dim=-1)
            at, gt = a3 @ qa, g3 @ qs  # (B, T, d_in + 1), (B, T, d_out)
            if at.shape[1] == 1:
                total = gt[:, 0].square().T @ at[:, 0].square()
            else:
                total = torch.einsum("bto,bti->boi", gt, at).square().sum(dim=0)
            self._acc(f"lambda_sum/{n}", total.to(_F64))
            self._acc(f"lambda_count/{n}", torch.tensor(b, device=an.device))
        self._invalidate()

    def _check_grad_shape(self, n: str, gr: torch.Tensor) -> None:
        d_out, d_in, bias = self.dims[n]
        want = (d_out, d_in + int(bias))
        if gr.dim() != 3 or tuple(gr.shape[1:]) != want:
            raise ValueError(
                f"Layer {n!r}: expected per-sample gradients (B, {want[0]}, {want[1]}) "
                f"([W | b] with the bias as the last column), got {tuple(gr.shape)}."
            )

    # ------------------------------------------------------------------ eigenvalues, damping
    def eigenvalues(self, name: str) -> torch.Tensor:
        """Λ of a layer (d_out, d_in+1), float64: Λ_S ⊗ Λ_A (K-FAC) or the EK-FAC correction."""
        self._require_eigen("eigenvalues()")
        if self.ekfac:
            if not self._lambda_ready():
                raise RuntimeError(
                    "EK-FAC needs the eigenvalue correction: after compute_eigen(), call "
                    "update_eigenvalues() with per-sample gradients (or load_stats() its sums) "
                    "before precondition()/self_influence(); or use ekfac=False."
                )
            s = self._sums[f"lambda_sum/{name}"]
            return (s / int(self._sums[f"lambda_count/{name}"])).cpu()
        e = self.eigen[name]
        return torch.outer(e["L_S"], e["L_A"])

    def layer_damping(self, name: str) -> float:
        """λ of a layer: the explicit damping, or ``damping_factor * mean(Λ)``."""
        if self.damping is not None:
            return float(self.damping)
        return self.damping_factor * float(self.eigenvalues(name).mean())

    def _basis(
        self, name: str, device: torch.device, dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Q_A, Q_S) on ``device`` in ``dtype``, cached."""
        key = ("Q:" + name, torch.device(device), dtype)
        if key not in self._cache:
            e = self.eigen[name]
            qa = e["Q_A"].to(device=device, dtype=dtype)
            qs = e["Q_S"].to(device=device, dtype=dtype)
            self._cache[key] = (qa, qs)
        return self._cache[key]  # type: ignore[return-value]

    def _precond_factors(
        self, name: str, device: torch.device, dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = ("P:" + name, torch.device(device), dtype)
        if key not in self._cache:
            den = self.eigenvalues(name) + self.layer_damping(name)
            # a zero eigenvalue without damping (dead unit): pseudo-inverse, not inf
            inv = torch.where(den > 0, 1.0 / den.clamp_min(1e-300), torch.zeros_like(den))
            inv = inv.to(device=device, dtype=dtype)
            qa, qs = self._basis(name, device, dtype)
            self._cache[key] = (qa, inv, qs)
        return self._cache[key]  # type: ignore[return-value]

    def _ready(self, step: str) -> None:
        if self._checked:
            return
        self._require_eigen(step)
        if self.ekfac and not self._lambda_ready():
            raise RuntimeError(
                f"EK-FAC {step} needs the eigenvalue correction: after compute_eigen(), call "
                "update_eigenvalues() with per-sample gradients (or load_stats() its sums); or "
                "use ekfac=False."
            )
        self._checked = True

    @staticmethod
    def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
        # float16/bfloat16 -> float32; float32 and float64 as they are
        return torch.promote_types(dtype, torch.float32)

    # ------------------------------------------------------------------ preconditioning
    @torch.no_grad()
    def precondition(self, grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``P(G) = Q_S [(Q_S^T G Q_A) / (Λ + λ)] Q_A^T`` per layer.

        Args:
            grads: ``{name: (B, d_out, d_in+1)}`` (any subset of the tracked layers).

        Returns:
            ``{name: (B, d_out, d_in+1)}`` in the input's dtype and device (computed in float32,
            or float64 for float64 input).
        """
        self._ready("precondition()")
        self._check_names(grads, "precondition")
        out = {}
        for n, gr in grads.items():
            self._check_grad_shape(n, gr)
            qa, inv, qs = self._precond_factors(n, gr.device, self._compute_dtype(gr.dtype))
            x = gr.detach().to(qa.dtype)
            rot = (qs.T @ x @ qa) * inv
            out[n] = (qs @ rot @ qa.T).to(gr.dtype)
        return out

    @torch.no_grad()
    def self_influence(self, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_layers <G, P(G)> = sum (Q_S^T G Q_A)^2 / (Λ + λ)``.

        Args:
            grads: ``{name: (B, d_out, d_in+1)}``.

        Returns:
            (B,) in the gradients' dtype.
        """
        return self.rotated_sums(grads, powers=(1,))[0]

    @torch.no_grad()
    def rotated_sums(
        self, grads: Dict[str, torch.Tensor], powers: Sequence[int] = (1, 2)
    ) -> List[torch.Tensor]:
        """``[sum_layers sum (Q_S^T G Q_A)^2 / (Λ + λ)^p for p in powers]``: p = 1 is the
        self-influence ``<G, P(G)>``, p = 2 the squared norm ``||P(G)||^2`` (the bases are
        orthogonal, so no back-rotation is needed); one rotation serves every power.

        Args:
            grads: ``{name: (B, d_out, d_in+1)}``.

        Returns:
            one (B,) tensor per power, in the gradients' dtype.
        """
        self._ready("self_influence()")
        self._check_names(grads, "self_influence")
        totals: Optional[List[torch.Tensor]] = None
        dtype = next(iter(grads.values())).dtype
        for n, gr in grads.items():
            self._check_grad_shape(n, gr)
            qa, inv, qs = self._precond_factors(n, gr.device, self._compute_dtype(gr.dtype))
            sq = (qs.T @ gr.detach().to(qa.dtype) @ qa).square_()
            totals = _add_sums(totals, [(sq * inv.pow(p)).sum(dim=(1, 2)) for p in powers])
        assert totals is not None
        return [t.to(dtype) for t in totals]

    @torch.no_grad()
    def self_influence_from_io(
        self,
        a: Dict[str, torch.Tensor],
        g: Dict[str, torch.Tensor],
        max_elements: int = 1 << 22,
    ) -> torch.Tensor:
        """:meth:`self_influence` from layer inputs ``a: (B, ..., d_in)`` and output-gradients
        ``g: (B, ..., d_out)`` (as :class:`LinearGradCapture` records them), without forming the
        per-sample gradients ``G = sum_t g_t [a_t; 1]^T`` (see :meth:`rotated_sums_from_io`).

        Returns:
            (B,) in the promoted dtype of the inputs (float32 for float32 / float16 inputs).
        """
        return self.rotated_sums_from_io(a, g, powers=(1,), max_elements=max_elements)[0]

    @torch.no_grad()
    def rotated_sums_from_io(
        self,
        a: Dict[str, torch.Tensor],
        g: Dict[str, torch.Tensor],
        powers: Sequence[int] = (1, 2),
        max_elements: int = 1 << 22,
    ) -> List[torch.Tensor]:
        """:meth:`rotated_sums` from layer inputs ``a: (B, ..., d_in)`` and output-gradients
        ``g: (B, ..., d_out)``, without forming the per-sample gradients.

        ``Q_S^T G Q_A = sum_t (Q_S^T g_t)(Q_A^T [a_t; 1])^T``: the rows are rotated first. Without
        positions the rotated gradient is rank one, so ``sum (Q_S^T G Q_A)^2 / (Λ + λ)^p =
        sum_{o,i} g~_o^2 a~_i^2 W_{oi}`` is one product ``((g~^2) W) . a~^2`` with
        ``W = 1 / (Λ + λ)^p``: O(B (d_out + d_in)^2) instead of O(B d_out d_in (d_out + d_in)),
        and no (B, d_out, d_in) tensor. With positions (sequences, conv patches) the rotated
        gradient is formed from the T rotated rows (O(T d_out d_in) per sample instead of the
        O(d_out d_in (d_out + d_in)) rotation of a formed gradient), ``max_elements`` entries at
        a time.

        Args:
            a, g: ``{name: tensor}`` for every layer to score (any subset of the tracked ones).
            powers: the powers p of the weights (1: self-influence, 2: squared norm of P(G)).
            max_elements: bound on the (samples, d_out, d_in+1) chunk of the positions case.

        Returns:
            one (B,) tensor per power, in the promoted dtype of the inputs.
        """
        self._ready("self_influence()")
        self._check_names(a, "self_influence_from_io")
        totals: Optional[List[torch.Tensor]] = None
        dtype = None
        for n, an in a.items():
            dtype = torch.promote_types(an.dtype, g[n].dtype) if dtype is None else dtype
            at, gt, inv = self._rotate_rows(n, an, g[n])
            ws = [inv.pow(p) for p in powers]
            b = at.shape[0]
            if at.shape[1] == 1:
                g2, a2 = gt[:, 0].square(), at[:, 0].square()
                sums = [((g2 @ w) * a2).sum(dim=1) for w in ws]
            else:
                step = max(1, max_elements // max(1, inv.numel()))
                parts: List[List[torch.Tensor]] = [[] for _ in ws]
                for i in range(0, b, step):
                    sq = torch.bmm(gt[i : i + step].transpose(1, 2), at[i : i + step]).square_()
                    for out, w in zip(parts, ws):
                        out.append((sq * w).sum(dim=(1, 2)))
                sums = [torch.cat(p) for p in parts]
            totals = _add_sums(totals, sums)
        if totals is None:
            raise ValueError("self_influence_from_io got no layers.")
        return [t.to(dtype) for t in totals]

    def _rotate_rows(
        self, n: str, an: torch.Tensor, gn: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of layer ``n`` in its eigenbasis: ``(Q_A^T [a; 1], Q_S^T g, 1 / (Λ + λ))``,
        ``(B, T, d_in + 1)``, ``(B, T, d_out)`` and ``(d_out, d_in + 1)`` in the compute dtype."""
        d_out, d_in, bias = self.dims[n]
        if an.shape[-1] != d_in or gn.shape[-1] != d_out:
            raise ValueError(
                f"Layer {n!r}: expected a (..., {d_in}) and g (..., {d_out}), got "
                f"{tuple(an.shape)} and {tuple(gn.shape)}."
            )
        dt = self._compute_dtype(torch.promote_types(an.dtype, gn.dtype))
        qa, inv, qs = self._precond_factors(n, an.device, dt)
        b = an.shape[0]
        a3 = an.detach().reshape(b, -1, d_in).to(dt)
        g3 = gn.detach().reshape(b, -1, d_out).to(dt)
        at = a3 @ qa[:d_in]  # rotate [a, 1]: a @ Q_A[:d_in] plus the bias row of Q_A
        if bias:
            at = at + qa[d_in]
        return at, g3 @ qs, inv

    @torch.no_grad()
    def precondition_from_io(
        self, a: Dict[str, torch.Tensor], g: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """:meth:`precondition` of the gradients ``G = sum_t g_t [a_t; 1]^T`` from the layer
        inputs ``a: (B, ..., d_in)`` and output-gradients ``g: (B, ..., d_out)``: the rotation
        into the eigenbasis is done on the T rows (``Q_S^T G Q_A = sum_t (Q_S^T g_t)(Q_A^T
        [a_t; 1])^T``), only the rotation back acts on (d_out, d_in + 1) matrices.

        Returns:
            ``{name: (B, d_out, d_in + 1)}`` in the promoted dtype of the inputs.
        """
        self._ready("precondition()")
        self._check_names(a, "precondition_from_io")
        out = {}
        for n, an in a.items():
            at, gt, inv = self._rotate_rows(n, an, g[n])
            qa, _, qs = self._precond_factors(n, an.device, at.dtype)
            rot = torch.bmm(gt.transpose(1, 2), at).mul_(inv)
            out[n] = (qs @ rot @ qa.T).to(torch.promote_types(an.dtype, g[n].dtype))
        return out

    # ------------------------------------------------------------------ merge, save, load
    def stats(self, which: str = "all") -> Dict[str, torch.Tensor]:
        """Flat ``{key: tensor}`` of sums and counts (the tensors themselves, on the device they
        were accumulated on); sum-reduce each entry across ranks, then :meth:`load_stats`.

        Args:
            which: ``"covariance"`` (A, S sums and counts: reduce before compute_eigen),
                ``"eigenvalues"`` (EK-FAC sums: reduce after update_eigenvalues) or ``"all"``.
        """
        prefixes = {
            "covariance": ("A_", "S_"),
            "eigenvalues": ("lambda_",),
            "all": ("A_", "S_", "lambda_"),
        }
        if which not in prefixes:
            raise ValueError(f"which must be one of {list(prefixes)}, got {which!r}.")
        return {k: v for k, v in self._sums.items() if k.startswith(prefixes[which])}

    def load_stats(self, stats: Dict[str, torch.Tensor]) -> None:
        """Replace sums and counts by ``stats`` (e.g. all-reduced :meth:`stats`). Loading
        covariance sums makes the eigendecomposition stale (call :meth:`compute_eigen`); loaded
        EK-FAC sums are taken to be in the basis of the (current or next) eigendecomposition."""
        unknown = [k for k in stats if k not in self._sums]
        if unknown:
            raise ValueError(
                f"Unknown K-FAC statistics {unknown[:5]}; expected keys like {list(self._sums)[:4]}"
                " (same layers and ekfac setting as the KFAC that produced them)."
            )
        cov = False
        lam = False
        for k, v in stats.items():
            if tuple(v.shape) != tuple(self._sums[k].shape):
                raise ValueError(
                    f"Statistic {k!r} has shape {tuple(v.shape)}, expected "
                    f"{tuple(self._sums[k].shape)}."
                )
            self._sums[k] = v.detach().to(self._sums[k].dtype).clone()
            cov |= k.startswith(("A_", "S_"))
            lam |= k.startswith("lambda_")
        if cov:
            self._cov_version += 1
        if lam:
            # taken as computed in the eigenbasis of the current covariance sums
            self._lambda_version = self._cov_version
        self._invalidate()

    def state_dict(self) -> Dict[str, Any]:
        """Sums, counts and eigen results as CPU tensors, plus the flags needed to resume."""
        eig_ok = self._eigen_version is not None and self._eigen_version == self._cov_version
        return {
            "ekfac": self.ekfac,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "stats": {k: v.detach().cpu().clone() for k, v in self._sums.items()},
            "eigen": {n: {k: v.clone() for k, v in e.items()} for n, e in self.eigen.items()}
            if eig_ok
            else {},
            "lambda_ready": bool(self.ekfac and eig_ok and self._lambda_ready()),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same layers); missing entries are tolerated."""
        if "ekfac" in state and bool(state["ekfac"]) != self.ekfac:
            raise ValueError(
                f"State was saved with ekfac={state['ekfac']}, this KFAC has ekfac={self.ekfac}."
            )
        self.damping = state.get("damping", self.damping)
        self.damping_factor = float(state.get("damping_factor", self.damping_factor))
        stats = state.get("stats", {})
        self.load_stats(stats)
        eigen = state.get("eigen", {})
        if eigen:
            self._check_names(eigen, "load_state_dict")
            self.eigen = {n: {k: v.to(_F64).cpu() for k, v in e.items()} for n, e in eigen.items()}
            self._eigen_version = self._cov_version
        else:
            self.eigen = {}
            self._eigen_version = None
        if "lambda_ready" in state:
            self._lambda_version = self._cov_version if state["lambda_ready"] else None
        # else (stats only): the EK-FAC sums belong to the basis of the loaded covariances
        self._invalidate()


# ---------------------------------------------------------------------- single-process driver
def fit_kfac(
    model: nn.Module,
    modules: Dict[str, nn.Module],
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]],
    batches: Iterable[Any],
    ekfac: bool = True,
    damping: Optional[float] = None,
    fisher: str = "true",
    output_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    max_examples: Optional[int] = None,
    seed: int = 0,
    progress: Optional[Callable[[Iterable[Any]], Iterable[Any]]] = None,
    mask_fn: Optional[Callable[[Any], Optional[torch.Tensor]]] = None,
    reduce: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
) -> KFAC:
    """Fit K-FAC / EK-FAC factors in one process: covariance pass, eigendecomposition, and (EK-FAC)
    an eigenvalue-correction pass over the same ``batches``.

    Args:
        model: the model (put in eval mode during the passes, each module's mode restored after;
            its weights get no ``.grad``).
        modules: ``{name: nn.Linear | nn.Conv2d (groups=1)}``, submodules of ``model``.
        loss_fn: ``(model, batch) -> (B,)`` per-sample loss with the data labels; used by
            ``fisher="empirical"`` (may be None with ``fisher="true"``).
        batches: re-iterable batches (a DataLoader or a list; iterated twice for EK-FAC).
        ekfac: EK-FAC (eigenvalue correction) if True, K-FAC otherwise.
        damping: λ; None = 0.1 * mean eigenvalue per layer.
        fisher: ``"true"``: labels sampled from the model's predictive distribution
            (``y ~ Categorical(softmax(output_fn(model, batch)))``, cross-entropy), as Kronfluence's
            default; ``"empirical"``: ``loss_fn`` with the data labels.
        output_fn: ``(model, batch) -> logits`` (B, C), or (B, T, C) for token models (per-sample
            loss = sum over tokens, masked by ``mask_fn``); required for ``fisher="true"``.
        max_examples: use at most this many samples per pass (the last batch is truncated).
        seed: seed of the ``torch.Generator`` that samples the labels.
        progress: optional wrapper of an iterable for progress bars (e.g. ``tqdm``).
        mask_fn: optional ``batch -> (B, T)`` padding mask (1 = real token) for sequence models.
        reduce: DDP: ``stats -> summed stats`` over ranks (e.g. an all-reduce of each tensor),
            applied once to the covariance sums and once to the eigenvalue-correction sums, so
            each rank may pass over its own shard of ``batches``.

    Returns:
        A :class:`KFAC` ready for :meth:`KFAC.precondition`.
    """
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}.")
    if fisher == "true" and output_fn is None:
        raise ValueError(
            "fisher='true' samples labels from the model's predictions and needs "
            "output_fn=(model, batch) -> logits of shape (B, C) (e.g. "
            "`output_fn=lambda m, b: m(b[0])`); or use fisher='empirical' with loss_fn."
        )
    if fisher == "empirical" and loss_fn is None:
        raise ValueError(
            "fisher='empirical' needs loss_fn=(model, batch) -> per-sample loss (B,), e.g. "
            "F.cross_entropy(model(x), y, reduction='none')."
        )
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples must be None or > 0, got {max_examples}.")
    if ekfac and isinstance(batches, Iterator):
        raise ValueError(
            "EK-FAC iterates over `batches` twice; pass a re-iterable (a DataLoader or a list), "
            "not a one-shot iterator or generator."
        )
    check_kfac_modules(modules)
    kfac = KFAC(modules, ekfac=ekfac, damping=damping)
    gen = torch.Generator().manual_seed(int(seed))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    run = dict(
        model=model, modules=modules, fisher=fisher, loss_fn=loss_fn, output_fn=output_fn,
        gen=gen, mask_fn=mask_fn,
    )  # fmt: skip
    try:
        with LinearGradCapture(modules) as capture:
            for a, g, mask in _passes(capture, batches, max_examples, progress, run):
                kfac.update_covariances(a, g, mask=mask)
            if reduce is not None:
                kfac.load_stats(reduce(kfac.stats("covariance")))
            kfac.compute_eigen()
            if ekfac:
                for a, g, _ in _passes(capture, batches, max_examples, progress, run):
                    kfac.update_eigenvalues_from_io(a, g)
                if reduce is not None:
                    kfac.load_stats(reduce(kfac.stats("eigenvalues")))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return kfac


def _passes(
    capture: LinearGradCapture,
    batches: Iterable[Any],
    max_examples: Optional[int],
    progress: Optional[Callable[[Iterable[Any]], Iterable[Any]]],
    run: Dict[str, Any],
) -> Iterator[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Optional[torch.Tensor]]]:
    """One pass over ``batches``: (a, g, mask) per batch, at most ``max_examples`` samples."""
    seen = 0
    for batch in progress(batches) if progress is not None else batches:
        keep = None if max_examples is None else max_examples - seen
        a, g, mask, n = _pass(capture, batch, keep, **run)
        yield a, g, mask
        seen += n
        if max_examples is not None and seen >= max_examples:
            return


def _pass(
    capture: LinearGradCapture,
    batch: Any,
    keep: Optional[int],
    model: nn.Module,
    modules: Dict[str, nn.Module],
    fisher: str,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]],
    output_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]],
    gen: torch.Generator,
    mask_fn: Optional[Callable[[Any], Optional[torch.Tensor]]],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Optional[torch.Tensor], int]:
    """One forward/backward to the layer outputs: ({name: a}, {name: g}, mask, n) for the first
    ``keep`` samples (all if None); n = samples used."""
    mask = mask_fn(batch) if mask_fn is not None else None
    capture.active = True
    try:
        with torch.enable_grad():
            if fisher == "true":
                assert output_fn is not None
                logits = output_fn(model, batch)
                loss = _sampled_loss(logits, gen, mask)
            else:
                assert loss_fn is not None
                loss = loss_fn(model, batch)
            if loss.dim() != 1:
                raise ValueError(
                    f"The loss has shape {tuple(loss.shape)}; K-FAC needs one loss per sample "
                    "(B,): use reduction='none' (sum token losses per sample for sequences)."
                )
            if keep is not None and keep < loss.shape[0]:
                loss = loss[:keep]
            missing = [n for n in modules if n not in capture.outputs]
            if missing:
                raise RuntimeError(
                    f"The forward pass did not reach layers {missing} with gradients enabled "
                    "(frozen weights and inputs, or not called by the model)."
                )
            outs = [capture.outputs[n] for n in modules]
            grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True)
        a, g = {}, {}
        for (n, mod), out, gr in zip(modules.items(), outs, grads):
            gr = torch.zeros_like(out) if gr is None else gr
            a_n, g_n = capture.inputs[n], layer_output_grad_rows(mod, gr.detach())
            if keep is not None:
                a_n, g_n = a_n[:keep], g_n[:keep]
            a[n], g[n] = a_n, g_n
        if mask is not None and keep is not None:
            mask = mask[:keep]
        return a, g, mask, int(loss.shape[0])
    finally:
        capture.active = False
        capture.clear()


def _sampled_loss(
    logits: torch.Tensor, gen: torch.Generator, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Cross-entropy with labels sampled from softmax(logits): (B, C) or (B, T, C) -> (B,)."""
    if logits.dim() < 2:
        raise ValueError(
            f"output_fn must return logits (B, C) or (B, T, C), got shape {tuple(logits.shape)}."
        )
    c = logits.shape[-1]
    flat = logits.reshape(-1, c)
    with torch.no_grad():
        probs = torch.softmax(flat.detach().to(_F64), dim=-1).cpu()
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)
    loss = F.cross_entropy(flat, y, reduction="none").reshape(logits.shape[:-1])
    if loss.dim() == 1:
        return loss
    if mask is not None and tuple(mask.shape) == tuple(loss.shape):
        loss = loss * mask.to(loss.dtype)
    return loss.reshape(loss.shape[0], -1).sum(dim=1)
