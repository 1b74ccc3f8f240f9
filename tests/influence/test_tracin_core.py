"""GradientStore and TracIn scores against brute-force sums over checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lightning_memo.influence import GradientStore, top_k, tracin_scores, tracin_self_influence

N, K = 37, 6
LRS = [0.5, 0.1, 0.02]


pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(c, n=N, k=K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(100 + c))


def _filled(path=None, dtype=torch.float32):
    """A store with 3 checkpoints, rows written in shuffled batches."""
    store = GradientStore(N, K, dtype, path)
    for c, lr in enumerate(LRS):
        assert store.add_checkpoint(lr, step=10 * c) == c
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(c))
        g = _grads(c)
        for s in range(0, N, 8):
            idx = perm[s : s + 8]
            store.write(c, idx, g[idx])
    return store


def test_store_write_read_and_missing():
    store = GradientStore(N, K)
    assert len(store) == 0 and store.missing() == N
    store = _filled()
    assert len(store) == 3 and store.lrs == LRS and store.steps == [0, 10, 20]
    for c in range(3):
        torch.testing.assert_close(store.grads(c), _grads(c))
        assert store.seen(c).all()
    assert store.missing() == 0
    c = store.add_checkpoint(1.0)
    store.write(c, torch.tensor([3, 0, 5]), torch.ones(3, K))
    assert store.missing() == N - 3  # rows not written at some checkpoint
    assert store.seen(c).sum() == 3 and store.grads(c)[[0, 3, 5]].eq(1).all()
    assert store.grads(c)[1].eq(0).all()
    with pytest.raises(ValueError, match="gradients have 4 columns; the store has 6"):
        store.write(c, torch.tensor([1]), torch.ones(1, 4))


def test_store_float16_rounds_like_float16():
    store = _filled(dtype=torch.float16)
    assert store.grads(0).dtype == torch.float16
    torch.testing.assert_close(store.grads(0), _grads(0).half())


def test_memmap_store_equals_ram_store(tmp_path):
    ram, disk = _filled(), _filled(path=str(tmp_path / "store"))
    assert sorted(os.listdir(tmp_path / "store")) == ["grads_0.npy", "grads_1.npy", "grads_2.npy"]
    for c in range(3):
        torch.testing.assert_close(disk.grads(c), ram.grads(c))
        # the data live in the file
        np.testing.assert_array_equal(
            np.load(tmp_path / "store" / f"grads_{c}.npy"), ram.grads(c).numpy()
        )
    assert disk.missing() == ram.missing() == 0
    torch.testing.assert_close(tracin_self_influence(disk), tracin_self_influence(ram))
    q = [_grads(10 + c, n=4) for c in range(3)]
    torch.testing.assert_close(tracin_scores(disk, q), tracin_scores(ram, q))
    half = _filled(path=str(tmp_path / "half"), dtype=torch.float16)
    assert np.load(tmp_path / "half" / "grads_0.npy").dtype == np.float16
    torch.testing.assert_close(half.grads(1).float(), ram.grads(1).half().float())


def test_store_state_round_trip(tmp_path):
    store = _filled(path=str(tmp_path / "s"))
    store.add_checkpoint(0.3, step=99)
    store.write(3, torch.tensor([2, 4]), torch.full((2, K), 2.0))
    state = store.state()
    torch.save(state, tmp_path / "state.pt")
    back = GradientStore.from_state(torch.load(tmp_path / "state.pt"))
    assert (back.num_samples, back.dim, back.lrs, back.steps) == (
        N,
        K,
        LRS + [0.3],
        [0, 10, 20, 99],
    )
    assert back.missing() == store.missing() == N - 2
    for c in range(4):
        torch.testing.assert_close(back.grads(c), store.grads(c))
        assert torch.equal(back.seen(c), store.seen(c))
    torch.testing.assert_close(tracin_self_influence(back), tracin_self_influence(store))
    # the state is a copy: later writes do not change it
    store.write(0, torch.tensor([0]), torch.zeros(1, K))
    assert not torch.equal(state["grads"][0][0], store.grads(0)[0])


def test_self_influence_and_scores_equal_brute_force():
    store = _filled()
    q = [_grads(10 + c, n=5) for c in range(3)]
    self_inf = tracin_self_influence(store)
    assert self_inf.shape == (N,) and self_inf.dtype == torch.float64
    want_self = torch.zeros(N, dtype=torch.float64)
    want_scores = torch.zeros(5, N, dtype=torch.float64)
    for c, lr in enumerate(LRS):
        g, qc = _grads(c).double(), q[c].double()
        for i in range(N):
            want_self[i] += lr * sum(float(g[i, j]) ** 2 for j in range(K))
            for a in range(5):
                want_scores[a, i] += lr * float(qc[a] @ g[i])
    torch.testing.assert_close(self_inf, want_self, atol=1e-6, rtol=1e-6)
    scores = tracin_scores(store, q)
    assert scores.shape == (5, N)
    torch.testing.assert_close(scores.double(), want_scores, atol=1e-6, rtol=1e-6)
    for block in (1, 7, N, 1000):  # the block size does not change the result
        torch.testing.assert_close(tracin_scores(store, q, block=block), scores, atol=1e-6, rtol=0)
    # self-influence is the diagonal of the train x train scores
    diag = tracin_scores(store, [store.grads(c) for c in range(3)]).diagonal()
    torch.testing.assert_close(diag.double(), want_self, atol=1e-5, rtol=1e-6)


def test_scores_need_one_query_set_per_checkpoint():
    with pytest.raises(ValueError, match="2 query gradient sets for 3 checkpoints"):
        tracin_scores(_filled(), [torch.zeros(1, K)] * 2)


def test_top_k():
    s = torch.tensor([0.3, -2.0, 5.0, 0.0, -0.5, 4.0])
    pro, opp = top_k(s, 2)
    assert pro.tolist() == [2, 5] and opp.tolist() == [1, 4]
    pro, opp = top_k(s, 10)  # k larger than N: everything, in order
    assert pro.tolist() == [2, 5, 0, 3, 4, 1] and opp.tolist() == [1, 4, 3, 0, 5, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_disk_store_reads_blocks_from_the_file(tmp_path, dtype):
    """A disk-backed store is read block by block from its files (not through the memory map):
    the scores and self-influence equal the in-memory store's for any block size, also after
    reopening from ``state_ref`` with the maps out of reach."""
    ram, disk = _filled(dtype=dtype), _filled(str(tmp_path / "store"), dtype=dtype)
    q = [_grads(10 + c, n=4) for c in range(len(LRS))]
    want_self, want_scores = tracin_self_influence(ram), tracin_scores(ram, q)
    for block in (1, 5, 16384):
        torch.testing.assert_close(tracin_self_influence(disk, block=block), want_self)
        torch.testing.assert_close(tracin_scores(disk, q, block=block), want_scores)
    reopened = GradientStore.from_state(disk.state_ref())
    reopened._chunks = [None] * len(LRS)  # any access through the map would fail
    torch.testing.assert_close(tracin_self_influence(reopened, block=7), want_self)
    torch.testing.assert_close(tracin_scores(reopened, q, block=7), want_scores)
    rows = [(s, e, b.clone()) for s, e, b in reopened.blocks(1, 10, torch.float32)]
    assert [(s, e) for s, e, _ in rows] == [(0, 10), (10, 20), (20, 30), (30, 37)]
    torch.testing.assert_close(torch.cat([b for _, _, b in rows]), ram.grads(1).float())
