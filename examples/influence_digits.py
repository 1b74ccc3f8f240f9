"""Influence functions after training: find mislabeled digits, and the images behind a prediction.

Run:  python examples/influence_digits.py  [epochs]
      (the full comparison of methods is `lightning-memo demo influence`)

It flips 10 % of the labels of scikit-learn's digits, holds out 20 % (with their true labels) as
queries, and trains a small MLP with the `InfluenceAnalysis` callback (EK-FAC): when
`trainer.fit` ends, the callback fits the curvature and scores every training sample. Then it
calls `InfluenceAnalysis.run` twice on the trained model: once more with EK-FAC (the saved
factors and scores are reused: same configuration, same weights) and once with Arnoldi (a new
analysis of an already trained model, in its own folder). See docs/influence.md.

Using InfluenceAnalysis on your own model
-----------------------------------------
1. Give every training sample a stable index: ``IndexedDataset(train_set)``.
2. Give the callback one loss per sample: a ``per_sample_loss(self, batch) -> (B,)`` method on
   the LightningModule (as below), or ``loss_fn=lambda module, batch: ...``. For the default
   ``fisher="true"`` of K-FAC / EK-FAC the callback also calls ``module(inputs)`` to sample labels
   from the model (``output_fn=`` to change).
3. Queries: a DataLoader of labelled samples, in a fixed order (default: the validation loader).
4. Results after ``trainer.fit`` (or ``run``): ``analysis.self_influence`` (N,),
   ``analysis.scores`` (n_query, N), ``analysis.top_k_for(q)``, ``analysis.hinv_norm`` (N,), and
   the files under ``<log_dir>/lightning_memo/influence/``.
"""

from __future__ import annotations

import logging
import sys
import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo import IndexedDataset, InfluenceAnalysis
from lightning_memo.demos import DigitsMLP, load_digits_flipped


def main(epochs: int = 40) -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no Trainer banners
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    x, y_noisy, y_true, flipped_all = load_digits_flipped(0.1, seed=0)
    perm = np.random.default_rng(0).permutation(len(y_true))
    val, tr = np.sort(perm[:359]), np.sort(perm[359:])
    flipped = flipped_all[tr]
    train_set = IndexedDataset(
        TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y_noisy[tr]))
    )  # items (x, y, index)
    val_set = TensorDataset(torch.from_numpy(x[val]), torch.from_numpy(y_true[val]))
    train_loader = DataLoader(
        train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    queries = DataLoader(val_set, batch_size=256)  # not shuffled: rows of `scores`

    # 1. the callback: EK-FAC when trainer.fit ends
    L.seed_everything(0, verbose=False)
    ekfac = InfluenceAnalysis(method="ekfac", queries=queries, image_shape=(8, 8), progress=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[ekfac],
        logger=L.pytorch.loggers.TensorBoardLogger("demo_runs", name="influence_example"),
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    model = DigitsMLP(lr=3e-3)
    trainer.fit(model, train_loader)

    si = ekfac.self_influence.numpy()  # (N,), float64
    top = np.argsort(-si)[: len(si) // 10]
    print(
        f"EK-FAC: {int(flipped[top].sum())} of the {int(flipped.sum())} flipped labels are among "
        f"the {len(top)} training samples of highest self-influence."
    )
    res = ekfac.top_k_for(0, k=5)  # query 0 = the first validation image
    print(
        f"Query 0 (label {int(y_true[val[0]])}): proponents {res['proponents'].tolist()} with "
        f"labels {y_noisy[tr][res['proponents']].tolist()}, opponents "
        f"{res['opponents'].tolist()} with labels {y_noisy[tr][res['opponents']].tolist()}."
    )
    print(f"Files: {ekfac.out_dir}")

    # 2. run() on the trained model: the same configuration reuses factors.pt and scores.pt
    again = InfluenceAnalysis(method="ekfac", queries=queries, progress=False)
    again.run(trainer, model, train=DataLoader(train_set, batch_size=64))
    assert torch.equal(again.self_influence, ekfac.self_influence)
    print(f"EK-FAC again with run(): reused {again.reused}")

    # 3. run() with another method, in its own folder (one folder holds one analysis)
    arnoldi = InfluenceAnalysis(
        method="arnoldi",
        arnoldi_dim=100,
        arnoldi_k=50,
        queries=queries,
        output_dir=f"{trainer.log_dir}/lightning_memo/influence_arnoldi",
        progress=False,
    )
    arnoldi.run(trainer, model, train=DataLoader(train_set, batch_size=64))
    top_a = np.argsort(-arnoldi.self_influence.numpy())[: len(si) // 10]
    agree = np.corrcoef(arnoldi.scores.flatten().numpy(), ekfac.scores.flatten().numpy())[0, 1]
    print(
        f"Arnoldi: {int(flipped[top_a].sum())} flipped labels in its top {len(top_a)}; "
        f"Pearson correlation of its {tuple(arnoldi.scores.shape)} scores with EK-FAC's: "
        f"{agree:.2f}. Files: {arnoldi.out_dir}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
