"""Group influence vs retraining without the group, the exact Newton step and brute-force
closed forms on an L2-regularised logistic regression (convex, unique optimum)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, vmap

from lightning_memo.influence.features import GradientFeaturizer
from lightning_memo.influence.group import check_groups, group_influence, groups_from_labels
from lightning_memo.influence.methods import ArnoldiInfluence, ExactInfluence, train_pass

DT = torch.float64
N, D, NQ, LAM = 60, 4, 6, 0.2
SIZES = (3, 3, 3, 3, 10, 10, 10, 20, 20, 20)


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_fn(model, batch):
    return F.binary_cross_entropy_with_logits(
        model(batch[0]).squeeze(-1), batch[1], reduction="none"
    )


def index_fn(batch):
    return batch[2]


def fit_lbfgs(model, x, y, keep, renormalize):
    """Minimise sum_i keep_i l_i / (n or sum keep) + (LAM/2) ||theta||^2 to convergence."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        data = (loss_fn(model, (x, y)) * keep).sum() / (keep.sum() if renormalize else x.shape[0])
        obj = data + LAM / 2 * sum((p**2).sum() for p in model.parameters())
        obj.backward()
        return obj

    opt.step(closure)
    return model


class Setup:
    def __init__(self, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N + NQ, D, generator=g, dtype=DT)
        w_true = 1.5 * torch.randn(D, generator=g, dtype=DT)
        y = (torch.rand(N + NQ, generator=g, dtype=DT) < torch.sigmoid(x @ w_true + 0.3)).to(DT)
        self.x, self.y, self.xq, self.yq = x[:N], y[:N], x[N:], y[N:]
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(D, 1)).to(DT)
        fit_lbfgs(self.model, self.x, self.y, torch.ones(N, dtype=DT), False)
        self.feats = GradientFeaturizer({"0": self.model[0]}, projection_dim=None)
        self.params = self.feats.params  # {"0.weight", "0.bias"}
        self.batches = [
            (self.x[i : i + 20], self.y[i : i + 20], torch.arange(i, i + 20))
            for i in range(0, N, 20)
        ]
        self.queries = [(self.xq[:4], self.yq[:4]), (self.xq[4:], self.yq[4:])]
        self.method = ExactInfluence(damping=LAM).fit(
            self.model, self.params, loss_fn, self.batches
        )
        gg = torch.Generator().manual_seed(seed + 7)
        self.groups = [torch.randperm(N, generator=gg)[:s].tolist() for s in SIZES]
        self.sizes = torch.tensor(SIZES)
        with torch.no_grad():
            self.lq0 = loss_fn(self.model, (self.xq, self.yq))
        self._actual = {}

    def grad_fn(self, batch):
        return self.feats.grad_dict(self.model, batch, loss_fn)

    def run(self, order=1, renormalize=False, method=None, groups=None, **kw):
        kw.setdefault("index_fn", index_fn)
        kw.setdefault("allow_overlap", True)
        if order == 2:
            kw.update(model=self.model, params=self.params, loss_fn=loss_fn)
        return group_influence(
            self.method if method is None else method,
            self.grad_fn,
            kw.pop("queries", self.queries),
            kw.pop("batches", self.batches),
            self.groups if groups is None else groups,
            order=order,
            renormalize=renormalize,
            **kw,
        )

    def actual(self, renormalize):
        """(n_groups, n_query): loss change after retraining without each group (warm start)."""
        if renormalize not in self._actual:
            rows = []
            for grp in self.groups:
                m2 = nn.Sequential(nn.Linear(D, 1)).to(DT)
                m2.load_state_dict(self.model.state_dict())
                keep = torch.ones(N, dtype=DT)
                keep[grp] = 0
                fit_lbfgs(m2, self.x, self.y, keep, renormalize)
                with torch.no_grad():
                    rows.append(loss_fn(m2, (self.xq, self.yq)) - self.lq0)
            self._actual[renormalize] = torch.stack(rows)
        return self._actual[renormalize]

    def brute(self):
        """theta*, per-sample gradients (N, P), Hessians (N, P, P) and query gradients."""
        th = torch.cat([self.model[0].weight.detach().reshape(-1), self.model[0].bias.detach()])

        def one(t, xi, yi):
            return F.binary_cross_entropy_with_logits(xi @ t[:D] + t[D], yi)

        gs = vmap(grad(one), in_dims=(None, 0, 0))(th, self.x, self.y)
        hs = vmap(hessian(one), in_dims=(None, 0, 0))(th, self.x, self.y)
        gq = vmap(grad(one), in_dims=(None, 0, 0))(th, self.xq, self.yq)
        hq = vmap(hessian(one), in_dims=(None, 0, 0))(th, self.xq, self.yq)
        return th, gs, hs, gq, hq


@pytest.fixture(scope="module")
def s():
    return Setup()


def rel_err(pred, actual, mask):
    return float((pred[mask] - actual[mask]).norm() / actual[mask].norm())


# ----------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("renormalize", [False, True])
def test_first_order_matches_retraining(s, renormalize):
    actual = s.actual(renormalize)
    pred = s.run(order=1, renormalize=renormalize)
    assert pred.shape == (len(SIZES), NQ) and pred.dtype == DT
    pearson = float(torch.corrcoef(torch.stack([pred.flatten(), actual.flatten()]))[0, 1])
    small = rel_err(pred, actual, s.sizes == 3)
    print(f"renormalize={renormalize}: Pearson {pearson:.4f}, size-3 relative error {small:.3f}")
    assert pearson > 0.9
    assert small < 0.10
    # the sign: removing a group changes each query's loss the way the prediction says
    big = actual.abs() > 0.2 * actual.abs().max()
    assert bool((torch.sign(pred[big]) == torch.sign(actual[big])).all())


@pytest.mark.parametrize("renormalize", [False, True])
def test_second_order_beats_first_order_for_large_groups(s, renormalize):
    actual = s.actual(renormalize)
    p1 = s.run(order=1, renormalize=renormalize)
    p2 = s.run(order=2, renormalize=renormalize)
    p2q = s.run(order=2, renormalize=renormalize, query_curvature=True)
    for size in (3, 10, 20):
        mask = s.sizes == size
        e1, e2, e2q = (rel_err(p, actual, mask) for p in (p1, p2, p2q))
        print(
            f"renormalize={renormalize} |U|={size}: relative error first order {e1:.3f}, "
            f"second order {e2:.3f}, with query curvature {e2q:.3f}"
        )
        assert e2 < e1
        assert e2q < e2
        if size == 20:
            assert e2 < 0.6 * e1


@pytest.mark.parametrize("renormalize", [False, True])
def test_closed_forms_and_newton_step(s, renormalize):
    """The implementation equals the formulas computed by brute force, and the second order is
    closer than the first to the linearised exact Newton step without the group."""
    th, gs, hs, gq, hq = s.brute()
    eye = torch.eye(D + 1, dtype=DT)
    h = hs.mean(0) + LAM * eye
    gbar = gs.mean(0)
    p1 = s.run(order=1, renormalize=renormalize)
    p2 = s.run(order=2, renormalize=renormalize)
    p2q = s.run(order=2, renormalize=renormalize, query_curvature=True)
    closer = 0
    for k, grp in enumerate(s.groups):
        m = len(grp)
        g_u, h_u = gs[grp].sum(0), hs[grp].sum(0)
        c1 = c2 = 1.0
        if renormalize:
            g_u, h_u = g_u - m * gbar, h_u + m * LAM * eye
            p = m / N
            c1, c2 = (1 - 2 * p) / (1 - p) ** 2, 1 / (1 - p) ** 2
        v = torch.linalg.solve(h, g_u)
        dtheta = c1 * v / N + c2 * torch.linalg.solve(h, h_u @ v) / N**2
        curv = 0.5 * torch.einsum("p,jpq,q->j", dtheta, hq, dtheta)
        torch.testing.assert_close(p1[k], gq @ v / N, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p2[k], gq @ dtheta, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p2q[k], gq @ dtheta + curv, rtol=1e-9, atol=1e-12)
        # exact Newton step on the objective without the group
        keep = torch.ones(N, dtype=DT)
        keep[grp] = 0
        denom = (N - m) if renormalize else N
        h_r = (hs * keep[:, None, None]).sum(0) / denom + LAM * eye
        g_r = (gs * keep[:, None]).sum(0) / denom + LAM * th
        newton = gq @ -torch.linalg.solve(h_r, g_r)
        closer += int((p2[k] - newton).norm() < (p1[k] - newton).norm())
    assert closer == len(s.groups)


# ----------------------------------------------------------------------------- plumbing
def test_first_order_is_sum_of_individual_scores_any_method(s):
    arn = ArnoldiInfluence(damping=LAM, arnoldi_dim=5, arnoldi_k=3).fit(
        s.model, s.params, loss_fn, s.batches
    )
    q = torch.cat([arn.query_rows(s.grad_fn(b)) for b in s.queries])
    scores = train_pass(arn, s.grad_fn, s.batches, N, index_fn, q, want_self=False)["scores"]
    want = torch.stack([scores[:, g].sum(1) / N for g in s.groups])
    torch.testing.assert_close(s.run(order=1, method=arn), want, rtol=1e-10, atol=1e-14)


def test_index_fn_order_duplicates_and_positions(s):
    want = s.run(order=2)
    # shuffled batches carrying indices, plus a repeated sample (DistributedSampler padding)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    x, y = s.x[perm], s.y[perm]
    shuffled = [(x[i : i + 16], y[i : i + 16], perm[i : i + 16]) for i in range(0, N, 16)]
    shuffled.append((s.x[:2], s.y[:2], torch.arange(2)))
    got = s.run(order=2, batches=shuffled, num_train=N)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # positional (no index_fn), small vectorisation chunks
    pos = [(b[0], b[1]) for b in s.batches]
    got = s.run(order=2, batches=pos, index_fn=None, hvp_chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_cg_solver_matches_direct(s):
    cg = ExactInfluence(damping=LAM, solver="cg", cg_tol=1e-13).fit(
        s.model, s.params, loss_fn, s.batches
    )
    for renorm in (False, True):
        want = s.run(order=2, renormalize=renorm)
        got = s.run(order=2, renormalize=renorm, method=cg)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_groups_from_labels_and_label_column(s):
    assert groups_from_labels(torch.tensor([2, 0, 2, 1, 0])) == [[1, 4], [3], [0, 2]]
    assert groups_from_labels(["b", "a", "b"]) == [[1], [0, 2]]
    with pytest.raises(ValueError, match="NaN"):
        groups_from_labels(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        groups_from_labels(torch.zeros(3, 2))
    labels = torch.arange(N) % 3
    got = s.run(order=1, groups=labels, allow_overlap=False)
    want = s.run(order=1, groups=groups_from_labels(labels))
    torch.testing.assert_close(got, want)
    assert got.shape == (3, NQ)


def test_overlap_allowed_equals_separate_groups(s):
    a, b = [0, 1, 2, 3], [3, 4, 5]
    both = s.run(order=2, groups=[a, b], num_train=N)
    alone = torch.cat([s.run(order=2, groups=[g]) for g in (a, b)])
    torch.testing.assert_close(both, alone, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- bad input
def test_bad_groups_messages(s):
    with pytest.raises(ValueError, match=r"group 1: sample index 60 is out of range \[0, 60\)"):
        check_groups([[0, 1], [59, 60]], num_train=N)
    with pytest.raises(ValueError, match=r"group 0: sample index -1 is out of range"):
        check_groups([[-1]])
    with pytest.raises(ValueError, match=r"groups 0 and 2 share sample indices \[5, 7\]"):
        check_groups([[5, 6, 7], [1], [7, 5, 9]])
    assert check_groups([[5, 6, 7], [7, 5, 9]], allow_overlap=True) == [[5, 6, 7], [7, 5, 9]]
    with pytest.raises(ValueError, match="group 1 is empty"):
        check_groups([[1], []])
    with pytest.raises(ValueError, match="groups is empty"):
        check_groups([])
    with pytest.raises(ValueError, match="group 0 lists sample index 2 more than once"):
        check_groups([[2, 3, 2]])
    with pytest.raises(ValueError, match="flat list of integers"):
        check_groups([1, 2, 3])
    with pytest.raises(ValueError, match="not an integer sample index"):
        check_groups([[1.5]])
    # through group_influence: overlap refused by default, range known only after the pass
    with pytest.raises(ValueError, match="groups 0 and 1 share"):
        s.run(groups=[[1, 2], [2, 3]], allow_overlap=False)
    with pytest.raises(ValueError, match=r"group 0: sample index 60 is out of range \[0, 60\)"):
        s.run(groups=[[60]], index_fn=None, batches=[(b[0], b[1]) for b in s.batches])
    with pytest.raises(ValueError, match="group 0: sample index 70 never appeared"):
        s.run(groups=[[1, 70]], num_train=80)


def test_bad_method_and_options(s):
    arn = ArnoldiInfluence(damping=LAM, arnoldi_dim=5, arnoldi_k=3).fit(
        s.model, s.params, loss_fn, s.batches
    )
    with pytest.raises(ValueError, match=r"order=2 needs .*ExactInfluence.*got method 'arnoldi'"):
        s.run(order=2, method=arn)
    with pytest.raises(ValueError, match=r"order=2 needs model, params, loss_fn"):
        group_influence(s.method, s.grad_fn, s.queries, s.batches, [[0]], order=2)
    with pytest.raises(ValueError, match="order=3"):
        s.run(order=3)
    with pytest.raises(ValueError, match="use it with order=2"):
        s.run(order=1, query_curvature=True)
    with pytest.raises(ValueError, match="holds all 60 training samples"):
        s.run(order=1, renormalize=True, groups=[list(range(N))])
    with pytest.raises(ValueError, match="renormalize=True needs the mean gradient"):
        s.run(order=1, renormalize=True, num_train=N + 1)
