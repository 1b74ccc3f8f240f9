"""Group influence: the predicted change of each query's loss when a whole group of training
samples is removed, to first order (sum of individual influences; Koh et al., NeurIPS 2019) and
to second order (Basu, You, Feizi, "On Second-Order Group Influence Functions for Black-Box
Predictions", ICML 2020). Math core, torch only.

Objective and sign. The model sits at the minimum theta* of the empirical risk

    R(theta) = (1/n) sum_{z in S} l(z; theta) + (lambda/2) ||theta||^2,

and H = (1/n) sum_z Hess l(z) + lambda I is the damped Hessian of an influence method fitted on
the n training samples with ``damping = lambda`` (the L2 term *is* the damping: fit the method
with the per-sample loss without the L2 term). Removing the group U (m = |U| samples, p = m/n)
gives the minimiser theta_{-U} of one of two objectives:

- ``renormalize=False`` (default): R_{-U}(theta) = (1/n) sum_{z not in U} l(z) + (lambda/2)
  ||theta||^2 (the removed samples' terms are dropped, the others keep their weight 1/n);
- ``renormalize=True``: R_{-U}(theta) = (1/(n-m)) sum_{z not in U} l(z) + (lambda/2)
  ||theta||^2 (the mean over the remaining samples, same lambda; Basu et al.'s setting).

The returned value is Delta l(q) = l(q; theta_{-U}) - l(q; theta*) to the requested order;
positive means that removing U raises q's loss, i.e. U is a *proponent* of q (the sign of
:mod:`lightning_memo.influence.methods`' scores).

First order (any method). Removing U moves theta by (1/n) H^{-1} sum_{z in U} g_z, so

    Delta l(q) ~ (1/n) g_q^T H^{-1} sum_{z in U} g_z = (1/n) sum_{z in U} score(q, z).

With ``renormalize=True`` every g_z is replaced by the gradient of l(z) + (lambda/2)||theta||^2,
g_z + lambda theta* = g_z - g_bar (g_bar: the mean training gradient; the two are equal at the
minimum of R), since the L2 term no longer shrinks with the removed samples.

Second order (Hessian methods only). Expanding the minimiser to second order in the removed
weight (third derivatives of the loss neglected, as in Basu et al.) adds Basu et al.'s pairwise
interaction term sum_{z, z' in U} H^{-1} Hess l(z) H^{-1} g_z':

    Delta theta ~ c1/n H^{-1} G_U + c2/n^2 H^{-1} H_U H^{-1} G_U,
    G_U = sum_{z in U} g_z,  H_U = sum_{z in U} Hess l(z),  Delta l(q) ~ g_q^T Delta theta,

with c1 = c2 = 1 for ``renormalize=False`` (the first two terms of the Neumann series of the
Newton step (H - H_U/n)^{-1} G_U/n), and Basu et al.'s coefficients c1 = (1-2p)/(1-p)^2,
c2 = 1/(1-p)^2 for ``renormalize=True`` (there g_z -> g_z - g_bar and H_U -> H_U + m lambda I;
they agree with the Taylor expansion through second order and sum the whole Neumann series when
H_U/n = p H). The query's own curvature (1/2) Delta theta^T Hess l(q) Delta theta is left out,
as in the paper, unless ``query_curvature=True`` (then Delta theta is solved for and the term
added: the complete second-order expansion of Delta l(q) up to third derivatives).

Efficiency: one pass over the training data accumulates the per-group sums of the method's
train rows, ``(n_groups, k)``: scores are bilinear, <query_rows(g_q), train_rows(g_z)>, so the
sum of a group's individual scores is the inner product with the group's summed rows, for every
method (exact, CG, Arnoldi, K-FAC, projected gradients), and nothing of size ``(n_query, N)`` is
formed. Order 2 adds one Hessian solve per group and a second pass with one Hessian-vector product
per group and batch (``torch.func``, vectorised over the groups present in the batch).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .grads import _LossModule
from .hessian import (
    _check_losses,
    _flatten_cols,
    _prefixed,
    _to_device,
    _unflatten_cols,
)
from .methods.base import GradFn, IndexFn, InfluenceMethod, LossFn, entry
from .methods.exact import ExactInfluence

__all__ = ["groups_from_labels", "check_groups", "group_influence"]

GroupsLike = Union[Sequence[Sequence[int]], torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------- groups
def groups_from_labels(labels: Union[torch.Tensor, np.ndarray, Sequence[Any]]) -> List[List[int]]:
    """One group per distinct value of a label / metadata column.

    Args:
        labels: (N,) one value per training sample (integers, floats or strings), sample i's at
            position i.

    Returns:
        ``groups[k]``: the indices (ascending) of the samples whose label is the k-th smallest
        distinct value (``sorted(set(labels))`` order).

    Raises:
        ValueError: labels not one-dimensional, empty, or with NaN.
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(
            f"groups_from_labels needs one label per sample, shape (N,); got shape {arr.shape}."
        )
    if arr.shape[0] == 0:
        raise ValueError("groups_from_labels got no labels (N = 0).")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        bad = np.flatnonzero(np.isnan(arr))
        raise ValueError(
            f"labels has {bad.size} NaN values (first at index {int(bad[0])}); NaN is not a group. "
            "Fill them with a value of their own or drop those samples."
        )
    values, inverse = np.unique(arr, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(values)))[:-1]
    return [chunk.tolist() for chunk in np.split(order, bounds)]


def _as_groups(groups: GroupsLike) -> List[List[int]]:
    if isinstance(groups, (torch.Tensor, np.ndarray)):
        if groups.ndim == 1:
            return groups_from_labels(groups)
        raise ValueError(
            f"groups as an array must be a (N,) label column; got shape {tuple(groups.shape)}. "
            "Pass a list of index lists for explicit groups."
        )
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise ValueError(
            f"groups must be a list of index lists or a (N,) label tensor; got {type(groups)}."
        )
    groups = list(groups)
    if groups and all(isinstance(g, (int, np.integer)) for g in groups):
        raise ValueError(
            "groups is a flat list of integers: for one group pass [[i, j, ...]]; for a label "
            "column pass a tensor (torch.tensor(labels)) or groups_from_labels(labels)."
        )
    out = []
    for k, g in enumerate(groups):
        if isinstance(g, torch.Tensor):
            g = g.reshape(-1).tolist()
        elif isinstance(g, np.ndarray):
            g = g.reshape(-1).tolist()
        elif isinstance(g, (int, np.integer)) or not isinstance(g, Iterable):
            raise ValueError(f"group {k} is {g!r}, not a list of sample indices.")
        idx = []
        for i in g:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise ValueError(f"group {k} holds {i!r}, which is not an integer sample index.")
            idx.append(int(i))
        out.append(idx)
    return out


def check_groups(
    groups: GroupsLike, num_train: Optional[int] = None, allow_overlap: bool = False
) -> List[List[int]]:
    """Normalise and validate groups.

    Args:
        groups: a list of index lists, or a (N,) label column (see :func:`groups_from_labels`).
        num_train: N; indices must lie in ``[0, N)`` (``None``: only negatives are refused here).
        allow_overlap: allow a sample in several groups.

    Returns:
        The groups as lists of ints.

    Raises:
        ValueError: no groups, an empty group, a repeated index inside a group, an index out of
            range, or (without ``allow_overlap``) groups sharing samples. The message names the
            groups and indices.
    """
    out = _as_groups(groups)
    if not out:
        raise ValueError("groups is empty: pass at least one group of sample indices.")
    for k, g in enumerate(out):
        if not g:
            raise ValueError(
                f"group {k} is empty: every group needs at least one sample index (drop it)."
            )
        hi = num_train if num_train is not None else None
        for i in g:
            if i < 0 or (hi is not None and i >= hi):
                rng = f"[0, {hi})" if hi is not None else "[0, N)"
                raise ValueError(
                    f"group {k}: sample index {i} is out of range {rng}"
                    + (f" (num_train={hi})" if hi is not None else "")
                    + ". Indices are positions in the training set (the ones index_fn returns)."
                )
        if len(set(g)) != len(g):
            seen, dup = set(), None
            for i in g:
                if i in seen:
                    dup = i
                    break
                seen.add(i)
            raise ValueError(
                f"group {k} lists sample index {dup} more than once; list each sample once."
            )
    if not allow_overlap:
        owner: Dict[int, int] = {}
        for k, g in enumerate(out):
            for i in g:
                j = owner.setdefault(i, k)
                if j != k:
                    shared = sorted(set(out[j]) & set(g))
                    more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
                    raise ValueError(
                        f"groups {j} and {k} share sample indices {shared[:5]}{more}. Make the "
                        "groups disjoint, or pass allow_overlap=True to score overlapping groups "
                        "(each group is then removed on its own)."
                    )
    return out


class _Membership:
    """Sample index -> the groups holding it (CSR by sample index)."""

    def __init__(self, groups: List[List[int]]) -> None:
        gid = torch.cat([torch.full((len(g),), k, dtype=torch.long) for k, g in enumerate(groups)])
        sid = torch.cat([torch.tensor(g, dtype=torch.long) for g in groups])
        self.size = int(sid.max()) + 1
        order = torch.argsort(sid, stable=True)
        self.gid = gid[order]
        counts = torch.bincount(sid, minlength=self.size)
        self.counts = counts
        self.ptr = torch.cumsum(counts, 0) - counts  # start of each sample's run
        self.sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)

    def pairs(self, idx: torch.Tensor, keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(positions in the batch, group ids) of every (kept sample, group holding it) pair."""
        pos = torch.nonzero(keep & (idx < self.size)).reshape(-1)
        if pos.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        s = idx[pos]
        c = self.counts[s]
        total = int(c.sum())
        rep_pos = torch.repeat_interleave(pos, c)
        starts = torch.repeat_interleave(self.ptr[s], c)
        within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
        return rep_pos, self.gid[starts + within]


class _Tracker:
    """Sample indices of the batches (``index_fn`` or running position) and which were seen; a
    sample met again (e.g. DistributedSampler padding) is kept only the first time."""

    def __init__(self, index_fn: Optional[IndexFn]) -> None:
        self.index_fn = index_fn
        self.pos = 0
        self.seen = torch.zeros(0, dtype=torch.bool)

    def __call__(self, batch: Any, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.index_fn is not None:
            idx = torch.as_tensor(self.index_fn(batch)).reshape(-1).to("cpu", torch.long)
            if idx.shape[0] != b:
                raise ValueError(
                    f"index_fn returned {idx.shape[0]} indices for a batch of {b} samples."
                )
            if b and int(idx.min()) < 0:
                raise ValueError(f"index_fn returned a negative sample index {int(idx.min())}.")
        else:
            idx = torch.arange(self.pos, self.pos + b)
        self.pos += b
        if b == 0:
            return idx, torch.zeros(0, dtype=torch.bool)
        hi = int(idx.max()) + 1
        if hi > self.seen.shape[0]:
            self.seen = torch.cat([self.seen, torch.zeros(hi - self.seen.shape[0], dtype=bool)])
        uniq, inv = torch.unique(idx, return_inverse=True)
        first = torch.full((uniq.shape[0],), b, dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(b), reduce="amin")
        keep = torch.zeros(b, dtype=torch.bool)
        keep[first] = True
        keep &= ~self.seen[idx]
        self.seen[idx[keep]] = True
        return idx, keep

    @property
    def count(self) -> int:
        return int(self.seen.sum())


# ----------------------------------------------------------------------------- main
def _wrap(batches: Iterable[Any], progress: Optional[Callable]) -> Iterable[Any]:
    return progress(batches) if progress is not None else batches


def _ordered(grads: Any, params: Optional[Dict[str, torch.Tensor]]) -> Any:
    if params is None or not isinstance(grads, Mapping):  # dicts and lazy FactoredGrads
        return grads
    if set(grads) != set(params):
        raise ValueError(
            f"grad_fn returns gradients of {sorted(grads)} but params holds {sorted(params)}: "
            "the second-order term needs the gradients and the Hessian of the same parameters."
        )
    return {k: grads[k] for k in params}


def _check_order2(
    method: InfluenceMethod,
    model: Optional[nn.Module],
    params: Optional[Dict[str, torch.Tensor]],
    loss_fn: Optional[LossFn],
) -> None:
    if not isinstance(method, ExactInfluence) or method.curvature != "hessian":
        what = method.name if not isinstance(method, ExactInfluence) else "exact (curvature='ggn')"
        raise ValueError(
            f"order=2 needs Hessian-inverse products of the loss Hessian itself: "
            f"ExactInfluence(curvature='hessian') with solver='direct' or 'cg' (method 'exact' or "
            f"'cg'); got method {what!r}. Use order=1 with this method, or fit an exact/CG "
            "method on the chosen parameters for the second-order term."
        )
    missing = [
        n for n, v in (("model", model), ("params", params), ("loss_fn", loss_fn)) if v is None
    ]
    if missing:
        raise ValueError(
            f"order=2 needs {', '.join(missing)} (the per-sample Hessian-vector products of the "
            "group's samples): pass model=, params= (the dict the method was fitted with) and "
            "loss_fn= (per-sample losses (B,), without the L2 term)."
        )
    method.check_model(params)


class _WeightedHVP:
    """``hvp(batch, w, t)``: sum_i w[c, i] Hess l(z_i) t[c] for each row c (``torch.func``
    forward-over-reverse, vectorised over c); ``w: (c, B)``, ``t: (c, P)`` -> (c, P) float64."""

    def __init__(self, model: nn.Module, params: Dict[str, torch.Tensor], loss_fn: LossFn) -> None:
        from torch.func import functional_call, grad, jvp, vmap

        self.like = {k: v.detach() for k, v in params.items()}
        self.device = next(iter(self.like.values())).device
        wrapper = _LossModule(model, loss_fn)

        def weighted(p: Dict[str, torch.Tensor], batch: Any, w: torch.Tensor) -> torch.Tensor:
            loss = _check_losses(functional_call(wrapper, _prefixed(p), (batch,)))
            return (w.to(loss.dtype) * loss).sum()

        grad_w = grad(weighted)

        def one(t: Dict[str, torch.Tensor], w: torch.Tensor, batch: Any) -> Dict[str, torch.Tensor]:
            return jvp(lambda p: grad_w(p, batch, w), (self.like,), (t,))[1]

        self.many = vmap(one, in_dims=(0, 0, None))
        self.model, self.loss_fn = model, loss_fn

    def batch_size(self, batch: Any) -> int:
        with torch.no_grad():
            return _check_losses(self.loss_fn(self.model, batch)).shape[0]

    def __call__(self, batch: Any, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tangents = {
            k: x.to(device=self.device, dtype=self.like[k].dtype)
            for k, x in _unflatten_cols(t.T, self.like).items()
        }
        with torch.no_grad():
            hv = self.many(tangents, w.to(self.device), batch)
        return _flatten_cols(hv).T.to(device=t.device, dtype=torch.float64)


def _group_hvp_pass(
    hvp: _WeightedHVP,
    train_batches: Iterable[Any],
    members: _Membership,
    index_fn: Optional[IndexFn],
    vecs: torch.Tensor,
    chunk: int,
    progress: Optional[Callable],
) -> torch.Tensor:
    """``out[k] = sum_{z in U_k} Hess l(z) vecs[k]``: (n_groups, P) float64, one pass."""
    out = torch.zeros(vecs.shape, dtype=torch.float64, device=vecs.device)
    tracker = _Tracker(index_fn)
    for batch in _wrap(train_batches, progress):
        batch = _to_device(batch, hvp.device)
        b = hvp.batch_size(batch)
        idx, keep = tracker(batch, b)
        pos, gid = members.pairs(idx, keep)
        if gid.numel() == 0:
            continue
        present, row = torch.unique(gid, return_inverse=True)
        weights = torch.zeros(present.shape[0], b, dtype=torch.float64)
        weights[row, pos] = 1.0
        for s in range(0, present.shape[0], chunk):
            ks = present[s : s + chunk]
            out[ks] += hvp(batch, weights[s : s + chunk], vecs[ks])
    return out


def _query_curvature(
    hvp: _WeightedHVP, batch: Any, b: int, dtheta: torch.Tensor, chunk: int
) -> torch.Tensor:
    """(n_groups, b): (1/2) dtheta_k^T Hess l(q_j) dtheta_k for each query j of the batch."""
    n_groups = dtheta.shape[0]
    out = torch.zeros(n_groups * b, dtype=torch.float64, device=dtheta.device)
    pairs = torch.arange(n_groups * b)  # pair = k * b + j
    for s in range(0, pairs.shape[0], chunk):
        pr = pairs[s : s + chunk]
        k, j = pr // b, pr % b
        w = torch.zeros(pr.shape[0], b, dtype=torch.float64)
        w[torch.arange(pr.shape[0]), j] = 1.0
        t = dtheta[k.to(dtheta.device)]
        out[pr.to(out.device)] = 0.5 * (hvp(batch, w, t) * t).sum(dim=1)
    return out.reshape(n_groups, b)


def group_influence(
    method: InfluenceMethod,
    grad_fn: GradFn,
    query_batches: Iterable[Any],
    train_batches: Iterable[Any],
    groups: GroupsLike,
    index_fn: Optional[IndexFn] = None,
    num_train: Optional[int] = None,
    order: int = 1,
    *,
    model: Optional[nn.Module] = None,
    params: Optional[Dict[str, torch.Tensor]] = None,
    loss_fn: Optional[LossFn] = None,
    renormalize: bool = False,
    query_curvature: bool = False,
    allow_overlap: bool = False,
    hvp_chunk: int = 32,
    progress: Optional[Callable] = None,
) -> torch.Tensor:
    """Predicted change of each query's loss when each group is removed (see the module text
    for the objective, the formulas and the sign).

    Args:
        method: a fitted influence method (any, for ``order=1``; ``ExactInfluence`` with
            ``curvature="hessian"``, solver ``"direct"`` or ``"cg"``, for ``order=2``). Its
            ``damping`` is the lambda of the L2 term (lambda/2) ||theta||^2 of the objective; fit
            it on all training samples with the per-sample loss without the L2 term.
        grad_fn: ``batch -> {param: (B, *shape)}`` per-sample gradients (e.g.
            ``lambda b: featurizer.grad_dict(model, b, loss_fn)``), or the batch itself for
            methods without gradients.
        query_batches: batches of query samples (iterated once).
        train_batches: the training batches (all n samples, each once; order 2 passes twice, so
            a list or a DataLoader, not a generator).
        groups: list of index lists, or a (N,) label column (one group per distinct value).
        index_fn: ``batch -> (B,)`` sample indices; ``None``: position in ``train_batches``.
        num_train: n, the training-set size of the objective; ``None``: the number of distinct
            samples in ``train_batches``.
        order: 1 (sum of individual influences) or 2 (Basu et al., with the pairwise term).
        model, params, loss_fn: for ``order=2``: the model (in eval mode: no dropout, frozen
            batch-norm statistics), the ``{name: tensor}`` the method was fitted with (checked by
            checksum), and ``loss_fn(model, batch) -> (B,)`` per-sample losses (no L2 term).
            Order 2 holds three (n_groups, P) float64 matrices (P: the parameter count).
        renormalize: remove U from the *mean* (objective divided by n - m, Basu et al.) instead
            of dropping its 1/n terms; assumes the model is at the minimum of the mean loss plus
            (damping/2) ||theta||^2, and needs every training sample in ``train_batches``.
        query_curvature: (order 2) add the query's own curvature (1/2) Delta theta^T Hess l(q)
            Delta theta, which Basu et al. leave out; it is of the same order as the pairwise term
            (often the larger part of what remains) and costs n_query x n_groups extra
            Hessian-vector products over the query batches.
        allow_overlap: allow a sample in several groups (each group removed on its own).
        hvp_chunk: Hessian-vector products per vectorised call (order 2).
        progress: optional wrapper for the passes (e.g. ``tqdm``).

    Returns:
        (n_groups, n_query) float64: Delta l(q) = l(q; theta_{-U}) - l(q; theta*), positive when
        removing the group raises the query's loss (the group is a proponent).

    Raises:
        ValueError: bad groups (empty, out of range, overlapping, index missing from
            ``train_batches``), an order other than 1 or 2, order 2 without an exact Hessian
            method or without model/params/loss_fn, ``renormalize`` with a group of all samples.
    """
    if order not in (1, 2):
        raise ValueError(f"order={order!r}: use 1 (first order) or 2 (Basu et al.'s second order).")
    if num_train is not None and (int(num_train) != num_train or num_train < 1):
        raise ValueError(f"num_train={num_train!r}: use a positive integer (the training size).")
    groups = check_groups(groups, num_train, allow_overlap)
    if query_curvature and order != 2:
        raise ValueError("query_curvature=True adds a second-order term: use it with order=2.")
    if order == 2:
        _check_order2(method, model, params, loss_fn)
    else:
        params = None
    if not method.has_scores:
        raise ValueError(
            f"method {method.name!r} has no pairwise scores; group influence needs them."
        )
    members = _Membership(groups)
    n_groups = len(groups)

    # pass 1: per-group sums of the train rows (and the total, for renormalize)
    sums: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None
    tracker = _Tracker(index_fn)
    for batch in _wrap(train_batches, progress):
        rows = entry(method, "train_rows")(_ordered(grad_fn(batch), params)).detach()
        rows = rows.to(torch.float64).reshape(rows.shape[0], -1)
        if sums is None:
            sums = rows.new_zeros(n_groups, rows.shape[1])
            total = rows.new_zeros(rows.shape[1])
        idx, keep = tracker(batch, rows.shape[0])
        total += rows[keep.to(rows.device)].sum(dim=0)
        pos, gid = members.pairs(idx, keep)
        if gid.numel():
            sums.index_add_(0, gid.to(rows.device), rows[pos.to(rows.device)])
    if sums is None:
        raise ValueError("train_batches is empty: group influence needs the training samples.")
    n_seen = tracker.count
    n = int(num_train) if num_train is not None else n_seen
    seen = tracker.seen
    for k, g in enumerate(groups):
        missing = [i for i in g if i >= seen.shape[0] or not bool(seen[i])]
        if missing:
            if num_train is None and index_fn is None:
                raise ValueError(
                    f"group {k}: sample index {missing[0]} is out of range [0, {n}) (train_batches "
                    f"holds {n} samples; pass index_fn= if the batches carry sample indices)."
                )
            raise ValueError(
                f"group {k}: sample index {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + " never appeared in train_batches; pass every training sample (and an index_fn "
                "returning the indices the groups use)."
            )
    m = members.sizes.to(sums.device)  # (n_groups,)
    if renormalize:
        if n_seen != n:
            raise ValueError(
                f"renormalize=True needs the mean gradient over all n={n} training samples, but "
                f"train_batches holds {n_seen}; pass every sample (or renormalize=False)."
            )
        full = torch.nonzero(m >= n).reshape(-1)
        if full.numel():
            raise ValueError(
                f"group {int(full[0])} holds all {n} training samples: removing it leaves an empty "
                "mean (renormalize=True). Use renormalize=False or a smaller group."
            )
        sums = sums - m[:, None] * (total / n)[None, :]

    if order == 1:
        q = _query_rows(method, grad_fn, query_batches, params, progress)
        return (sums @ q.to(device=sums.device, dtype=torch.float64).T / n).cpu()

    # order 2: v_k = H^{-1} G_k, w_k = H_{U_k} v_k (+ m lambda v_k), Delta l = g_q^T H^{-1}(...)
    hvp = _WeightedHVP(model, params, loss_fn)
    vecs = method.query_rows({"group_sums": sums}).to(torch.float64)
    w = _group_hvp_pass(hvp, train_batches, members, index_fn, vecs, hvp_chunk, progress)
    w = w.to(sums.device)
    if renormalize:
        p = m / n
        w = w + (m * float(method.damping))[:, None] * vecs
        c1 = (1 - 2 * p) / (1 - p) ** 2
        c2 = 1 / (1 - p) ** 2
    else:
        c1 = c2 = torch.ones_like(m)
    delta = c1[:, None] * sums / n + c2[:, None] * w / n**2  # H Delta theta, (n_groups, P)
    dtheta = method.query_rows({"delta": delta}).to(torch.float64) if query_curvature else None
    cols = []
    for batch in _wrap(query_batches, progress):
        q = method.query_rows(_ordered(grad_fn(batch), params)).detach()
        q = q.to(device=sums.device, dtype=torch.float64).reshape(q.shape[0], -1)
        col = delta @ q.T  # g_q^T Delta theta = (H^{-1} g_q)^T (H Delta theta)
        if dtheta is not None:
            dev_batch = _to_device(batch, hvp.device)
            col = col + _query_curvature(hvp, dev_batch, q.shape[0], dtheta, hvp_chunk).to(
                col.device
            )
        cols.append(col)
    if not cols:
        raise ValueError("query_batches is empty: pass at least one query sample.")
    return torch.cat(cols, dim=1).cpu()


def _query_rows(
    method: InfluenceMethod,
    grad_fn: GradFn,
    query_batches: Iterable[Any],
    params: Optional[Dict[str, torch.Tensor]] = None,
    progress: Optional[Callable] = None,
) -> torch.Tensor:
    """(n_query, k) preconditioned query rows (gradients reordered to ``params`` if given)."""
    rows_of = entry(method, "query_rows")
    rows = [rows_of(_ordered(grad_fn(b), params)).detach() for b in _wrap(query_batches, progress)]
    if not rows:
        raise ValueError("query_batches is empty: pass at least one query sample.")
    return torch.cat([r.reshape(r.shape[0], -1) for r in rows])
