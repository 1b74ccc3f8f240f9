"""Erase a spurious concept from a hidden layer with LEACE while training (digits demo).

Run:  python examples/erase_concept.py  [epochs]     (same as `lightning-memo demo erasure`)

It paints a bright 2x2 corner patch on 90 % of the even digits and 10 % of the odd ones, trains a
small MLP once without erasure and once per `when` mode of `ConceptErasure` on layer "net.3", and
prints the concept probe before / after erasure next to the digit accuracy. See docs/erasure.md.

Using ConceptErasure on your own model
--------------------------------------
1. Let every batch carry the concept, one value per sample: integer classes (B,) (bool works
   too), or float (B, k) one-hot / continuous values; a float (B,) needs z_dim=1. For example
   ``TensorDataset(x, y, z)`` gives tuple batches ``(x, y, z)``: pass ``concept=2``; a dict batch:
   ``concept="group"``; anything else: ``concept=lambda batch: batch["meta"]["group"]``. Without
   ``concept=``, the label (key "label"/"labels"/"y", or position 1) is erased.
2. Name the layers to erase as in ``model.named_modules()`` (globs allowed), e.g.
   ``layers=["encoder.layer.*.output"]``; a tuple or ModelOutput is erased at its hidden states
   (``output_key=`` picks another element).
3. Pick when to fit:
     when="fit_start"    fit once on the initial model (one no-grad pass over the training
                         set per layer), erase during the whole run;
     when="every_epoch"  refit on each epoch's training activations, applied from the next epoch;
     when="fit_end"      fit once on the trained model, installed for validation/test/predict.
4. Add it to the Trainer:

       from lightning_memo import ConceptErasure
       cb = ConceptErasure(layers=["net.3"], concept=2, when="fit_end")
       trainer = L.Trainer(callbacks=[cb], ...)
       trainer.fit(model, train_loader)
       trainer.test(model, test_loader)  # erased outputs (the hooks are installed again)

   It logs erasure/<layer>/probe_acc_before, .../probe_acc_after, .../majority_rate and
   .../edit_norm, and writes erasers.pt, history.json and config.json under
   <log_dir>/lightning_memo/erasure/. The erasers are saved in Lightning checkpoints; outside a
   Trainer use ``ConceptErasure.from_checkpoint(ckpt_path, layers=[...], when=...)`` and
   ``cb.install(model)`` / ``cb.remove()``.
"""

from __future__ import annotations

import sys

from lightning_memo.demos import run_erasure_demo

if __name__ == "__main__":
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    result = run_erasure_demo(epochs=epochs, out_dir="demo_runs")
    fit_end = result["runs"]["fit_end"]
    print(
        f"\nfit_end: probe for the patch {fit_end['probe_acc_before']:.3f} -> "
        f"{fit_end['probe_acc_after']:.3f} (majority rate {fit_end['majority_rate']:.3f}); "
        f"digit accuracy {fit_end['task_acc']:.3f} vs {result['runs']['baseline']['task_acc']:.3f} "
        "without erasure."
    )
