"""The ``lightning-memo`` command:
``lightning-memo demo [memorization|erasure|tracin|influence]``."""

from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-memo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo on data shipped with scikit-learn")
    demo.add_argument(
        "which",
        nargs="?",
        default="memorization",
        choices=["memorization", "erasure", "tracin", "influence"],
    )
    demo.add_argument("--epochs", type=int, default=None, help="default: each demo's own")
    demo.add_argument("--out", default="demo_runs", help="folder of TensorBoard logs and CSVs")
    demo.add_argument("--n-estimators", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--source", choices=["train", "eval"], default="train")
    demo.add_argument(
        "--method",
        choices=[
            *("ekfac", "kfac", "arnoldi", "exact", "relatif", "randproj", "representer"),
            *("representer_lje", "boundary", "gex", "all"),
        ],
        default="all",
        help="influence demo: the InfluenceAnalysis method ('all': every one, plus TracIn)",
    )
    demo.add_argument(
        "--dataset",
        choices=["digits", "breast_cancer"],
        default="digits",
        help="influence demo: the data (10 %% of the labels flipped)",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    if args.command == "demo" and args.which == "memorization":
        from .demo import run_memorization_demo

        run_memorization_demo(
            **epochs,
            out_dir=args.out,
            n_estimators=args.n_estimators,
            seed=args.seed,
            source=args.source,
        )
    elif args.command == "demo" and args.which == "erasure":
        from .demo_erasure import run_erasure_demo

        run_erasure_demo(**epochs, out_dir=args.out, seed=args.seed)
    elif args.command == "demo" and args.which == "tracin":
        from .demo_tracin import run_tracin_demo

        run_tracin_demo(**epochs, out_dir=args.out, seed=args.seed)
    elif args.command == "demo" and args.which == "influence":
        from .demo_influence import run_influence_demo

        run_influence_demo(
            method=args.method, **epochs, out_dir=args.out, seed=args.seed, dataset=args.dataset
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
