"""Benchmark: what the callbacks cost on a real fine-tune (MiniLM on chatterbot topics).

Writes ``docs/benchmarks_finetune.md``. The setting of ``bench_memorization.py``'s MiniLM runs:
all-MiniLM-L6-v2 + a linear head (``lightning_memo.demos.text.TextClassifier``), 800 chatterbot
training sentences (10 % of the labels flipped, seed 0), ``max_length=32``, the top 2 encoder
blocks and the head trained (AdamW 1e-4 / 2e-3), batch 32 (25 steps per epoch), 2 epochs, one
seed, a ``TensorBoardLogger`` in a temporary folder (the callbacks' histograms, tables and files
are part of the cost, as in real use).

Fits, in this order, in one process (each from ``seed_everything(0)``, a freshly loaded model with
the same initial weights and the same data order; the time of ``trainer.fit`` only, with
``time.perf_counter`` and the process CPU time):

1. plain fine-tune (start)
2. ``MemorizationMonitor`` on ``bert.encoder.layer.5`` and ``classifier:input``, every epoch,
   ``source="train"``                                         (target <= 1.30x plain)
3. the same with ``source="eval"``                             (target <= 1.40x)
4. ``TracIn`` online, LoGra ``projection_dim=1024``, layers ``classifier`` and
   ``bert.encoder.layer.5.output.dense``                      (target <= 1.30x)
5. ``InfluenceAnalysis("ekfac")`` at fit end on ``classifier`` and block 5's
   ``intermediate.dense`` / ``output.dense`` (64 validation queries, ``max_examples=512``,
   empirical Fisher)                       (target: its fit-end seconds <= one plain epoch's)
6. all four together: 2 (``source="train"``) + 4 + 5 + ``ConceptErasure`` of the sentence-length
   bucket at ``bert.encoder.layer.2`` (``when="fit_start"``, ``output_key=0``, as in the
   transformer demo)                                           (target <= 1.8x)
7. plain fine-tune (end): with 1, bounds the drift of the machine's speed during the run.

Ratio = fit seconds / the mean of the two plain fits; the range divides by the slower and the
faster plain fit. Each callback's Lightning hooks are timed (instance-level wrappers), so the
tables say which hook the time goes to; what is left (forward / backward hooks inside the model,
callback dispatch, noise) is "unaccounted". A configuration that misses its target is run again
under ``cProfile`` (``--profile``, on by default) and the top functions are listed.

Usage::

    python benchmarks/bench_finetune_speed.py                  # ~10-15 min on 2 shared cores
    python benchmarks/bench_finetune_speed.py --quick --out /tmp/ft.md   # smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import logging
import os
import pstats
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lightning as L  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from lightning_memo import (  # noqa: E402
    ConceptErasure,
    IndexedDataset,
    InfluenceAnalysis,
    MemorizationMonitor,
    TracIn,
)

HERE = os.path.dirname(os.path.abspath(__file__))

from _common import code_state, md_table_compact  # noqa: E402  (benchmarks/ on sys.path)

DEFAULT_OUT = os.path.join(HERE, "..", "docs", "benchmarks_finetune.md")
DEFAULT_RAW = os.path.join(tempfile.gettempdir(), "bench_finetune_speed_raw.json")

MONITOR_LAYERS = ["bert.encoder.layer.5", "classifier:input"]
TRACIN_LAYERS = ["classifier", "bert.encoder.layer.5.output.dense"]
EKFAC_LAYERS = [
    "classifier",
    "bert.encoder.layer.5.intermediate.dense",
    "bert.encoder.layer.5.output.dense",
]

HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_epoch_end",
    "on_train_end",
    "on_fit_end",
    "teardown",
)


# ----------------------------------------------------------------------------- timing helpers
def instrument(
    cb: Callback,
    name: str,
    sink: Dict[str, float],
    profiles: Optional[Dict[str, cProfile.Profile]] = None,
) -> Callback:
    """Wrap the Lightning hooks ``cb``'s class overrides so their wall time adds up in
    ``sink["<name>.<hook>"]`` (instance attributes: Lightning calls ``getattr(cb, hook)``).
    Hooks named in ``profiles`` (``"<name>.<hook>"``) also run under that ``cProfile``."""
    profiles = profiles or {}
    for hook in HOOKS:
        if getattr(type(cb), hook, None) is getattr(Callback, hook, None):
            continue
        fn = getattr(cb, hook)
        key = f"{name}.{hook}"
        prof = profiles.get(key)

        def wrapped(
            *a: Any,
            __fn: Callable = fn,
            __key: str = key,
            __prof: Optional[cProfile.Profile] = prof,
            **k: Any,
        ) -> Any:
            t0 = time.perf_counter()
            if __prof is not None:
                __prof.enable()
            try:
                return __fn(*a, **k)
            finally:
                if __prof is not None:
                    __prof.disable()
                sink[__key] = sink.get(__key, 0.0) + time.perf_counter() - t0

        setattr(cb, hook, wrapped)
    return cb


class EpochTimer(Callback):
    """Wall seconds of each training epoch (first in the callback list: its epoch end runs
    before the other callbacks' epoch-end work, so that work is not in the epoch time)."""

    def __init__(self) -> None:
        self.seconds: List[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


def _explicit(cls: type, **wanted: Any) -> Dict[str, Any]:
    """The keyword arguments of ``wanted`` that ``cls`` accepts (arguments that appeared in a
    newer version are passed only when they exist)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in wanted.items() if k in params}


# ----------------------------------------------------------------------------- the setting
class Setting:
    """Data, tokenizer and loaders of the fine-tune, built once."""

    def __init__(self, n_train: int, n_val: int, max_length: int, train_layers: int, seed: int):
        from torch.utils.data import DataLoader
        from transformers import AutoTokenizer

        from lightning_memo.demos.text import (
            Collate,
            flip_labels,
            load_chatterbot_topics,
            minilm_path,
        )
        from lightning_memo.demos.transformer import LengthBucket

        data = load_chatterbot_topics()
        order = np.random.default_rng(seed).permutation(len(data.texts))
        tr, va = order[:n_train], order[n_train : n_train + n_val]
        given, _ = flip_labels(data.labels[tr], len(data.topics), 0.1, seed)
        self.train = [{"text": data.texts[i], "label": int(g)} for i, g in zip(tr, given)]
        val = [{"text": data.texts[i], "label": int(data.labels[i])} for i in va]
        self.n_classes = len(data.topics)
        self.path = minilm_path()
        tok = AutoTokenizer.from_pretrained(self.path)
        self.collate = Collate(tok, max_length)
        lengths = [len(tok(it["text"])["input_ids"][:max_length]) for it in self.train]
        self.threshold = int(np.median(lengths))
        self.length_bucket = LengthBucket(self.threshold)
        self.train_layers = train_layers
        self.seed = seed
        self.train_ds = IndexedDataset(self.train)
        self.queries = DataLoader(IndexedDataset(val[:64]), batch_size=32, collate_fn=self.collate)
        self.batch_size = 32
        self._DataLoader = DataLoader

    def loader(self) -> Any:
        g = torch.Generator().manual_seed(self.seed)
        return self._DataLoader(
            self.train_ds,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.collate,
            generator=g,
        )

    def model(self) -> L.LightningModule:
        from lightning_memo.demos.text import TextClassifier

        L.seed_everything(self.seed, verbose=False)
        return TextClassifier(self.path, self.n_classes, train_layers=self.train_layers)


def make_monitor(source: str, n_estimators: int, seed: int) -> MemorizationMonitor:
    """Every argument the benchmark relies on, explicitly (defaults may change)."""
    extra = _explicit(
        MemorizationMonitor,
        directions="orthogonal",  # the monitor's default
        eval_stop_early=False,
    )
    if "directions" not in extra:
        extra["psmi_kwargs"] = {"directions": "orthogonal"}
    return MemorizationMonitor(
        MONITOR_LAYERS,
        every_n_epochs=1,
        source=source,
        pooling="mean",
        output_key=None,
        n_estimators=n_estimators,
        seed=seed,
        warn_below=0.0,
        patience=1,
        n_show=16,
        feature_dtype=torch.float32,
        progress=False,
        **extra,
    )


def make_tracin(seed: int) -> TracIn:
    return TracIn(
        TRACIN_LAYERS,
        projection_dim=1024,
        mode="online",
        seed=seed,
        store_dtype=torch.float32,
        progress=False,
    )


def make_ekfac(s: Setting, max_examples: int) -> InfluenceAnalysis:
    return InfluenceAnalysis(
        "ekfac",
        layers=EKFAC_LAYERS,
        queries=s.queries,
        max_examples=max_examples,
        fisher="empirical",
        cache=False,
        progress=False,
        seed=s.seed,
    )


def make_erasure(s: Setting) -> ConceptErasure:
    return ConceptErasure(
        "bert.encoder.layer.2",
        concept=s.length_bucket,
        when="fit_start",
        output_key=0,
        progress=False,
    )


CONFIGS: List[Tuple[str, str]] = [
    ("plain (start)", ""),
    ("monitor, source=train", "monitor_train"),
    ("monitor, source=eval", "monitor_eval"),
    ("TracIn online", "tracin"),
    ("EK-FAC at fit end", "ekfac"),
    ("all four", "monitor_train+tracin+ekfac+erasure"),
    ("plain (end)", ""),
]
CTX_PLAIN = ("plain (start)", "plain (end)")
TARGETS = {
    "monitor, source=train": 1.30,
    "monitor, source=eval": 1.40,
    "TracIn online": 1.30,
    "all four": 1.80,
}


def callbacks_for(spec: str, s: Setting, args: argparse.Namespace) -> List[Tuple[str, Callback]]:
    out: List[Tuple[str, Callback]] = []
    for part in [p for p in spec.split("+") if p]:
        if part == "monitor_train":
            out.append(("monitor", make_monitor("train", args.n_estimators, s.seed)))
        elif part == "monitor_eval":
            out.append(("monitor", make_monitor("eval", args.n_estimators, s.seed)))
        elif part == "tracin":
            out.append(("tracin", make_tracin(s.seed)))
        elif part == "ekfac":
            out.append(("ekfac", make_ekfac(s, args.max_examples)))
        elif part == "erasure":
            out.append(("erasure", make_erasure(s)))
    return out


def one_fit(
    s: Setting,
    spec: str,
    args: argparse.Namespace,
    profile: Optional[cProfile.Profile] = None,
    limit_batches: Optional[int] = None,
) -> Dict[str, Any]:
    model = s.model()
    loader = s.loader()
    hooks: Dict[str, float] = {}
    named = callbacks_for(spec, s, args)
    # EK-FAC's fit-end work is long and torch-bound: profile it inside the timed fit (cProfile
    # adds little there) instead of paying for another fit
    hook_prof = {"ekfac.on_fit_end": cProfile.Profile()} if "ekfac" in spec else {}
    cbs = [instrument(cb, name, hooks, hook_prof) for name, cb in named]
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as root:
        logger = L.pytorch.loggers.TensorBoardLogger(root, name="ft")
        trainer = L.Trainer(
            max_epochs=1 if limit_batches else args.epochs,
            callbacks=[timer] + cbs,
            logger=logger,
            accelerator="cpu",
            devices=1,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            log_every_n_steps=10,
            num_sanity_val_steps=0,
            limit_train_batches=limit_batches or 1.0,
        )
        load0 = os.getloadavg()[0]
        c0, t0 = time.process_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            trainer.fit(model, loader)
        finally:
            if profile is not None:
                profile.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {
        "wall": wall,
        "cpu": cpu,
        "epochs": timer.seconds,
        "hooks": hooks,
        "load_1min": [load0, os.getloadavg()[0]],
    }
    if hook_prof:
        res["ekfac_profile"] = profile_text(hook_prof["ekfac.on_fit_end"])
    return res


def profile_config(s: Setting, spec: str, args: argparse.Namespace) -> str:
    """cProfile of one whole fit (see :func:`profile_text`)."""
    prof = cProfile.Profile()
    one_fit(s, spec, args, profile=prof)
    return profile_text(prof)


def profile_text(prof: cProfile.Profile, top: int = 18) -> str:
    """The functions with the most cumulative time inside ``lightning_memo`` and the most own
    time anywhere."""
    out = []
    for title, key, restrict in (
        ("cumulative time, functions of lightning_memo", "cumulative", "lightning_memo"),
        ("own time (tottime), all functions", "tottime", None),
    ):
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf).sort_stats(key)
        if restrict:
            st.print_stats(restrict, top)
        else:
            st.print_stats(top)
        lines = buf.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        body = [line.replace(os.path.dirname(HERE) + "/", "") for line in lines[start:] if line]
        body = [line.replace(sys.prefix + "/", "") for line in body]
        out.append(f"{title}:\n" + "\n".join(body[: top + 1]))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- the page
def _load_words(meta: Dict[str, Any]) -> str:
    """'quiet' when the 1-minute load stayed at or below half the 2 cores, else 'shared'."""
    first = [float(str(meta[k]).split("/")[0]) for k in ("load_start", "load_end")]
    if max(first) <= 1.0:
        return "the machine was quiet (1-minute load at most 1 on 2 cores)"
    return "the 2 cores were shared with other jobs"


def render(raw: Dict[str, Any]) -> str:
    meta, fits = raw["meta"], raw["fits"]
    plain = [fits["plain (start)"], fits["plain (end)"]]
    p_wall = [f["wall"] for f in plain]
    p_cpu = [f["cpu"] for f in plain]
    base, base_cpu = float(np.mean(p_wall)), float(np.mean(p_cpu))
    epoch_s = float(np.mean([e for f in plain for e in f["epochs"]]))
    lines: List[str] = []
    w = lines.append
    w("# Callback cost on a real fine-tune (MiniLM on chatterbot topics)\n")
    w(
        f"Generated by `python benchmarks/bench_finetune_speed.py` ({meta['wall_s'] / 60:.0f} min "
        f"of wall time). Machine: {meta['cpu']}, torch {meta['torch']}, lightning "
        f"{meta['lightning']}, "
        f"transformers {meta['transformers']}; code: {meta.get('git', 'unknown')}. **Load:** "
        f"{_load_words(meta)}; load average "
        f"{meta['load_start']} at the start and "
        f"{meta['load_end']} at the end (1/5/15 min); the 1-minute load at each fit's start "
        "and end is in the last column. One torch thread "
        f"(`torch.set_num_threads({meta['threads']})`), so that a second busy core disturbs "
        "the timings less; wall times still move with the load, so the plain fine-tune runs "
        "first and last and every ratio is given against both.\n"
    )
    w("## Setting\n")
    w(
        f"all-MiniLM-L6-v2 + a linear head (`TextClassifier`), {meta['n_train']} chatterbot "
        f"training sentences (19 topics, 10 % of the labels flipped, seed {meta['seed']}), "
        f"`max_length={meta['max_length']}`, the top {meta['train_layers']} encoder blocks and "
        f"the head trained (AdamW 1e-4 / 2e-3), batch 32 ({meta['steps']} steps per epoch), "
        f"{meta['epochs']} epochs, a `TensorBoardLogger` in a temporary folder. The same setting "
        "as the MiniLM runs of [benchmarks_memorization.md](benchmarks_memorization.md). Each fit "
        "starts from `seed_everything(0)` and a freshly loaded model (same weights, same data "
        "order); an untimed warm-up fit (plain, 5 batches) runs first.\n"
    )
    w(
        '- **monitor**: `MemorizationMonitor(["bert.encoder.layer.5", "classifier:input"], '
        f'every_n_epochs=1, pooling="mean", n_estimators={meta["n_estimators"]}, orthogonal '
        'directions (the defaults), n_show=16)`, `source="train"` (features of the training '
        "forward passes) "
        f'or `"eval"` (an extra no-grad pass over the {meta["n_train"]} sentences at each '
        "epoch's end).\n"
        '- **TracIn**: `TracIn(["classifier", "bert.encoder.layer.5.output.dense"], '
        'projection_dim=1024, mode="online")`.\n'
        f'- **EK-FAC**: `InfluenceAnalysis("ekfac", layers=[classifier, block 5 '
        f"intermediate.dense, block 5 output.dense], queries=64 validation sentences, "
        f'max_examples={meta["max_examples"]}, fisher="empirical", cache=False)`, run at fit '
        f"end: factors, eigendecompositions, self-influence of the {meta['n_train']} training "
        f"sentences and 64 x {meta['n_train']} scores.\n"
        '- **erasure**: `ConceptErasure("bert.encoder.layer.2", concept=LengthBucket(median '
        f'length = {meta["threshold"]} tokens), when="fit_start", output_key=0)`.\n'
    )
    w("## Results\n")
    rows = []
    verdicts = {}
    for name, _spec in CONFIGS:
        f = fits[name]
        ratio = f["wall"] / base
        lo, hi = f["wall"] / max(p_wall), f["wall"] / min(p_wall)
        target = TARGETS.get(name)
        if target is not None:
            ok = ratio <= target
            verdicts[name] = (ok, ratio, target)
            tcell = f"<= {target:.2f}x: " + ("met" if ok else "**missed**")
        elif name.startswith("EK-FAC"):
            sec = f["hooks"].get("ekfac.on_fit_end", float("nan"))
            ok = sec <= epoch_s
            verdicts[name] = (ok, sec, epoch_s)
            tcell = f"fit-end {sec:.1f} s vs one epoch {epoch_s:.1f} s: " + (
                "met" if ok else "**missed**"
            )
        else:
            tcell = "—"
        rows.append(
            [
                name,
                f"{f['wall']:.1f}",
                " / ".join(f"{e:.1f}" for e in f["epochs"]),
                f"{ratio:.2f}",
                f"{lo:.2f}–{hi:.2f}",
                f"{f['cpu'] / base_cpu:.2f}",
                tcell,
                " → ".join(f"{x:.1f}" for x in f["load_1min"]),
            ]
        )
    w(
        md_table_compact(
            [
                "fit",
                "wall s",
                "training-epoch s",
                "ratio",
                "ratio range",
                "CPU-time ratio",
                "target",
                "load (1 min)",
            ],
            rows,
        )
        + "\n"
    )
    w(
        "*ratio* = wall seconds / the mean of the two plain fits "
        f"({base:.1f} s); *ratio range* divides by the slower and by the faster plain fit "
        f"({min(p_wall):.1f}–{max(p_wall):.1f} s); *CPU-time ratio* uses the process CPU time "
        "(less sensitive to other processes than wall time). *training-epoch s*: from each "
        "epoch's start to its end, before the callbacks' epoch-end work (so the monitor's PSMI "
        "and eval pass are not in it, but hook work inside the training loop is). One plain "
        f"epoch: {epoch_s:.1f} s on average.\n"
    )
    w("## Where the time goes (instrumented hooks, seconds per fit)\n")
    hrows = []
    for name, spec in CONFIGS:
        if not spec:
            continue
        f = fits[name]
        total = sum(f["hooks"].values())
        top = sorted(f["hooks"].items(), key=lambda kv: -kv[1])[:6]
        extra = f["wall"] - base
        hrows.append(
            [
                name,
                f"{extra:+.1f}",
                f"{total:.1f}",
                f"{extra - total:+.1f}",
                "; ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.005),
            ]
        )
    w(
        md_table_compact(
            ["fit", "extra s vs plain", "in hooks", "unaccounted", "largest hooks (s)"],
            hrows,
        )
        + "\n"
    )
    w(
        "*unaccounted* = extra seconds - seconds inside the callbacks' Lightning hooks: the "
        "forward / backward hooks inside the model (feature capture, per-sample gradient "
        "capture, the eraser), callback dispatch, and noise (a difference of two fits at "
        "different moments on a shared machine, so it can be negative).\n"
    )
    w("## Verdict\n")
    four = fits["all four"]
    rest = four["wall"] - four["hooks"].get("ekfac.on_fit_end", 0.0)
    for name, (ok, a, b) in verdicts.items():
        if name == "all four":
            w(
                f"- **{name}**: {a:.2f}x (target {b:.2f}x): {'met' if ok else '**missed**'}. "
                f"Without EK-FAC's fit-end seconds: {rest / base:.2f}x."
            )
        elif name.startswith("EK-FAC"):
            w(
                f"- **{name}**: {a:.1f} s at fit end vs {b:.1f} s for one plain training epoch "
                f"({a / b:.2f} epochs): target {'met' if ok else '**missed**'}."
            )
        else:
            w(f"- **{name}**: {a:.2f}x (target {b:.2f}x): {'met' if ok else '**missed**'}.")
    w("")
    ctx = raw.get("context")
    if ctx:
        cp = [ctx["plain (start)"]["wall"], ctx["plain (end)"]["wall"]]
        cm = ctx["monitor, source=eval"]
        w("## Context: the eval pass when every block is trained\n")
        w(
            'The same two-layer monitor with `source="eval"`, but all 6 encoder blocks '
            "fine-tuned (`train_layers=6`): the backward pass now runs through the whole "
            "encoder, so a forward-only eval pass is a smaller share of an epoch.\n"
        )
        w(
            md_table_compact(
                ["fit", "wall s", "training-epoch s", "ratio", "ratio range", "CPU-time ratio"],
                [
                    [
                        name,
                        f"{ctx[name]['wall']:.1f}",
                        " / ".join(f"{e:.1f}" for e in ctx[name]["epochs"]),
                        f"{ctx[name]['wall'] / np.mean(cp):.2f}",
                        f"{ctx[name]['wall'] / max(cp):.2f}–{ctx[name]['wall'] / min(cp):.2f}",
                        f"{ctx[name]['cpu'] / np.mean([ctx[k]['cpu'] for k in CTX_PLAIN]):.2f}",
                    ]
                    for name in ("plain (start)", "monitor, source=eval", "plain (end)")
                ],
            )
            + "\n"
        )
        w(
            f"Monitor epoch-end work: {cm['hooks'].get('monitor.on_train_epoch_end', 0.0):.1f} s "
            "per fit.\n"
        )
    if raw.get("profiles"):
        w("## Profiles of the configurations that missed their target\n")
        w(
            "Each was fitted once more under `cProfile` (slower than the timed fit; the shares, "
            "not the seconds, are what to read).\n"
        )
        for name, text in raw["profiles"].items():
            w(f"### {name}\n")
            w("```\n" + text + "\n```\n")
    if raw.get("notes"):
        w("## Notes\n")
        w(raw["notes"] + "\n")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--train-layers", type=int, default=2)
    p.add_argument("--n-estimators", type=int, default=1000)
    p.add_argument("--max-examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--raw", default=DEFAULT_RAW)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--notes", default=None, help="a markdown file appended as a Notes section")
    p.add_argument(
        "--context",
        action="store_true",
        help="also time plain vs monitor(source=eval) with every encoder block trained",
    )
    p.add_argument(
        "--context-only",
        action="store_true",
        help="run only the --context fits, add them to --raw and rewrite --out",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.render_only:
        with open(args.raw) as f:
            raw = json.load(f)
        if args.notes:
            with open(args.notes) as f:
                raw["notes"] = f.read().strip()
            with open(args.raw, "w") as f:
                json.dump(raw, f)
        write(raw, args.out)
        return
    if args.quick:
        args.epochs, args.n_train, args.n_val, args.max_length = 1, 96, 96, 16
        args.n_estimators, args.max_examples = 200, 64
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from _common import machine_info  # noqa: E402  (benchmarks/ is on sys.path)

    info = machine_info(["transformers"], str(args.threads))
    if args.context_only:
        with open(args.raw) as f:
            raw = json.load(f)
        raw["context"] = run_context(args)
        with open(args.raw, "w") as f:
            json.dump(raw, f)
        write(raw, args.out)
        return
    t_start = time.perf_counter()
    s = Setting(args.n_train, args.n_val, args.max_length, args.train_layers, args.seed)
    one_fit(s, "", args, limit_batches=5)  # warm-up, untimed
    raw: Dict[str, Any] = {
        "meta": dict(
            cpu=info["cpu"],
            torch=info["torch"],
            lightning=info["lightning"],
            transformers=info.get("transformers", ""),
            load_start=info["load average at start (1/5/15 min)"],
            threads=args.threads,
            n_train=args.n_train,
            max_length=args.max_length,
            train_layers=args.train_layers,
            epochs=args.epochs,
            steps=-(-args.n_train // 32),
            n_estimators=args.n_estimators,
            max_examples=args.max_examples,
            seed=args.seed,
            threshold=s.threshold,
            git=code_state(),
        ),
        "fits": {},
        "profiles": {},
    }
    for name, spec in CONFIGS:
        res = one_fit(s, spec, args)
        raw["fits"][name] = res
        print(
            f"{name}: {res['wall']:.1f} s wall, {res['cpu']:.1f} s CPU, epochs "
            f"{[round(e, 1) for e in res['epochs']]}, hooks "
            f"{ {k: round(v, 2) for k, v in res['hooks'].items() if v > 0.01} }",
            flush=True,
        )
        with open(args.raw, "w") as f:
            json.dump(raw, f)
    base = np.mean([raw["fits"]["plain (start)"]["wall"], raw["fits"]["plain (end)"]["wall"]])
    epoch_s = np.mean(
        [e for n in ("plain (start)", "plain (end)") for e in raw["fits"][n]["epochs"]]
    )
    if args.profile:
        for name, spec in CONFIGS:
            f = raw["fits"][name]
            if name.startswith("EK-FAC"):
                if f["hooks"].get("ekfac.on_fit_end", 0.0) > epoch_s:
                    raw["profiles"][name + " (its on_fit_end, profiled in the timed fit)"] = f[
                        "ekfac_profile"
                    ]
                continue
            if name not in TARGETS or f["wall"] / base <= TARGETS[name]:
                continue
            if "ekfac" in spec:
                # EK-FAC's part is profiled above: profile the rest, if the rest misses too
                rest = f["wall"] - f["hooks"].get("ekfac.on_fit_end", 0.0)
                if rest / base <= TARGETS[name]:
                    continue
                spec = "+".join(p for p in spec.split("+") if p != "ekfac")
                name = f"{name} without EK-FAC"
            print(f"profiling {name} ...", flush=True)
            raw["profiles"][name] = profile_config(s, spec, args)
            with open(args.raw, "w") as fh:
                json.dump(raw, fh)
    if args.context:
        raw["context"] = run_context(args)
    raw["meta"]["wall_s"] = time.perf_counter() - t_start
    raw["meta"]["load_end"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    with open(args.raw, "w") as f:
        json.dump(raw, f)
    write(raw, args.out)


def run_context(args: argparse.Namespace) -> Dict[str, Any]:
    """Plain vs monitor(source="eval") with every encoder block trained (the backward pass then
    costs about twice the forward, so an eval pass weighs less next to a training epoch), each
    plain fit on both sides of the monitor fit."""
    s = Setting(args.n_train, args.n_val, args.max_length, 6, args.seed)
    one_fit(s, "", args, limit_batches=5)  # warm-up, untimed
    out: Dict[str, Any] = {"train_layers": 6, "load_start": os.getloadavg()[0]}
    for name, spec in (
        ("plain (start)", ""),
        ("monitor, source=eval", "monitor_eval"),
        ("plain (end)", ""),
    ):
        res = one_fit(s, spec, args)
        res.pop("ekfac_profile", None)
        out[name] = res
        print(f"context, 6 blocks trained, {name}: {res['wall']:.1f} s", flush=True)
    return out


def write(raw: Dict[str, Any], out: str) -> None:
    text = render(raw)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
