"""MemorizationMonitor: PSMI of every training sample, every evaluated epoch, with early warning.

Owns *when* things happen (which epoch, which rank, what is logged and kept in ``state_dict``);
formulas live in :mod:`lightning_memo.psmi`, hooks in :mod:`lightning_memo.capture`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from ..capture import (
    FeatureCapture,
    LayerSpec,
    OutputKey,
    PoolingSpec,
    add_forward_hook,
    check_pooling,
    extra_pass,
    layers_key,
    match_names,
    pooling_config,
    recording_allowed,
)
from ..data import Accessor, Describe, get_indices, get_labels, make_accessor, make_describer
from ..distributed import gather_rows, world_size
from ..io import (
    atomic_write_csv,
    atomic_write_json,
    check_writable,
    clear_files,
    resolve_output_dir,
    tensorboard_writer,
)
from ..psmi import PSMI
from ..signals import loss_and_margin
from ..viz import dataset_grid
from .common import (
    batch_mask,
    checked_forward,
    dataset_size,
    default_forward,
    inference_context,
    markdown_cell,
    resumed_output_dir,
    sample_texts,
    samples_describe,
    sequential_loader,
    show_progress,
)
from .reports import maybe_write_report, write_samples

__all__ = ["MemorizationMonitor"]

SOURCES = ("train", "eval")
DIRECTIONS = ("gaussian", "orthogonal")


class MemorizationMonitor(Callback):
    """Pointwise sliced mutual information (PSMI) of each training sample while the model trains.

    Low PSMI between a sample's hidden features and its label early in training predicts that the
    sample will be memorized (Wongso et al., ISIT 2023; Dentan et al., ECAI 2025). Each evaluated
    epoch the monitor scores every training sample on every chosen layer, logs summaries,
    histograms and the lowest-PSMI inputs, writes ``epoch_<E>.csv`` and flags samples that stay
    below ``warn_below`` for ``patience`` evaluations.

    Results after ``fit``: :meth:`scores_at` (an epoch's ``(N,)`` PSMI on one layer),
    :attr:`epochs`, :attr:`flagged`, :attr:`labels` / :attr:`labels_seen`, ``history``.

    Hugging Face models: ``layers="encoder.layer.*"`` finds the blocks of a wrapped model
    (``model.bert.encoder.layer.0``, ...; under PEFT ``base_model.model.bert...``), block outputs
    that are tuples or ``ModelOutput`` s are read at their hidden states (``output_key=``),
    ``"classifier:input"`` scores what the head receives, ``pooling`` may differ per layer, and
    the tables show each sample's text (``describe=``).

    Args:
        layers: layer names (globs allowed: ``*`` within one dotted segment, ``**`` across;
            a name may be the dotted ending of the full name) or modules whose outputs are
            scored; ``"<name>:input"`` scores the layer's input instead (e.g.
            ``"classifier:input"``).
        every_n_epochs: evaluate every n-th epoch (epochs n-1, 2n-1, ...).
        source: ``"eval"`` (default: a forward-only pass over the training set in eval mode at
            the end of the epoch, so every sample is scored on the same end-of-epoch model, as in
            Dentan et al.) or ``"train"`` (features of the training forward passes; no extra
            pass, but each sample seen by the model of its own step, dropout on).
        pooling: how a layer output ``(B, ..., d)`` becomes ``(B, d)``: ``"mean"`` (mask-aware),
            ``"last"`` (last non-padding token, left or right padding), ``"first"`` (first
            non-padding token: CLS), ``"flatten"`` or a callable; or a dict per layer
            (``{"encoder.layer.1": "first", "classifier:input": "mean"}``, keys as in ``layers``;
            layers without a key use ``"mean"``).
        output_key: which part of a layer output that is a tuple or a ``ModelOutput`` is scored:
            ``None`` (default) the hidden states (``last_hidden_state``, else the first tensor),
            an int position or a str key (``"pooler_output"``). Tensor outputs are used as they
            are.
        n_estimators: PSMI directions (``"auto"`` allowed). Default 1000, with
            ``directions="orthogonal"``: as accurate as 2000 Gaussian directions (the paper's)
            in half the time (docs/memorization.md, "Defaults").
        directions: ``"orthogonal"`` (blocks of orthonormal directions: variance-reduced) or
            ``"gaussian"`` (i.i.d., as the paper and the ``psmi`` package; use it with
            ``n_estimators=2000`` to reproduce them).
        seed: seed of the PSMI directions (combined with the epoch and layer).
        index_key, label_key: how to read indices and labels from a batch (dict key, tuple
            position or callable); defaults in :mod:`lightning_memo.data`.
        input_key: how to read the input from a dataset item, for the image grid.
        mask_key: dict key of the attention mask used by pooling (ignored when absent); the
            ``"eval"`` pass calls ``module(**batch)`` with it (without index / label / text keys).
        warn_below: PSMI threshold of the early warning (0: less information than chance).
        patience: consecutive evaluations with PSMI below ``warn_below`` before a sample is
            flagged.
        on_flag: called on every rank with the newly flagged indices ``(k,)`` (numpy).
        stop_on_flag: stop training (all ranks together) when samples get flagged.
        n_show: number of lowest-PSMI inputs shown in TensorBoard and recorded for the report
            (``samples.json``) each evaluated epoch (0: none).
        describe: ``dataset item -> str``: the text shown beside a sample in the lowest-PSMI
            table, ``flagged.csv`` (column ``text``) and ``samples.json``; default: the item's
            ``text_key`` field when items are dicts holding a string there.
        text_key: the dict key of an item's text used when ``describe`` is ``None``.
        top_k: deprecated name of ``n_show`` (a ``DeprecationWarning``; removed in the next
            release).
        flag_layer: layer whose PSMI drives the warning (default: the last resolved layer).
        output_dir: folder of the result files (default ``<log_dir>/lightning_memo/memorization``).
        image_shape: reshape flat inputs to this image shape for the grid (e.g. ``(8, 8)``).
        forward_fn: ``(module, batch) -> output`` used by ``source="eval"``.
        eval_stop_early: ``source="eval"`` only: end each forward of the eval pass as soon as
            every monitored layer has recorded (nothing after the deepest monitored layer runs).
            The model's output is then never computed, so there is no loss or margin (columns
            absent from the CSV); it saves the compute after the deepest monitored layer (none
            when that is the last layer).
        num_samples: training-set size ``N`` (default ``len(train_dataloader.dataset)``).
        feature_dtype: dtype of the feature buffers (CPU).
        psmi_kwargs: more arguments of :class:`~lightning_memo.PSMI` (e.g. ``dtype``,
            ``directions``, ``memory_budget_mb``).
        progress: progress bar on the ``"eval"`` pass; ``None`` follows the Trainer
            (``enable_progress_bar``).
        report: write / update the run's HTML report (``lightning-memo report``) at fit end.
    """

    def __init__(
        self,
        layers: LayerSpec,
        *,
        every_n_epochs: int = 1,
        source: str = "eval",
        pooling: PoolingSpec = "mean",
        output_key: OutputKey = None,
        n_estimators: Any = 1000,
        directions: str = "orthogonal",
        seed: int = 0,
        index_key: Accessor = None,
        label_key: Accessor = None,
        input_key: Accessor = None,
        mask_key: Optional[str] = "attention_mask",
        warn_below: float = 0.0,
        patience: int = 2,
        on_flag: Optional[Callable[[np.ndarray], None]] = None,
        stop_on_flag: bool = False,
        n_show: int = 16,
        describe: Describe = None,
        text_key: Optional[str] = "text",
        flag_layer: Optional[str] = None,
        output_dir: Optional[str] = None,
        image_shape: Optional[Sequence[int]] = None,
        forward_fn: Optional[Callable[[LightningModule, Any], Any]] = None,
        eval_stop_early: bool = False,
        num_samples: Optional[int] = None,
        feature_dtype: torch.dtype = torch.float32,
        psmi_kwargs: Optional[Dict[str, Any]] = None,
        progress: Optional[bool] = None,
        report: bool = False,
        top_k: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.write_report = bool(report)  # the run's HTML report at fit end
        if top_k is not None:
            if n_show != 16:
                raise ValueError(
                    f"top_k={top_k!r} and n_show={n_show!r}: pass n_show= only (top_k= is its "
                    "deprecated name)."
                )
            warnings.warn(
                "MemorizationMonitor(top_k=) is deprecated and will be removed in the next "
                "release: pass n_show= (the number of lowest-PSMI inputs shown in TensorBoard).",
                DeprecationWarning,
                stacklevel=2,
            )
            n_show = top_k
        if isinstance(layers, (list, tuple)) and not layers:
            raise ValueError("layers=[] is empty: name at least one layer to monitor.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r}: use an integer >= 1.")
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: use 'train' or 'eval'.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r}: use an integer >= 1.")
        if directions not in DIRECTIONS:
            raise ValueError(f"directions={directions!r}: use 'orthogonal' or 'gaussian'.")
        if eval_stop_early and source != "eval":
            raise ValueError(
                f"eval_stop_early=True with source={source!r}: the early stop ends the forwards "
                "of the eval pass; use source='eval' or drop eval_stop_early."
            )
        if n_show < 0:
            raise ValueError(f"n_show={n_show!r}: use an integer >= 0.")
        if on_flag is not None and not callable(on_flag):
            raise ValueError("on_flag must be a callable taking the newly flagged indices.")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r}: use a positive integer or None.")
        if not isinstance(feature_dtype, torch.dtype) or not feature_dtype.is_floating_point:
            raise ValueError(
                f"feature_dtype={feature_dtype!r}: use a floating torch dtype (torch.float32, "
                "torch.float64, torch.float16 or torch.bfloat16)."
            )
        self.layers = layers
        self.every_n_epochs = every_n_epochs
        self.source = source
        self.pooling = check_pooling(pooling)
        if output_key is not None and not isinstance(output_key, (int, str)):
            raise TypeError(f"output_key={output_key!r}: use an int position, a str key or None.")
        self.output_key = output_key
        self.n_estimators = n_estimators
        self.seed = int(seed)
        self.psmi_kwargs = dict(psmi_kwargs or {})
        reserved = {"n_estimators", "seed", "generator", "return_full"} & set(self.psmi_kwargs)
        if reserved:
            raise ValueError(
                f"psmi_kwargs sets {sorted(reserved)}, which the monitor controls: pass "
                "n_estimators= and seed= to MemorizationMonitor (directions are seeded per epoch "
                "and layer so ranks and resumed runs agree)."
            )
        kind = self.psmi_kwargs.pop("directions", directions)
        if kind != directions:
            raise ValueError(
                f"psmi_kwargs={{'directions': {kind!r}}} and directions={directions!r}: pass "
                f"directions={kind!r} to MemorizationMonitor (its own argument since the default "
                "became 'orthogonal')."
            )
        self.directions = directions
        # validate now, not later
        PSMI(n_estimators=n_estimators, seed=0, directions=directions, **self.psmi_kwargs)
        self.index_key, self.label_key, self.input_key = index_key, label_key, input_key
        self._get_index = make_accessor(index_key, "index")
        self._get_label = make_accessor(label_key, "label")
        self._get_input = make_accessor(input_key, "input")
        self.mask_key = mask_key
        self.warn_below = float(warn_below)
        self.patience = patience
        self.on_flag = on_flag
        self.stop_on_flag = stop_on_flag
        self.n_show = int(n_show)
        self.describe, self.text_key = describe, text_key
        self._describe = make_describer(describe, text_key)
        self.flag_layer = flag_layer
        self.output_dir = output_dir
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.forward_fn = forward_fn
        self.eval_stop_early = bool(eval_stop_early)
        self.num_samples = num_samples
        self.feature_dtype = feature_dtype
        self.progress = progress
        # state (saved in checkpoints)
        self.history: List[Dict[str, Any]] = []
        self.below_count: Optional[torch.Tensor] = None  # (N,) consecutive evaluations below
        self.flagged_epoch: Optional[torch.Tensor] = None  # (N,) epoch flagged, -1 if not
        # run-time only
        self.scores: Dict[int, Dict[str, np.ndarray]] = {}  # epoch -> layer -> (N,) NaN if unscored
        self.capture: Optional[FeatureCapture] = None
        self.out_dir: Optional[str] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._labels: Optional[torch.Tensor] = None  # (N,) class ids (any integers), this rank
        self._label_seen: Optional[torch.Tensor] = None  # (N,) bool: label read at least once
        self._all_labels: Optional[torch.Tensor] = None  # (N,) all ranks, at the last evaluation
        self._all_seen: Optional[torch.Tensor] = None
        self._loss: Optional[torch.Tensor] = None
        self._margin: Optional[torch.Tensor] = None
        self._logit_handle: Any = None
        self._loader: Any = None  # the eval pass's loader, kept across epochs (persistent workers)
        self._loader_src: Any = None
        self._armed_batch: Optional[tuple] = None
        self._warned: set = set()
        self._checked = False
        self._logits_checked: Optional[bool] = None
        self._first_epoch = 0
        self._device = torch.device("cpu")
        self._flag_name: Optional[str] = None  # flag_layer resolved to a monitored name
        self._text_cache: Dict[int, Optional[str]] = {}
        self._no_text = False

    # ------------------------------------------------------------------ identity & state
    @property
    def state_key(self) -> str:
        key = dict(layers=layers_key(self.layers), source=self.source, pooling=str(self.pooling))
        if self.output_key is not None:  # keys of monitors without it stay as they were
            key["output_key"] = self.output_key
        return self._generate_state_key(**key)

    @property
    def flagged(self) -> np.ndarray:
        """Indices of flagged samples, sorted."""
        if self.flagged_epoch is None:
            return np.zeros(0, dtype=np.int64)
        return torch.nonzero(self.flagged_epoch >= 0).flatten().numpy()

    @property
    def top_k(self) -> int:
        """Deprecated name of :attr:`n_show`."""
        warnings.warn(
            "MemorizationMonitor.top_k is deprecated: use n_show.", DeprecationWarning, stacklevel=2
        )
        return self.n_show

    # ------------------------------------------------------------------ results
    @property
    def epochs(self) -> List[int]:
        """The evaluated epochs (0-based) with scores in this process, ascending."""
        return sorted(self.scores)

    def scores_at(self, epoch: int, layer: Optional[str] = None) -> np.ndarray:
        """PSMI of every training sample at the end of one evaluated epoch.

        Args:
            epoch: a 0-based epoch of :attr:`epochs`.
            layer: a resolved layer name (``config.json`` -> ``layers``); default: the flag layer.

        Returns:
            (N,) float64, the PSMI mean over directions; NaN where the sample was not scored
            (never seen that epoch, NaN/inf features, a class with one sample). A copy.

        Raises:
            KeyError: ``epoch`` was not evaluated in this process.
            ValueError: ``layer`` is not a monitored layer.
        """
        if epoch not in self.scores:
            raise KeyError(
                f"MemorizationMonitor has no scores for epoch {epoch}; evaluated epochs in this "
                f"process: {self.epochs} (every_n_epochs={self.every_n_epochs}; epochs of a run "
                "resumed from a checkpoint are in its epoch_<E>.csv files)."
            )
        per_layer = self.scores[epoch]
        name = self._flag_layer() if layer is None else self._monitored_name(layer, list(per_layer))
        if name not in per_layer:
            raise ValueError(
                f"layer={layer!r} is not one of the monitored layers {list(per_layer)}."
            )
        return per_layer[name].copy()

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """(N,) int64 labels read from the training batches (all ranks), as of the last
        evaluation; 0 where never read (see :attr:`labels_seen`). ``None`` before one."""
        return self._all_labels

    @property
    def labels_seen(self) -> Optional[torch.Tensor]:
        """(N,) bool: the label of the sample was read (on some rank) by the last evaluation."""
        return self._all_seen

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": 1,
            "history": self.history,
            "below_count": self.below_count,
            "flagged_epoch": self.flagged_epoch,
            "seed": self.seed,
            "out_dir": self.out_dir,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._pending_state = dict(state_dict)
        self.out_dir = resumed_output_dir(self.output_dir, self.out_dir, state_dict)
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(
                f"MemorizationMonitor: the checkpoint was written with seed={state_dict['seed']} "
                f"but this monitor has seed={self.seed}; resumed scores will differ."
            )

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.capture = FeatureCapture(
            pl_module,
            self.layers,
            self.pooling,
            dtype=self.feature_dtype,
            owner=self,
            output_key=self.output_key,
        )
        names = self.capture.names
        self._flag_name = None
        if self.flag_layer is not None:
            self._flag_name = self._monitored_name(self.flag_layer, names)
            if self._flag_name not in names:
                raise ValueError(
                    f"flag_layer={self.flag_layer!r} is not one of the monitored layers {names}."
                )
        self._text_cache, self._no_text = {}, False
        self.out_dir = resolve_output_dir(trainer, self.output_dir, "memorization", self)
        check_writable(trainer, self.out_dir, "MemorizationMonitor")

    def _flag_layer(self) -> str:
        return self._flag_name or self.capture.names[-1]

    @staticmethod
    def _monitored_name(layer: str, names: List[str]) -> str:
        """A monitored layer's resolved name from a name as given in ``layers=`` (e.g.
        ``"encoder.layer.1"`` for ``"model.bert.encoder.layer.1"``); ``layer`` itself when it
        names none or several."""
        if layer in names:
            return layer
        hits = match_names(layer, names)
        return hits[0] if len(hits) == 1 else layer

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.num_samples or dataset_size(trainer, "MemorizationMonitor")
        self._device = pl_module.device
        self._first_epoch = trainer.current_epoch
        self.capture.allocate(n)
        self._labels = torch.zeros(n, dtype=torch.long)
        self._label_seen = torch.zeros(n, dtype=torch.bool)
        self._checked = False
        resumed = self._pending_state is not None
        self._loss = torch.full((n,), float("nan"), dtype=torch.float64)
        self._margin = torch.full((n,), float("nan"), dtype=torch.float64)
        self.below_count = torch.zeros(n, dtype=torch.long)
        self.flagged_epoch = torch.full((n,), -1, dtype=torch.long)
        if self._pending_state is not None:
            st = self._pending_state
            for key in ("below_count", "flagged_epoch"):
                val = st.get(key)
                if val is None:
                    continue
                if val.shape[0] != n:
                    rank_zero_warn(
                        f"MemorizationMonitor: the checkpoint holds {key} for {val.shape[0]} "
                        f"samples but the training set has {n}; the early-warning state restarts."
                    )
                    continue
                setattr(self, key, val.clone().cpu())
            self._pending_state = None
        if self.source == "train":
            self.capture.attach()
            self._logit_handle = add_forward_hook(pl_module, self._logit_hook, "observe")
        if trainer.is_global_zero:
            if not resumed:  # a new run into this folder: no epoch file of an earlier run stays
                clear_files(
                    self.out_dir, r"epoch_\d+\.csv|flagged\.csv|history\.json|samples\.(json|npz)"
                )
            atomic_write_json(os.path.join(self.out_dir, "config.json"), self._config(n))

    def _config(self, n: int) -> Dict[str, Any]:
        return {
            "layers": self.capture.names,
            "flag_layer": self._flag_layer(),
            "every_n_epochs": self.every_n_epochs,
            "source": self.source,
            "eval_stop_early": self.eval_stop_early,
            "pooling": pooling_config(self.pooling, self.capture.poolings),
            "output_key": self.output_key,
            "n_estimators": self.n_estimators,
            "directions": self.directions,
            "seed": self.seed,
            "warn_below": self.warn_below,
            "patience": self.patience,
            "num_samples": n,
            "psmi_kwargs": {k: str(v) for k, v in self.psmi_kwargs.items()},
        }

    # ------------------------------------------------------------------ capture
    def _evaluated(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.capture.reset()
        self._loss.fill_(float("nan"))
        self._margin.fill_(float("nan"))

    def _read_batch(self, trainer: Trainer, batch: Any) -> tuple:
        first = trainer.current_epoch == self._first_epoch
        idx = get_indices(
            batch,
            self._get_index,
            self.capture.num_samples if first else None,  # checked in the first epoch only
            check_duplicates=first and world_size(trainer.strategy) == 1,
        )
        lab = get_labels(batch, self._get_label)
        if lab.shape[0] != idx.shape[0]:
            raise ValueError(
                f"The batch has {idx.shape[0]} indices but {lab.shape[0]} labels; index_key= and "
                "label_key= must read one value per sample."
            )
        mask = batch_mask(batch, self.mask_key)
        self._labels[idx.cpu()] = lab.cpu()
        self._label_seen[idx.cpu()] = True
        return idx, lab, mask

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "eval":
            if not self._checked:  # fail at the first batch, not at the end of the epoch
                self._read_batch(trainer, batch)
                with extra_pass(self, pl_module), torch.no_grad():
                    self._forward(pl_module, batch)
                self._checked = True
            return
        idx, lab, mask = self._read_batch(trainer, batch)
        if not self._evaluated(trainer.current_epoch):
            return
        self._armed_batch = (idx, lab)
        self.capture.arm(idx, mask)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.capture.disarm()
        self._armed_batch = None

    def _logit_hook(self, module: Any, inputs: Any, output: Any) -> None:
        if self._armed_batch is not None and recording_allowed(self):
            self._record_baselines(self._armed_batch[0], self._armed_batch[1], output)

    def _record_baselines(self, idx: torch.Tensor, lab: torch.Tensor, output: Any) -> None:
        """Per-sample loss and margin when the output is class logits ``(B, C)``."""
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != idx.shape[0]:
            return
        if not out.is_floating_point() or out.shape[1] < 2:
            return
        if self._logits_checked is None:  # once: do the labels index the logits' columns?
            self._logits_checked = 0 <= int(lab.min()) and int(lab.max()) < out.shape[1]
        if not self._logits_checked:
            return
        with torch.no_grad():
            loss, margin = loss_and_margin(out.detach().float(), lab)
            both = torch.stack([loss, margin], dim=1).cpu().double()
            cpu_idx = idx.cpu()
            self._loss[cpu_idx] = both[:, 0]
            self._margin[cpu_idx] = both[:, 1]

    def _eval_pass(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forward-only pass over the training set in eval mode (``torch.inference_mode`` where
        Lightning would use it), recording features and baselines; invisible to the other
        callbacks, every module's own train/eval mode restored after. With ``eval_stop_early``
        each forward ends once every monitored layer has recorded (no baselines then).

        Only pooled features, labels, loss and margin leave the pass, copied into tensors made
        outside it (the capture's buffers are normal tensors even when made inside)."""
        from tqdm.auto import tqdm

        show = show_progress(self.progress, trainer)
        loader = self._pass_loader(trainer)
        stop = self.eval_stop_early
        self.capture.attach()
        try:
            with extra_pass(self, pl_module), inference_context(trainer):
                # built inside: iter(loader) draws the DataLoader's base seed from the global RNG
                bar = tqdm(
                    loader, desc="MemorizationMonitor: eval pass", leave=False, disable=not show
                )
                with trainer.precision_plugin.forward_context():
                    for batch in bar:
                        idx, lab, mask = self._read_batch(trainer, batch)
                        batch = trainer.strategy.batch_to_device(batch)
                        if mask is not None:
                            mask = batch[self.mask_key]
                        self.capture.arm(idx, mask, stop=stop)
                        out, _ = self.capture.forward(self._forward, pl_module, batch)
                        self.capture.disarm()
                        if not stop:
                            self._record_baselines(idx, lab, out)
        finally:
            self.capture.remove()

    def _pass_loader(self, trainer: Trainer) -> Any:
        """The eval pass's sequential loader, built once per training loader: its workers live
        on between epochs when the training loader has ``persistent_workers=True``."""
        src = trainer.train_dataloader
        if self._loader is None or self._loader_src is not src:
            self._loader, self._loader_src = sequential_loader(trainer), src
        return self._loader

    def _forward(self, pl_module: LightningModule, batch: Any) -> Any:
        """The eval pass's forward (``forward_fn`` or ``module(inputs)``), with a clear error."""
        skip = [self.index_key, self.label_key]
        fn = self.forward_fn or (lambda m, b: default_forward(m, b, skip))
        return checked_forward(
            fn,
            pl_module,
            batch,
            "MemorizationMonitor (source='eval')",
            custom=self.forward_fn is not None,
            hint="A LightningModule without forward() needs one (or forward_fn=); "
            "source='train' scores the training passes instead, with no extra forward.",
        )

    # ------------------------------------------------------------------ scoring
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self._evaluated(epoch):
            return
        if self.source == "eval":
            self.capture.reset()
            self._eval_pass(trainer, pl_module)
        labels, known, loss, margin = self._gather_meta(trainer)
        self._all_labels, self._all_seen = labels, known
        self._warn_repeated(trainer, epoch)
        scores: Dict[str, np.ndarray] = {}
        stds: Dict[str, np.ndarray] = {}
        summary: Dict[str, Any] = {"epoch": epoch, "layers": {}}
        for li, name in enumerate(self.capture.names):
            feats, seen = self._gather_features(trainer, name)
            mean, std, info = self._score_layer(feats, seen & known, labels, epoch, li, name)
            scores[name], stds[name] = mean, std
            summary["layers"][name] = info
        flag_score = scores[self._flag_layer()]
        new = self._update_flags(flag_score, epoch)
        summary["n_flagged"] = int((self.flagged_epoch >= 0).sum())
        summary["new_flagged"] = new.tolist()
        self.history.append(summary)
        self.scores[epoch] = scores
        self._log(trainer, pl_module, epoch, scores, labels, summary)
        if trainer.is_global_zero:
            self._write_files(trainer, epoch, scores, stds, labels, known, loss, margin, new)
        if len(new):
            self._warn_flagged(new, epoch)
            if self.on_flag is not None:
                self.on_flag(new)
        if self.stop_on_flag:
            stop = trainer.strategy.reduce_boolean_decision(bool(len(new)), all=False)
            if stop:
                trainer.should_stop = True
                trainer.strategy.barrier("memorization_stop")  # rank 0 has written its files

    def _gather_meta(self, trainer: Trainer) -> tuple:
        """Labels (N,) int64 with ``known`` (N,) bool (label read on some rank), loss and margin
        (N,) float64 (NaN: not measured this epoch).

        Every rank sends the rows it has a label for; a finite loss / margin always wins over a
        NaN one, whatever the rank order (a rank may know a sample's label from an earlier epoch
        without having measured it in this one).
        """
        idx = torch.nonzero(self._label_seen).flatten()
        vals = torch.stack([self._labels[idx].double(), self._loss[idx], self._margin[idx]], dim=1)
        idx, vals = gather_rows(trainer.strategy, idx, vals)
        labels = torch.zeros_like(self._labels)
        known = torch.zeros_like(self._label_seen)
        loss = torch.full_like(self._loss, float("nan"))
        margin = torch.full_like(self._margin, float("nan"))
        labels[idx] = vals[:, 0].long()
        known[idx] = True
        ok = torch.isfinite(vals[:, 1])
        loss[idx[ok]] = vals[ok, 1]
        margin[idx[ok]] = vals[ok, 2]
        return labels, known, loss, margin

    def _gather_features(self, trainer: Trainer, name: str) -> tuple:
        idx, feats = self.capture.rows(name)
        if world_size(trainer.strategy) > 1:
            d = torch.tensor([feats.shape[1]], device=trainer.strategy.root_device)
            dim = int(trainer.strategy.all_gather(d).max())
            if feats.shape[1] != dim:  # a rank that saw no sample
                feats = feats.new_zeros(0, dim)
            idx, feats = gather_rows(trainer.strategy, idx, feats)
        n = self.capture.num_samples
        full = torch.zeros(n, feats.shape[1], dtype=feats.dtype)
        seen = torch.zeros(n, dtype=torch.bool)
        full[idx] = feats.cpu()
        seen[idx] = True
        return full, seen

    def _score_layer(
        self,
        feats: torch.Tensor,
        seen: torch.Tensor,
        labels: torch.Tensor,
        epoch: int,
        li: int,
        name: str,
    ) -> tuple:
        """PSMI of one layer's seen, finite samples of classes with >= 2 of them."""
        n = feats.shape[0]
        mean = np.full(n, np.nan)
        std = np.full(n, np.nan)
        ok = seen.clone()
        missing = int((~ok).sum())
        finite = torch.isfinite(feats).all(dim=1)
        nonfinite = int((ok & ~finite).sum())
        ok &= finite
        cls, cnt = torch.unique(labels[ok], return_counts=True)
        lonely = cls[cnt < 2].tolist()
        if lonely:
            ok &= ~torch.isin(labels, cls[cnt < 2])
        if int((cnt >= 2).sum()) == 1:
            self._warn_once(
                f"one-class-{name}",
                f"MemorizationMonitor: every scored sample at layer {name!r} has the same label "
                f"({int(cls[cnt >= 2][0])}); PSMI is 0 by construction with one class, so the "
                "early warning cannot fire. Check label_key= (it must read the class labels).",
            )
        info = {
            "n_scored": int(ok.sum()),
            "n_missing": missing,
            "n_nonfinite": nonfinite,
            "singleton_classes": lonely,
        }
        if missing:
            self._warn_once(
                f"missing-{name}-{epoch}",
                f"MemorizationMonitor: {missing} of {n} training samples were never seen at layer "
                f"{name!r} in epoch {epoch} (limit_train_batches, drop_last or a layer skipped in "
                "forward); they have no score this epoch.",
            )
        if nonfinite:
            rank_zero_warn(
                f"MemorizationMonitor: {nonfinite} samples have NaN/inf features at layer "
                f"{name!r} in epoch {epoch}; they are excluded from PSMI (empty in the CSV)."
            )
        if lonely:
            rank_zero_warn(
                f"MemorizationMonitor: class(es) {lonely[:10]} have a single scored sample at "
                f"layer {name!r}; PSMI needs 2 per class, so those samples are excluded."
            )
        sel = torch.nonzero(ok).flatten()
        if sel.numel() < 2 or torch.unique(labels[sel]).numel() < 1:
            return mean, std, {**info, "psmi_mean": float("nan"), "psmi_q05": float("nan")}
        est = PSMI(
            n_estimators=self.n_estimators,
            seed=self.direction_seed(epoch, li),
            directions=self.directions,
            return_full=False,
            **self.psmi_kwargs,
        )
        dev = self._device  # PSMI runs where the model runs (the buffers stay on the CPU)
        m, s, _ = est.fit_transform(feats[sel].to(dev), labels[sel].to(dev))
        mean[sel.numpy()] = m.double().cpu().numpy()
        std[sel.numpy()] = s.double().cpu().numpy()
        vals = mean[sel.numpy()]
        info.update(
            psmi_mean=float(vals.mean()),
            psmi_q05=float(np.quantile(vals, 0.05)),
            n_estimators=int(est.n_estimators),
        )
        return mean, std, info

    def direction_seed(self, epoch: int, layer_index: int) -> int:
        """Seed of the PSMI directions of one evaluation: a function of ``seed``, the epoch and
        the layer's position, so every rank and a resumed run draw the same directions."""
        return int(np.random.SeedSequence([self.seed, epoch, layer_index]).generate_state(1)[0])

    def _update_flags(self, score: np.ndarray, epoch: int) -> np.ndarray:
        """Advance the PSMI early warning with one evaluation's ``score: (N,)`` (NaN: unscored);
        returns the newly flagged indices."""
        below = np.nan_to_num(score, nan=np.inf) < self.warn_below
        return self._advance_flags(~np.isnan(score), below, epoch)

    def _advance_flags(self, scored: np.ndarray, hit: np.ndarray, epoch: int) -> np.ndarray:
        """One evaluation of the early warning: ``hit: (N,)`` bool at risk this time, counted
        where ``scored: (N,)``; unscored samples keep their count. Returns the newly flagged."""
        scored_t, hit_t = torch.from_numpy(scored), torch.from_numpy(hit)
        self.below_count = torch.where(
            scored_t, torch.where(hit_t, self.below_count + 1, 0), self.below_count
        )
        new = (self.below_count >= self.patience) & (self.flagged_epoch < 0)
        self.flagged_epoch[new] = epoch
        return torch.nonzero(new).flatten().numpy()

    # ------------------------------------------------------------------ output
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(msg)

    def _warn_repeated(self, trainer: Trainer, epoch: int) -> None:
        """Say so when one index was recorded twice in an epoch (single process; under DDP the
        sampler's padding repeats samples on purpose)."""
        if world_size(trainer.strategy) > 1 or not self.capture.repeated:
            return
        name, idx = next(iter(self.capture.repeated.items()))
        rank_zero_warn(
            f"MemorizationMonitor: sample indices {sorted(set(idx))[:10]} were read from more "
            f"than one batch in epoch {epoch} at layer {name!r}; the later batch overwrote the "
            "earlier one's features, and the samples whose index was taken are missing. Each "
            "sample needs its own index in [0, N): wrap the dataset with IndexedDataset (or "
            "fix index_key=)."
        )

    def _warn_flagged(self, new: np.ndarray, epoch: int) -> None:
        first = ", ".join(str(i) for i in new[:10])
        more = f" (+{len(new) - 10} more)" if len(new) > 10 else ""
        what = f"had PSMI < {self.warn_below:g} at layer {self._flag_layer()!r}"
        rank_zero_warn(
            f"MemorizationMonitor early warning (epoch {epoch}): {len(new)} training samples have "
            f"{what} for {self.patience} "
            f"evaluations and are likely to be memorized: {first}{more}. All flagged indices: "
            "monitor.flagged; per-sample scores in "
            f"{os.path.join(self.out_dir, f'epoch_{epoch}.csv')}."
        )

    def _log(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        epoch: int,
        scores: Dict[str, np.ndarray],
        labels: torch.Tensor,
        summary: Dict[str, Any],
    ) -> None:
        has_logger = bool(trainer.loggers)
        for name, info in summary["layers"].items():
            for key in ("psmi_mean", "psmi_q05"):
                pl_module.log(
                    f"memo/{name}/{key}",
                    float(info[key]),
                    on_epoch=True,
                    logger=has_logger,
                    sync_dist=True,
                )
        pl_module.log(
            "memo/flagged",
            float(summary["n_flagged"]),
            on_epoch=True,
            logger=has_logger,
            sync_dist=True,
        )
        if not trainer.is_global_zero:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            if trainer.loggers:
                self._warn_once(
                    "no-tb",
                    "MemorizationMonitor: histograms and image grids need a TensorBoardLogger; "
                    "they are skipped (scalars and CSV files are still written).",
                )
            return
        step = trainer.global_step
        for name, s in scores.items():
            vals = s[~np.isnan(s)]
            if vals.size:
                writer.add_histogram(f"memo/{name}/psmi", vals, step)
        self._log_lowest(trainer, writer, scores[self._flag_layer()], labels, step)

    def _lowest(self, score: np.ndarray) -> np.ndarray:
        """Indices of the ``n_show`` lowest scored samples, lowest first."""
        valid = np.nonzero(~np.isnan(score))[0]
        return valid[np.argsort(score[valid], kind="stable")[: self.n_show]]

    @staticmethod
    def _dataset(trainer: Trainer) -> Any:
        return getattr(trainer.train_dataloader, "dataset", None)

    def _texts(self, trainer: Trainer, indices: Sequence[int]) -> Dict[int, Optional[str]]:
        """Text of each sample (``describe=`` or the items' ``text_key`` field), cached over
        epochs; ``{}`` when the dataset has none (decided on the first items read)."""
        ds = self._dataset(trainer)
        if self._no_text or ds is None:
            return {}
        todo = [int(i) for i in indices if int(i) not in self._text_cache]
        if todo:
            texts = sample_texts(self._describe, [ds[i] for i in todo], "MemorizationMonitor")
            if self.describe is None and not self._text_cache and all(t is None for t in texts):
                self._no_text = True  # items carry no text: stop reading them for it
                return {}
            self._text_cache.update(zip(todo, texts))
        return {int(i): self._text_cache[int(i)] for i in indices}

    def _log_lowest(
        self, trainer: Trainer, writer: Any, score: np.ndarray, labels: torch.Tensor, step: int
    ) -> None:
        if self.n_show == 0:
            return
        lowest = self._lowest(score)
        texts = self._texts(trainer, lowest)
        if texts:
            rows = ["| index | label | PSMI | text |", "|---|---|---|---|"]
            rows += [
                f"| {i} | {int(labels[i])} | {score[i]:.4f} | {markdown_cell(texts[int(i)])} |"
                for i in lowest
            ]
        else:
            rows = ["| index | label | PSMI |", "|---|---|---|"]
            rows += [f"| {i} | {int(labels[i])} | {score[i]:.4f} |" for i in lowest]
        tag = f"memo/{self._flag_layer()}/lowest_psmi"
        writer.add_text(tag, "\n".join(rows), step)
        ds = self._dataset(trainer)
        if ds is None:
            return
        items = [ds[int(i)] for i in lowest]
        caps = [str(int(labels[i])) for i in lowest]
        grid = dataset_grid(items, self._get_input, caps, self.image_shape)
        if grid is not None:  # not images: the text table above is the picture
            writer.add_image(tag, grid, step, dataformats="CHW")

    def _write_files(
        self,
        trainer: Trainer,
        epoch: int,
        scores: Dict[str, np.ndarray],
        stds: Dict[str, np.ndarray],
        labels: torch.Tensor,
        known: torch.Tensor,
        loss: torch.Tensor,
        margin: torch.Tensor,
        new: np.ndarray,
    ) -> None:
        names = list(scores)
        any_scored = np.zeros(labels.shape[0], dtype=bool)
        for s in scores.values():
            any_scored |= ~np.isnan(s)
        has_base = bool(torch.isfinite(loss).any())
        header = ["index", "label"]
        for name in names:
            header += [f"{name}/psmi_mean", f"{name}/psmi_std"]
        if has_base:
            header += ["loss", "margin"]
        header.append("flagged")
        keep = np.nonzero(any_scored | known.numpy())[0]
        cols = [keep.tolist(), labels.numpy()[keep].tolist()]  # columns, then rows: no per-cell
        for name in names:  # tensor indexing (that made this loop the slow part of an epoch)
            cols += [scores[name][keep].tolist(), stds[name][keep].tolist()]
        if has_base:
            cols += [loss.numpy()[keep].tolist(), margin.numpy()[keep].tolist()]
        cols.append((self.flagged_epoch >= 0).numpy()[keep].astype(int).tolist())
        rows = zip(*cols)
        atomic_write_csv(os.path.join(self.out_dir, f"epoch_{epoch}.csv"), header, rows)
        fl = self.flagged
        texts = self._texts(trainer, fl)
        atomic_write_csv(
            os.path.join(self.out_dir, "flagged.csv"),
            ["index", "label", "epoch_flagged", "text"],
            [
                [int(i), int(labels[i]), int(self.flagged_epoch[i]), texts.get(int(i)) or ""]
                for i in fl
            ],
        )
        atomic_write_json(os.path.join(self.out_dir, "history.json"), self.history)
        self._write_samples(trainer, new, scores[self._flag_layer()])

    def _write_samples(self, trainer: Trainer, new: np.ndarray, score: np.ndarray) -> None:
        """The newly flagged and the lowest-PSMI samples of this evaluation, for the report
        (``samples.json`` / ``samples.npz``, merged with the earlier evaluations')."""
        ds = self._dataset(trainer)
        shown = [int(i) for i in new] + [int(i) for i in self._lowest(score)]
        if ds is None or not shown:
            return
        write_samples(
            self.out_dir,
            {i: ds[i] for i in shown},
            self._get_input,
            self._get_label,
            describe=samples_describe(self.describe, self.text_key),
            image_shape=self.image_shape,
        )

    # ------------------------------------------------------------------ teardown
    def _remove_hooks(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        if self._logit_handle is not None:
            self._logit_handle.remove()
            self._logit_handle = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._loader = self._loader_src = None  # persistent workers of the eval pass end here

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.num_training_batches == 0:
            raise ValueError(
                "The training dataloader is empty (0 batches), so MemorizationMonitor scored "
                "nothing; check the dataset, limit_train_batches and drop_last."
            )
        maybe_write_report(self, trainer)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._loader = self._loader_src = None
