"""K-FAC / EK-FAC vs oracles: brute-force covariances, the exact GGN/Fisher solve, Kronfluence."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memo.influence.grads import LinearGradCapture, linear_grads_from_io
from lightning_memo.influence.kfac import KFAC, check_kfac_modules, fit_kfac, with_bias_column
from tests import helpers
from tests.helpers import TinyCNN, ce_loss

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers
def logits_fn(model, batch):
    return model(batch[0])


def mlp(sizes=(5, 7, 3), seed=0):
    return helpers.mlp(sizes, seed)


def linear_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def data(n=24, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, c, (n,), generator=g)


def batches_of(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def loop_grads(model, modules, loss_fn, x, y):
    """Oracle per-sample gradients {name: (n, d_out, d_in+1)} from single-sample backward passes."""
    out = {k: [] for k in modules}
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        for k, m in modules.items():
            w = m.weight.grad.reshape(m.weight.shape[0], -1)
            b = m.bias.grad.unsqueeze(1) if m.bias is not None else w[:, :0]
            out[k].append(torch.cat([w, b], dim=1).clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def captured(model, modules, loss_fn, batch):
    """(a, g) per layer from one hooked backward pass of the summed per-sample losses."""
    with LinearGradCapture(modules) as cap:
        cap.active = True
        loss_fn(model, batch).sum().backward()
        a, g = dict(cap.inputs), dict(cap.grads)
    model.zero_grad()
    return a, g


def hook_grads(a, g, modules):
    return {
        n: with_bias_column(*linear_grads_from_io(a[n], g[n], m.bias is not None))
        for n, m in modules.items()
    }


def fitted(model, x, y, ekfac=True, damping=1e-3, size=8):
    modules = linear_modules(model)
    k = fit_kfac(
        model, modules, ce_loss, batches_of(x, y, size), ekfac=ekfac, damping=damping,
        fisher="empirical",
    )  # fmt: skip
    return k, modules


def explicit_patches(x, conv):
    """Brute-force conv patches (B, L, C_in*kh*kw) by slicing, in the weight's (c, i, j) order."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        conv.padding,
    )
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            patch = xp[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


# --------------------------------------------------------------------------- covariances
def test_covariance_sums_equal_brute_force_conv_and_linear():
    torch.manual_seed(0)
    model = TinyCNN(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), 5, 4, False).to(DT)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, 4, (6,), generator=g)
    modules = {"conv": model.conv, "fc": model.fc}
    k = KFAC(modules, ekfac=False)
    for sl in (slice(0, 4), slice(4, 6)):  # two batches accumulate
        a, gr = captured(model, modules, ce_loss, (x[sl], y[sl]))
        k.update_covariances(a, gr)
    # brute force: explicit patches + a constant 1, explicit output-gradients per position
    patches = explicit_patches(x, model.conv)  # (6, L, 18)
    rows_a = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DT)], 2).reshape(-1, 19)
    out = model.conv(x)
    feats = torch.relu(out).flatten(1)
    logits = model.fc(feats)
    loss = F.cross_entropy(logits, y, reduction="none")
    go, g_fc = torch.autograd.grad(loss.sum(), [out, logits])
    rows_g = go.permute(0, 2, 3, 1).reshape(-1, 3)  # one row per sample and output position
    feats = feats.detach()
    A, S = k.covariances()["conv"]
    torch.testing.assert_close(A, rows_a.T @ rows_a / rows_a.shape[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(S, rows_g.T @ rows_g / rows_g.shape[0], atol=1e-12, rtol=0)
    assert int(k.stats()["A_count/conv"]) == 6 * 4 and int(k.stats()["S_count/conv"]) == 24
    A, S = k.covariances()["fc"]  # no bias: no ones column
    torch.testing.assert_close(A, feats.T @ feats / 6, atol=1e-12, rtol=0)
    torch.testing.assert_close(S, g_fc.T @ g_fc / 6, atol=1e-12, rtol=0)


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def seq_data(n=5, t=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n, t), generator=g)
    lengths = torch.tensor([4, 2, 3, 1, 4])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return x, y, mask


def seq_loss(mask):
    def loss(model, batch):
        tok = F.cross_entropy(model(batch[0]).transpose(1, 2), batch[1], reduction="none")
        return (tok * mask[: len(tok)]).sum(1)

    return loss


def test_covariance_sums_sequence_with_mask_equal_brute_force():
    torch.manual_seed(0)
    model = SeqModel().to(DT)
    x, y, mask = seq_data()
    modules = {"inp": model.inp, "out": model.out}
    a, gr = captured(model, modules, seq_loss(mask), (x, y))
    k = KFAC(modules)
    k.update_covariances(a, gr, mask=mask)
    # brute force over the real tokens only
    h = torch.tanh(model.inp(x)).detach()
    for name, inputs in (("inp", x), ("out", h)):
        sa = torch.zeros(inputs.shape[-1] + 1, inputs.shape[-1] + 1, dtype=DT)
        d_out = modules[name].out_features
        sg = torch.zeros(d_out, d_out, dtype=DT)
        cnt = 0
        for b in range(5):
            for t in range(4):
                if mask[b, t]:
                    v = torch.cat([inputs[b, t], torch.ones(1, dtype=DT)])
                    sa += torch.outer(v, v)
                    sg += torch.outer(gr[name][b, t], gr[name][b, t])
                    cnt += 1
        A, S = k.covariances()[name]
        torch.testing.assert_close(A, sa / cnt, atol=1e-12, rtol=0)
        torch.testing.assert_close(S, sg / cnt, atol=1e-12, rtol=0)
        assert int(k.stats()[f"A_count/{name}"]) == int(mask.sum()) == cnt


# --------------------------------------------------------------------------- exact cases
def test_kfac_single_linear_one_output_equals_exact_ggn_solve():
    """K-FAC is exact for one Linear layer with a single output under the squared error.

    With L_n = 0.5 (w.a_n + b - y_n)^2 the output Hessian is the constant 1, so the GGN is
    E[ã ã^T] (ã = [a, 1]). The per-sample gradient is G_n = r_n ã_n^T (r_n the residual), so the
    empirical Fisher E[r^2 ã ã^T] equals the GGN whenever r_n^2 is constant: labels are set to
    y_n = f(a_n) ± 1. Then K-FAC's factors are A = E[ã ã^T] and S = E[r^2] = 1 (a scalar, d_out=1)
    and S ⊗ A = E[r^2 ã ã^T] exactly, so P(G) = (GGN + λI)^{-1} vec(G) (EK-FAC too: its
    eigenvalues E[(Q_A^T ã r)^2] = diag(Q_A^T A Q_A) = Λ_A).
    """
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(DT)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 4, generator=g, dtype=DT) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=DT)
    sign = torch.randint(0, 2, (40,), generator=g).to(DT) * 2 - 1
    with torch.no_grad():
        y = model(x).squeeze(1) + sign

    def mse(m, b):
        return 0.5 * (m(b[0]).squeeze(1) - b[1]) ** 2

    xt = torch.cat([x, torch.ones(40, 1, dtype=DT)], 1)
    ggn = xt.T @ xt / 40
    lam = 1e-3
    grads = {"lin": torch.randn(3, 1, 5, generator=g, dtype=DT)}
    want = torch.linalg.solve(ggn + lam * torch.eye(5, dtype=DT), grads["lin"].reshape(3, 5).T).T
    for ekfac in (False, True):
        k = fit_kfac(
            model, {"lin": model}, mse, batches_of(x, y, 16), ekfac=ekfac, damping=lam,
            fisher="empirical",
        )  # fmt: skip
        S = k.covariances()["lin"][1]
        torch.testing.assert_close(S, torch.ones(1, 1, dtype=DT), atol=1e-12, rtol=0)
        got = k.precondition(grads)["lin"].reshape(3, 5)
        torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


def test_kfac_precondition_equals_kronecker_solve_and_self_influence_consistent():
    """P(G) = (S ⊗ A + λI)^{-1} vec(G) (row-major vec) for K-FAC; <G, P(G)> = self_influence."""
    model = mlp()
    x, y = data()
    k, modules = fitted(model, x, y, ekfac=False, damping=1e-2)
    grads = loop_grads(model, modules, ce_loss, x[:5], y[:5])
    pre = k.precondition(grads)
    for n, gr in grads.items():
        A, S = k.covariances()[n]
        m = torch.kron(S, A) + 1e-2 * torch.eye(S.shape[0] * A.shape[0], dtype=DT)
        want = torch.linalg.solve(m, gr.reshape(5, -1).T).T.reshape(gr.shape)
        torch.testing.assert_close(pre[n], want, atol=1e-9, rtol=1e-9)
    si = k.self_influence(grads)
    torch.testing.assert_close(si, sum((pre[n] * grads[n]).sum((1, 2)) for n in grads))
    assert si.shape == (5,) and (si > 0).all()
    # float32 in, float32 out (close to the float64 result); P is symmetric
    p32 = k.precondition({n: g.float() for n, g in grads.items()})
    assert all(v.dtype == torch.float32 for v in p32.values())
    torch.testing.assert_close(p32["0"].double(), pre["0"], atol=1e-4, rtol=1e-4)
    assert k.self_influence({n: g.float() for n, g in grads.items()}).dtype == torch.float32
    g1 = {n: v[:1] for n, v in grads.items()}
    g2 = {n: v[1:2] for n, v in grads.items()}
    lhs = sum((k.precondition(g1)[n] * g2[n]).sum() for n in grads)
    rhs = sum((g1[n] * k.precondition(g2)[n]).sum() for n in grads)
    torch.testing.assert_close(lhs, rhs)


def test_ekfac_correction_equals_brute_force():
    model = mlp()
    x, y = data()
    k, modules = fitted(model, x, y, ekfac=True)
    grads = loop_grads(model, modules, ce_loss, x, y)
    for n, gr in grads.items():
        qa, qs = k.eigen[n]["Q_A"], k.eigen[n]["Q_S"]
        want = torch.stack([(qs.T @ gr[i] @ qa) ** 2 for i in range(len(gr))]).mean(0)
        torch.testing.assert_close(k.eigenvalues(n), want, atol=1e-12, rtol=1e-10)
    # the hooks' per-sample gradients are the oracle's
    a, g = captured(model, modules, ce_loss, (x, y))
    for n, v in hook_grads(a, g, modules).items():
        torch.testing.assert_close(v, grads[n], atol=1e-10, rtol=0)


def test_ekfac_closer_than_kfac_to_exact_fisher_influence():
    """Influence g_q^T (F + λI)^{-1} g_z with F the exact empirical Fisher (per layer block,
    the structure both approximate) from per-sample gradients: EK-FAC is at least as close."""
    model = mlp((6, 10, 4), seed=1)
    x, y = data(n=64, d=6, c=4, seed=2)
    modules = linear_modules(model)
    grads = loop_grads(model, modules, ce_loss, x, y)
    qg = {n: v[:8] for n, v in grads.items()}
    lam = 1e-3
    exact = 0
    for n, gr in grads.items():
        flat = gr.reshape(64, -1)
        fisher = flat.T @ flat / 64
        sol = torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0], dtype=DT), flat.T)
        exact = exact + qg[n].reshape(8, -1) @ sol
    errs = {}
    for ekfac in (False, True):
        k, _ = fitted(model, x, y, ekfac=ekfac, damping=lam, size=16)
        pq = k.precondition(qg)
        approx = sum(pq[n].reshape(8, -1) @ grads[n].reshape(64, -1).T for n in grads)
        errs[ekfac] = float((approx - exact).norm() / exact.norm())
    print(
        f"relative error vs exact Fisher influence: K-FAC {errs[False]:.4f}, "
        f"EK-FAC {errs[True]:.4f}"
    )
    assert errs[True] <= errs[False]


# --------------------------------------------------------------------------- merge, save, guards
def test_stats_merge_of_two_halves_equals_one_pass():
    model = mlp()
    x, y = data()
    modules = linear_modules(model)
    parts = [captured(model, modules, ce_loss, b) for b in batches_of(x, y, 6)]  # 4 batches
    full = KFAC(modules).to("cpu")
    for a, g in parts:
        # extra layers recorded by a shared capture are ignored
        full.update_covariances({**a, "other": a["0"]}, {**g, "other": g["0"]})
    halves = [KFAC(modules), KFAC(modules)]
    for i, (a, g) in enumerate(parts):
        halves[i // 2].update_covariances(a, g)
    merged = {
        k: halves[0].stats("covariance")[k] + halves[1].stats("covariance")[k]
        for k in halves[0].stats("covariance")
    }
    for h in halves:
        h.load_stats(merged)  # as after an all-reduce: every rank has the global sums
        h.compute_eigen()
    full.compute_eigen()
    for n in modules:
        for key in ("L_A", "L_S"):
            torch.testing.assert_close(
                halves[0].eigen[n][key], full.eigen[n][key], atol=1e-12, rtol=0
            )
    grads = [hook_grads(a, g, modules) for a, g in parts]
    for i, gr in enumerate(grads):
        full.update_eigenvalues(gr)
        halves[i // 2].update_eigenvalues(gr)
    lam = {
        k: halves[0].stats("eigenvalues")[k] + halves[1].stats("eigenvalues")[k]
        for k in halves[0].stats("eigenvalues")
    }
    for h in halves:
        h.load_stats(lam)
    for k_, v in full.stats().items():
        torch.testing.assert_close(halves[1].stats()[k_], v, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(halves[0].self_influence(grads[0]), full.self_influence(grads[0]))
    torch.testing.assert_close(
        halves[1].precondition(grads[1])["2"], full.precondition(grads[1])["2"]
    )


def test_state_dict_round_trip():
    model = mlp()
    x, y = data()
    k, modules = fitted(model, x, y, damping=None)
    buf = io.BytesIO()
    torch.save(k.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert all(t.device.type == "cpu" for t in state["stats"].values())
    k2 = KFAC(modules)
    k2.load_state_dict(state)
    grads = loop_grads(model, modules, ce_loss, x[:3], y[:3])
    torch.testing.assert_close(k2.self_influence(grads), k.self_influence(grads), atol=0, rtol=0)
    torch.testing.assert_close(
        k2.precondition(grads)["0"], k.precondition(grads)["0"], atol=0, rtol=0
    )
    # stats only: the eigendecomposition is recomputed, the EK-FAC sums are kept
    k3 = KFAC(modules)
    k3.load_state_dict({"stats": state["stats"]})
    with pytest.raises(RuntimeError, match="compute_eigen"):
        k3.precondition(grads)
    k3.compute_eigen()
    torch.testing.assert_close(k3.self_influence(grads), k.self_influence(grads))
    with pytest.raises(ValueError, match="ekfac=True"):
        KFAC(modules, ekfac=False).load_state_dict(state)


def test_phase_guards():
    model = mlp()
    x, y = data()
    modules = linear_modules(model)
    a, g = captured(model, modules, ce_loss, (x, y))
    grads = hook_grads(a, g, modules)
    k = KFAC(modules)
    with pytest.raises(RuntimeError, match=r"update_covariances\(\).*compute_eigen\(\)"):
        k.precondition(grads)
    with pytest.raises(RuntimeError, match="no covariance data"):
        k.compute_eigen()
    k.update_covariances(a, g)
    with pytest.raises(RuntimeError, match=r"compute_eigen\(\) first"):
        k.update_eigenvalues(grads)
    k.compute_eigen()
    with pytest.raises(RuntimeError, match=r"update_eigenvalues\(\)"):
        k.precondition(grads)
    with pytest.raises(RuntimeError, match=r"update_eigenvalues\(\)"):
        k.self_influence(grads)
    k.update_eigenvalues(grads)
    k.precondition(grads)
    k.update_covariances(a, g)  # more data: the basis is stale
    with pytest.raises(RuntimeError, match="changed after compute_eigen"):
        k.precondition(grads)
    k.compute_eigen()  # new basis: the old EK-FAC sums no longer apply
    with pytest.raises(RuntimeError, match=r"update_eigenvalues\(\)"):
        k.precondition(grads)
    k_plain = KFAC(modules, ekfac=False)
    k_plain.update_covariances(a, g)
    k_plain.compute_eigen()
    k_plain.precondition(grads)  # K-FAC needs no correction pass
    with pytest.raises(RuntimeError, match="ekfac=False"):
        k_plain.update_eigenvalues(grads)
    with pytest.raises(ValueError, match=r"expected per-sample gradients \(B, 7, 6\)"):
        k_plain.precondition({"0": grads["0"][:, :, :5]})
    with pytest.raises(ValueError, match="does not track"):
        k_plain.precondition({"nope": grads["0"]})


def test_unsupported_layers_are_refused():
    with pytest.raises(
        ValueError, match=r"nn\.Linear, nn\.Conv2d with groups=1.*'ln'.*method='arnoldi'"
    ):
        check_kfac_modules({"ln": nn.LayerNorm(3), "fc": nn.Linear(3, 3)})
    with pytest.raises(ValueError, match=r"groups=2.*method='exact'"):
        KFAC({"g": nn.Conv2d(4, 4, 3, groups=2)})
    with pytest.raises(ValueError, match="Conv1d"):
        fit_kfac(nn.Conv1d(1, 1, 1), {"c": nn.Conv1d(1, 1, 1)}, ce_loss, [], fisher="empirical")


def test_default_damping_is_tenth_of_mean_eigenvalue():
    model = mlp()
    x, y = data()
    for ekfac in (False, True):
        k, modules = fitted(model, x, y, ekfac=ekfac, damping=None)
        grads = loop_grads(model, modules, ce_loss, x[:4], y[:4])
        for n in modules:
            lam = k.eigenvalues(n)
            if not ekfac:
                torch.testing.assert_close(lam, torch.outer(k.eigen[n]["L_S"], k.eigen[n]["L_A"]))
            assert k.layer_damping(n) == pytest.approx(0.1 * float(lam.mean()), rel=1e-12)
        explicit = KFAC(modules, ekfac=ekfac, damping=k.layer_damping("0"))
        explicit.load_state_dict({k_: v for k_, v in k.state_dict().items() if k_ != "damping"})
        explicit.damping = k.layer_damping("0")
        torch.testing.assert_close(explicit.precondition(grads)["0"], k.precondition(grads)["0"])


def test_zero_eigenvalue_without_damping_gives_finite_results():
    """A dead input unit (always 0) and damping=0: that direction is left out, never inf/NaN."""
    model = mlp()
    x, y = data()
    x[:, 1] = 0
    k, modules = fitted(model, x, y, ekfac=False, damping=0.0)
    grads = loop_grads(model, modules, ce_loss, x[:3], y[:3])
    assert all(torch.isfinite(v).all() for v in k.precondition(grads).values())
    assert torch.isfinite(k.self_influence(grads)).all()


# --------------------------------------------------------------------------- fit_kfac
def test_fit_kfac_true_fisher_sampling_max_examples_and_cleanup():
    model = mlp()
    model.append(nn.Dropout(0.5))
    model.train()
    model[0].eval()  # per-module modes are restored, not just the top-level flag
    x, y = data(n=10)
    modules = linear_modules(model)
    with pytest.raises(ValueError, match=r"fisher='true'.*output_fn=\(model, batch\) -> logits"):
        fit_kfac(model, modules, ce_loss, batches_of(x, y, 4))
    calls = []

    def progress(it):
        calls.append(1)
        return it

    k1 = fit_kfac(model, modules, None, batches_of(x, y, 4), output_fn=logits_fn, progress=progress)
    k2 = fit_kfac(model, modules, None, batches_of(x, y, 4), output_fn=logits_fn)
    k3 = fit_kfac(model, modules, None, batches_of(x, y, 4), output_fn=logits_fn, seed=1)
    assert len(calls) == 2  # both passes
    s1, s2, s3 = k1.stats(), k2.stats(), k3.stats()
    assert all(torch.equal(s1[k_], s2[k_]) for k_ in s1)  # seeded: reproducible
    assert not torch.allclose(s1["S_sum/2"], s3["S_sum/2"])  # sampled labels depend on the seed
    torch.testing.assert_close(s1["A_sum/0"], s3["A_sum/0"])  # activations do not
    assert model.training and not model[0].training and model[3].training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    # max_examples truncates the last batch: 7 of 10 samples == fitting on the first 7
    k4 = fit_kfac(model, modules, ce_loss, batches_of(x, y, 4), fisher="empirical", max_examples=7)
    k5 = fit_kfac(
        model[:3], modules, ce_loss, [(x[:4], y[:4]), (x[4:7], y[4:7])], fisher="empirical"
    )
    assert int(k4.stats()["A_count/0"]) == 7 and int(k4.stats()["lambda_count/0"]) == 7
    for k_, v in k5.stats().items():
        torch.testing.assert_close(k4.stats()[k_], v, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="re-iterable"):
        fit_kfac(model, modules, ce_loss, iter(batches_of(x, y, 4)), fisher="empirical")


def test_fit_kfac_sequence_true_fisher_with_mask():
    torch.manual_seed(0)
    model = SeqModel().to(DT)
    x, y, mask = seq_data()
    batches = [(x[:3], y[:3], mask[:3]), (x[3:], y[3:], mask[3:])]
    k = fit_kfac(
        model, {"inp": model.inp, "out": model.out}, None, batches, output_fn=logits_fn,
        mask_fn=lambda b: b[2],
    )  # fmt: skip
    assert int(k.stats()["A_count/inp"]) == int(mask.sum()) == int(k.stats()["S_count/out"])
    assert int(k.stats()["lambda_count/out"]) == 5
    grads = {"inp": torch.randn(2, 6, 5, dtype=DT), "out": torch.randn(2, 3, 7, dtype=DT)}
    assert torch.isfinite(k.self_influence(grads)).all()


# --------------------------------------------------------------------------- Kronfluence parity
@pytest.mark.filterwarnings("ignore::FutureWarning")  # Kronfluence's torch.cuda.amp.GradScaler
def test_kronfluence_parity(tmp_path):
    """Same MLP 8-16-16-3, 64 samples, float64 everywhere: pairwise (10 x 64) and self scores
    agree with Kronfluence for EK-FAC and K-FAC, empirical and (same sampled labels) true Fisher,
    explicit damping and the 0.1 * mean eigenvalue heuristic."""
    pytest.importorskip("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    model = mlp((8, 16, 16, 3), seed=3)
    x, y = data(n=64, d=8, c=3, seed=4)
    qx, qy = data(n=10, d=8, c=3, seed=5)

    class Clf(Task):
        """Sampled labels drawn exactly as fit_kfac draws them (same generator, same order)."""

        def __init__(self, seed=0):
            self.gen = torch.Generator().manual_seed(seed)

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            target = batch[1]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().to(DT), -1)
                    target = torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
            return F.cross_entropy(logits, target, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    f64 = dict(
        activation_covariance_dtype=DT, gradient_covariance_dtype=DT,
        per_sample_gradient_dtype=DT, lambda_dtype=DT,
    )  # fmt: skip
    s64 = dict(per_sample_gradient_dtype=DT, precondition_dtype=DT, score_dtype=DT)
    train, query = TensorDataset(x, y), TensorDataset(qx, qy)
    modules = linear_modules(model)
    grads = loop_grads(model, modules, ce_loss, x, y)
    qgrads = loop_grads(model, modules, ce_loss, qx, qy)
    report = []
    cases = [
        ("ekfac", "empirical", (1e-3, None)),
        ("kfac", "empirical", (1e-3, None)),
        ("ekfac", "true", (None,)),
    ]
    for strategy, fisher, dampings in cases:
        task = Clf(seed=0)
        kmodel = prepare_model(copy.deepcopy(model), task)
        analyzer = Analyzer(
            "parity", kmodel, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path)
        )
        fargs = FactorArguments(
            strategy=strategy, use_empirical_fisher=fisher == "empirical", **f64
        )
        factors = f"{strategy}_{fisher}"
        analyzer.fit_all_factors(
            factors, train, per_device_batch_size=16, factor_args=fargs, overwrite_output_dir=True
        )
        for damping in dampings:
            sargs = ScoreArguments(damping_factor=damping, **s64)
            name = f"{factors}_{damping}"
            analyzer.compute_pairwise_scores(
                name, factors, query_dataset=query, train_dataset=train,
                per_device_query_batch_size=10, per_device_train_batch_size=16,
                score_args=sargs, overwrite_output_dir=True,
            )  # fmt: skip
            analyzer.compute_self_scores(
                name + "_self", factors, train_dataset=train, per_device_train_batch_size=16,
                score_args=sargs, overwrite_output_dir=True,
            )  # fmt: skip
            theirs = analyzer.load_pairwise_scores(name)["all_modules"]
            theirs_self = analyzer.load_self_scores(name + "_self")["all_modules"]
            k = fit_kfac(
                model, modules, ce_loss, batches_of(x, y, 16), ekfac=strategy == "ekfac",
                damping=damping, fisher=fisher, output_fn=logits_fn, seed=0,
            )  # fmt: skip
            pq = k.precondition(qgrads)
            ours = sum(torch.einsum("qoi,toi->qt", pq[n], grads[n]) for n in grads)
            ours_self = k.self_influence(grads)
            rel = float((ours - theirs).abs().max() / theirs.abs().max())
            rel_self = float((ours_self - theirs_self).abs().max() / theirs_self.abs().max())
            rho = _spearman(ours.flatten(), theirs.flatten())
            report.append(
                f"{name}: max rel err pairwise {rel:.1e} self {rel_self:.1e} rho {rho:.6f}"
            )
            assert rho >= 0.99
            assert rel < 1e-6 and rel_self < 1e-6
    print("\n".join(report))


def _spearman(a, b):
    ra = a.argsort().argsort().to(DT)
    rb = b.argsort().argsort().to(DT)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_eigenvalue_correction_from_inputs_equals_from_gradients():
    """Rotating a and g first (no per-sample gradient formed) gives the same EK-FAC sums as
    rotating the materialised per-sample gradients, with and without positions (sequence / conv)."""
    from lightning_memo.influence.grads import linear_grads_from_io
    from lightning_memo.influence.kfac import KFAC, with_bias_column

    g = torch.Generator().manual_seed(0)
    for shape in ((7,), (7, 4)):  # (B, d) and (B, T, d)
        lin = nn.Linear(5, 3).double()
        kf_a, kf_b = KFAC({"l": lin}), KFAC({"l": lin})
        a = torch.randn(*shape, 5, generator=g, dtype=torch.float64)
        out_g = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
        for kf in (kf_a, kf_b):
            kf.update_covariances({"l": a}, {"l": out_g})
            kf.compute_eigen()
        w, b = linear_grads_from_io(a, out_g, True)
        kf_a.update_eigenvalues({"l": with_bias_column(w, b)})
        kf_b.update_eigenvalues_from_io({"l": a}, {"l": out_g})
        sa, sb = kf_a.stats("eigenvalues"), kf_b.stats("eigenvalues")
        for k in sa:
            torch.testing.assert_close(sb[k].double(), sa[k].double(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- self-influence from the factors
def _io_cases(seed, linear_cases):
    """``[(modules, a, og)]``: one Linear per ``(shape, bias)`` of ``linear_cases`` with random
    inputs / output-gradients, then a Conv2d + Linear model's captured factors."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for shape, bias in linear_cases:
        lin = nn.Linear(6, 5, bias=bias).double()
        a = torch.randn(*shape, 6, generator=g, dtype=DT)
        og = torch.randn(*shape, 5, generator=g, dtype=DT)
        cases.append(({"l": lin}, {"l": a}, {"l": og}))
    model = TinyCNN(nn.Conv2d(2, 3, 3, padding=1), hw=5).double()
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    mods = {"conv": model.conv, "fc": model.fc}
    cases.append((mods, *captured(model, mods, ce_loss, (x, y))))
    return cases


def _fitted(mods, a, og, ekfac, damping):
    """(KFAC fitted on the factors, the formed per-sample gradients)."""
    k = KFAC(mods, ekfac=ekfac, damping=damping)
    k.update_covariances(a, og)
    k.compute_eigen()
    grads = hook_grads(a, og, mods)
    if ekfac:
        k.update_eigenvalues(grads)
    return k, grads


@pytest.mark.parametrize("ekfac", [True, False])
def test_self_influence_from_io_equals_materialised(ekfac):
    """K-FAC / EK-FAC self-influence from the layer inputs and output-gradients equals the old
    path through materialised per-sample gradients: Linear with and without bias, a sequence
    Linear (positions summed), and a Conv2d (patches), chunked or not, float64 and float32."""
    cases = _io_cases(3, (((9,), True), ((9,), False), ((9, 4), True)))
    for mods, a, og in cases:
        k, grads = _fitted(mods, a, og, ekfac, 1e-3)
        old = k.self_influence(grads)
        new = k.self_influence_from_io(a, og)
        assert new.dtype == DT and new.shape == old.shape
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-12)
        tiny = k.self_influence_from_io(a, og, max_elements=1)  # one sample per chunk
        torch.testing.assert_close(tiny, old, rtol=1e-10, atol=1e-12)
        a32 = {n: v.float() for n, v in a.items()}
        g32 = {n: v.float() for n, v in og.items()}
        got32 = k.self_influence_from_io(a32, g32)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), old, rtol=1e-4, atol=1e-6)
        # a subset of the layers scores that subset
        first = next(iter(mods))
        torch.testing.assert_close(
            k.self_influence_from_io({first: a[first]}, {first: og[first]}),
            k.self_influence({first: grads[first]}),
            rtol=1e-10,
            atol=1e-12,
        )
    with pytest.raises(ValueError, match="expected a"):
        k.self_influence_from_io({"fc": a["fc"][:, :3]}, {"fc": og["fc"]})


def _fitted_mlp_kfac_and_grads():
    """(KFACInfluence fitted on a tiny MLP, eager and lazy per-sample gradients of a batch)."""
    from lightning_memo.influence.features import GradientFeaturizer
    from lightning_memo.influence.methods import KFACInfluence

    model = mlp((5, 7, 3))
    x, y = data(24)
    modules = linear_modules(model)
    method = KFACInfluence(modules, damping=1e-3, fisher="empirical")
    method.fit(model, dict(model.named_parameters()), ce_loss, batches_of(x, y, 8))
    feats = GradientFeaturizer(modules, projection_dim=None)
    batch = (x[:10], y[:10])
    eager = feats.grad_dict(model, batch, ce_loss)
    lazy = feats.grad_dict(model, batch, ce_loss, lazy=True)
    return method, eager, lazy


def test_kfac_influence_self_influence_from_lazy_gradients():
    """KFACInfluence.self_influence on GradientFeaturizer.grad_dict(lazy=True): the same numbers
    as on the eager per-sample gradients, and no per-sample gradient is materialised; reading an
    entry of the lazy mapping gives the eager tensor."""
    from lightning_memo.influence.grads import FactoredGrads

    method, eager, lazy = _fitted_mlp_kfac_and_grads()
    assert isinstance(lazy, FactoredGrads) and list(lazy) == list(eager)
    got = method.self_influence(lazy)
    assert lazy._cache == {}  # nothing materialised
    torch.testing.assert_close(got, method.self_influence(eager), rtol=1e-10, atol=1e-12)
    for key in eager:
        torch.testing.assert_close(lazy[key], eager[key], rtol=0, atol=0)
    torch.testing.assert_close(method.train_rows(lazy), method.train_rows(eager), rtol=0, atol=0)


@pytest.mark.parametrize("ekfac", [True, False])
def test_hinv_norm_without_back_rotation_equals_the_preconditioned_norm(ekfac):
    """``||P(G)||`` from the rotated gradient (power 2 of the weights, no back-rotation), from the
    formed gradients and from the factors (plain rows, a sequence, a conv), equals the norm of the
    explicitly preconditioned gradient; one call gives self-influence and norm together."""
    for mods, a, og in _io_cases(5, (((9,), True), ((9, 4), True))):
        k, grads = _fitted(mods, a, og, ekfac, 1e-2)
        pre = k.precondition(grads)
        want_sq = sum(p.reshape(p.shape[0], -1).square().sum(1) for p in pre.values())
        want_self = sum((p * grads[n]).reshape(p.shape[0], -1).sum(1) for n, p in pre.items())
        s_dense, sq_dense = k.rotated_sums(grads, powers=(1, 2))
        s_io, sq_io = k.rotated_sums_from_io(a, og, powers=(1, 2), max_elements=1)
        for got in (sq_dense, sq_io):
            torch.testing.assert_close(got, want_sq, rtol=1e-10, atol=1e-14)
        for got in (s_dense, s_io):
            torch.testing.assert_close(got, want_self, rtol=1e-10, atol=1e-14)


def test_kfac_influence_hinv_norm_from_lazy_gradients_equals_eager():
    """KFACInfluence.hinv_norm / self_influence_and_hinv_norm on lazy (factored) gradients: the
    norm of the preconditioned query row, nothing materialised."""
    method, eager, lazy = _fitted_mlp_kfac_and_grads()
    want = method.query_rows(eager).double().norm(dim=1)
    s, n = method.self_influence_and_hinv_norm(lazy)
    torch.testing.assert_close(
        method.query_rows(lazy), method.query_rows(eager), rtol=1e-5, atol=1e-7
    )
    assert lazy._cache == {}
    torch.testing.assert_close(n, want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(method.hinv_norm(eager), want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s, method.self_influence(eager), rtol=1e-6, atol=1e-9)


def test_kfac_train_scores_from_lazy_gradients_equal_the_flat_rows():
    """KFACInfluence.train_scores on lazy gradients (each layer formed straight from its factors,
    no (B, k) concatenation) equals query_rows @ train_rows(eager).T, on a sequence model."""
    from lightning_memo.influence.features import GradientFeaturizer
    from lightning_memo.influence.grads import FactoredGrads
    from lightning_memo.influence.methods import KFACInfluence

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))).mean(dim=1)

    torch.manual_seed(0)
    model = Seq().double()
    x = torch.randn(12, 5, 4, dtype=DT)
    y = torch.randint(0, 3, (12,))
    modules = {"a": model.a, "b": model.b}
    method = KFACInfluence(modules, damping=1e-2, fisher="empirical")
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    method.fit(model, dict(model.named_parameters()), ce_loss, batches)
    feats = GradientFeaturizer(modules, projection_dim=None)
    q = method.query_rows(feats.grad_dict(model, batches[0], ce_loss))
    eager = feats.grad_dict(model, batches[1], ce_loss)
    lazy = feats.grad_dict(model, batches[1], ce_loss, lazy=True)
    assert isinstance(lazy, FactoredGrads)
    want = q @ method.train_rows(eager).T
    got = method.train_scores(q, lazy)
    assert lazy._cache == {}
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(method.train_scores(q, eager), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ekfac", [True, False])
def test_precondition_from_io_equals_precondition(ekfac):
    """P(G) from the factors' rotated rows equals P of the formed gradients (rows, sequence,
    conv), and KFACInfluence.query_rows takes that path on lazy gradients."""
    for mods, a, og in _io_cases(9, (((7, 3), True),)):
        k, grads = _fitted(mods, a, og, ekfac, 1e-2)
        want = k.precondition(grads)
        got = k.precondition_from_io(a, og)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-13)
