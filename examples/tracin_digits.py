"""TracIn while training: find mislabeled digits, and the training images behind a prediction.

Run:  python examples/tracin_digits.py  [epochs] [checkpoints|online]
      (same as `lightning-memo demo tracin`, which uses mode "checkpoints")

It flips 10 % of the labels of scikit-learn's digits, holds out 20 % (with their true labels) as
queries, trains a small MLP with the `TracIn` callback, and prints the AUROC of TracIn
self-influence for the flipped training samples next to the per-sample loss, and the time TracIn
took. It writes demo_runs/tracin_proponents.png: each validation image followed by its top-5
proponents and top-5 opponents (labels printed, flipped samples framed in red). See
docs/tracin.md.

Using TracIn on your own model
------------------------------
1. Give every training sample a stable index: wrap the dataset,
   ``train_set = IndexedDataset(train_set)`` (tuple items gain the index last, dict items the key
   "index"), or pass ``index_key=``. Labels are read from key "label"/"labels"/"y" or tuple
   position 1 (``label_key=`` to change).
2. Give TracIn one loss per sample. Either add a hook to your LightningModule

       def per_sample_loss(self, batch):
           x, y = batch[0], batch[1]
           return F.cross_entropy(self(x), y, reduction="none")   # (B,)

   or pass ``TracIn(loss_fn=lambda module, batch: ...)``. Call ``module(...)`` inside ``loss_fn``
   (not a bound method of your model) when the chosen layers are not all ``nn.Linear``: that
   path differentiates through ``module``'s call.
3. Queries: a DataLoader of labelled samples whose influence you want explained, e.g. the
   validation set, not shuffled (rows of ``scores`` follow the loader's order). Without
   ``queries=`` you get self-influence only.
4. Size the gradient features: ``projection_dim=1024`` (default) projects each Linear layer's
   per-sample gradient with a Kronecker (LoGra) projection; the store holds
   (checkpoints, N, ~projection_dim) numbers (``store_dtype=torch.float16`` halves it,
   ``store_on_disk=True`` memory-maps it). ``projection_dim=None`` keeps exact gradients (only
   for small layers). ``layers=["net.4"]`` restricts TracIn to some layers.
5. Pick the mode: ``mode="checkpoints"`` (TracInCP: one extra gradient pass over the training set
   and the queries at each checkpoint, ``every_n_epochs=`` or ``checkpoints="every_n_steps"``) or
   ``mode="online"`` (the gradients of the training steps themselves, at each step's weights and
   learning rate; Linear layers only; the queries' gradients are recomputed at every step).
6. Read the results after ``trainer.fit``:

       tracin.self_influence          # (N,) high = mislabeled / atypical / memorized
       tracin.scores                # (n_query, N) influence of each training sample on each query
       tracin.top_k_for(0)            # {"proponents", "proponent_scores", "opponents", ...}

   and the files under <log_dir>/lightning_memo/tracin/: self_influence.csv (index, label,
   self_influence, rank), top_k.csv (per query: proponents and opponents), store.pt (the
   projected gradients, checkpoints mode), config.json; with a TensorBoard logger a histogram of
   the self-influence and, for image inputs (``image_shape=(8, 8)`` for flat ones), a grid of the
   highest self-influence samples.
"""

from __future__ import annotations

import sys

import numpy as np

from lightning_memo.demos import run_tracin_demo

if __name__ == "__main__":
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    mode = sys.argv[2] if len(sys.argv) > 2 else "checkpoints"
    result = run_tracin_demo(epochs=epochs, out_dir="demo_runs", mode=mode)
    # the returned arrays, e.g. the 10 training samples TracIn ranks most self-influential
    top = np.argsort(-result["self_influence"])[:10]
    print(
        f"\nTop-10 self-influence training samples: {top.tolist()}; "
        f"{int(result['flipped'][top].sum())} of them have a flipped label."
    )
