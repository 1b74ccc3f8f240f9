"""TracIn: per-sample (projected) gradients collected while the model trains.

TracInCP(z, z') = sum_c lr_c <grad l(z; w_c), grad l(z'; w_c)> (Pruthi et al., NeurIPS 2020).
``mode="checkpoints"``: at each checkpoint an extra pass computes the training set's (and the
queries') gradient features at the current weights. ``mode="online"``: the gradients of the actual
training steps, at that step's weights and learning rate, with no extra pass over the training set.
Formulas live in :mod:`lightning_memo.influence`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..capture import (
    add_forward_hook,
    extra_pass,
    layers_key,
    recording_allowed,
    resolve_layers,
    resolve_parameters,
)
from ..data import Accessor, Describe, get_indices, get_labels, make_accessor, make_describer
from ..distributed import gather_rows, gather_stats, world_size
from ..influence.features import GradientFeaturizer
from ..influence.grads import select_parameters
from ..influence.tracin import (
    GradientStore,
    loss_reduction_scale,
    top_k,
    tracin_scores,
    tracin_self_influence,
)
from ..io import (
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    check_writable,
    resolve_output_dir,
    tensorboard_writer,
)
from ..viz import dataset_grid
from .common import (
    default_layers,
    markdown_cell,
    module_per_sample_loss,
    resumed_output_dir,
    sample_texts,
    samples_describe,
    sequential_loader,
    show_progress,
)
from .reports import maybe_write_report, write_samples

__all__ = ["TracIn"]

MODES = ("checkpoints", "online")
N_TOP = 16  # top self-influence samples shown (image grid, text table) and recorded for the report


class TracIn(Callback):
    """TracIn self-influence and train -> query influence, collected during training.

    Results after ``fit``: :attr:`self_influence` ``(N,)``, :attr:`scores` ``(n_query, N)``,
    :meth:`top_k_for`, :attr:`labels` / :attr:`labels_seen` ``(N,)``.

    Args:
        layers: layer names/globs or modules whose parameters are differentiated (default: every
            trainable ``nn.Linear``).
        parameters: parameter names or globs (e.g. ``["head.weight"]``; ``fnmatch`` globs whose
            ``*`` crosses dots, so ``"*lora_*"`` selects the LoRA matrices of a PEFT model) to
            differentiate instead of whole layers. When they are every trainable parameter of
            ``nn.Linear`` layers (LoRA A / B) the hook fast path runs; otherwise the
            ``torch.func`` path (mode="checkpoints" only).
        projection_dim: size of the projected gradient features (LoGra for Linear layers);
            ``None`` for exact gradients.
        mode: ``"checkpoints"`` (TracInCP) or ``"online"`` (original TracIn).
        every_n_epochs: checkpoint every n epochs (``checkpoints="epoch_end"``).
        checkpoints: ``"epoch_end"`` or ``"every_n_steps"`` (with ``every_n_steps``).
        every_n_steps: step interval for ``checkpoints="every_n_steps"``.
        queries: a DataLoader of query samples (e.g. the validation set), with labels.
        loss_fn: ``(module, batch) -> (B,)``; default ``module.per_sample_loss(batch)``.
        loss_reduction: how the training loss reduces the batch (``"mean"`` or ``"sum"``); online
            mode rescales the captured output-gradients by it.
        top_k: proponents / opponents kept per query.
        seed: projection seed.
        store_dtype: dtype of the gradient store; ``store_on_disk``: memory-map it under the output
            folder instead of RAM.
        index_key, label_key: batch accessors (see ``lightning_memo.data``); ``label_key`` also
            reads the query batches.
        input_key: reads the input of a dataset item, for the image grid.
        describe: ``dataset item -> str``: the text shown beside the top self-influence samples
            (TensorBoard table ``tracin/top_self_influence``, ``samples.json``); default: the
            item's ``text_key`` field when items are dicts holding a string there.
        text_key: the dict key of an item's text used when ``describe`` is ``None``.
        mask_key: accepted so every callback takes the same accessors; TracIn does not read it
            (the per-sample loss receives the whole batch, attention mask included).
        image_shape: reshape flat inputs for image grids.
        output_dir: folder of the result files.
        progress: progress bars on checkpoint passes; ``None`` follows the Trainer
            (``enable_progress_bar``).
        report: write / update the run's HTML report (``lightning-memo report``) at fit end.
    """

    def __init__(
        self,
        layers: Any = None,
        *,
        parameters: Optional[Sequence[str]] = None,
        projection_dim: Optional[int] = 1024,
        mode: str = "checkpoints",
        every_n_epochs: int = 1,
        checkpoints: str = "epoch_end",
        every_n_steps: Optional[int] = None,
        queries: Any = None,
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        loss_reduction: str = "mean",
        top_k: int = 10,
        seed: int = 0,
        store_dtype: torch.dtype = torch.float32,
        store_on_disk: bool = False,
        index_key: Accessor = None,
        label_key: Accessor = None,
        input_key: Accessor = None,
        mask_key: Optional[str] = "attention_mask",
        describe: Describe = None,
        text_key: Optional[str] = "text",
        image_shape: Optional[Sequence[int]] = None,
        output_dir: Optional[str] = None,
        progress: Optional[bool] = None,
        report: bool = False,
    ) -> None:
        super().__init__()
        self.write_report = bool(report)  # the run's HTML report at fit end
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use 'checkpoints' or 'online'.")
        if checkpoints not in ("epoch_end", "every_n_steps"):
            raise ValueError(f"checkpoints={checkpoints!r}: use 'epoch_end' or 'every_n_steps'.")
        if checkpoints == "every_n_steps" and (every_n_steps is None or every_n_steps < 1):
            raise ValueError("checkpoints='every_n_steps' needs every_n_steps >= 1.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r}: use an integer >= 1.")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim={projection_dim!r}: use a positive int or None.")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'.")
        if layers is not None and parameters is not None:
            raise ValueError("Pass layers= or parameters=, not both.")
        if isinstance(parameters, str):
            parameters = [parameters]
        self.layers, self.projection_dim, self.mode = layers, projection_dim, mode
        self.parameters = list(parameters) if parameters is not None else None
        self.every_n_epochs, self.checkpoints, self.every_n_steps = (
            every_n_epochs,
            checkpoints,
            every_n_steps,
        )
        self.queries, self.loss_fn, self.loss_reduction = queries, loss_fn, loss_reduction
        self.top_k, self.seed = int(top_k), int(seed)
        self.store_dtype, self.store_on_disk = store_dtype, store_on_disk
        self.index_key, self.label_key, self.input_key = index_key, label_key, input_key
        self._get_index = make_accessor(index_key, "index")
        self._get_label = make_accessor(label_key, "label")
        self._get_input = make_accessor(input_key, "input")
        self.mask_key = mask_key
        self.describe, self.text_key = describe, text_key
        self._describe = make_describer(describe, text_key)
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.output_dir, self.progress = output_dir, progress
        # state
        self.store: Optional[GradientStore] = None
        self.query_grads: List[torch.Tensor] = []
        self._online_self: Optional[torch.Tensor] = None
        self._online_scores: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None  # (N,) int64, meaningful where _labels_seen
        self._labels_seen: Optional[torch.Tensor] = None  # (N,) bool
        self._all_labels_seen = False  # every label read: stop reading them per step
        self._lr_slots: Optional[Tuple[tuple, Dict[str, int]]] = None  # layer -> param group
        # run-time
        self.features: Optional[GradientFeaturizer] = None
        self._targets: Optional[tuple] = None  # (modules, params) of the featurizer
        self.out_dir: Optional[str] = None
        self._batch_idx: Optional[torch.Tensor] = None
        self._pending: Optional[Dict[str, Any]] = None
        self._step_lrs: Optional[Dict[str, float]] = None  # lrs of the last optimizer step

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=layers_key(self.layers if self.parameters is None else self.parameters),
            mode=self.mode,
            projection_dim=self.projection_dim,
        )

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": 1,
            "store": self.store.state_ref() if self.store is not None else None,
            "query_grads": [q.cpu() for q in self.query_grads],
            "online_self": self._online_self,
            "online_scores": self._online_scores,
            "labels": self._labels,
            "labels_seen": self._labels_seen,
            "seed": self.seed,
            "out_dir": self.out_dir,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = dict(state_dict)
        self.out_dir = resumed_output_dir(self.output_dir, self.out_dir, state_dict)

    def _restore(self) -> None:
        st, self._pending = self._pending, None
        if st is None:
            return
        if st.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"The checkpoint's TracIn state was recorded with seed={st['seed']}, this TracIn "
                f"has seed={self.seed}: the projections differ, so the recorded gradients cannot "
                "be combined. Resume with the same seed (or start a fresh TracIn)."
            )
        if st.get("store") is not None:
            store = GradientStore.from_state(st["store"], self.store_dtype)
            if store.dim != self.features.dim or store.layout != self.features.layout:
                raise ValueError(
                    f"The checkpoint's TracIn store has {store.dim} features per sample, this "
                    f"TracIn makes {self.features.dim} (layers / projection_dim changed?). Resume "
                    "with the configuration the checkpoint was recorded with."
                )
            self.store = store
        self.query_grads = list(st.get("query_grads", []))
        for key in ("online_self", "online_scores", "labels", "labels_seen"):
            val = st.get(key)
            if val is not None:
                setattr(self, f"_{key}", val.clone())

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        params = None
        if self.parameters is not None:
            params = select_parameters(pl_module, resolve_parameters(pl_module, self.parameters))
            owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in params}
            modules = {n: pl_module.get_submodule(n) for n in sorted(owners)}
        elif self.layers is None:
            modules = default_layers(pl_module, (nn.Linear,))
        else:
            modules = resolve_layers(pl_module, self.layers)
        self._targets = (modules, params)
        self.features = self._featurizer()
        if self.mode == "online" and not self.features.linear:
            raise ValueError(
                "mode='online' reads the training step's gradients of whole nn.Linear layers; "
                f"got parameters {list(self.features.params)} of "
                f"{[type(m).__name__ for m in modules.values()]}. Use mode='checkpoints' for "
                "other layers or single parameters."
            )
        self.out_dir = resolve_output_dir(trainer, self.output_dir, "tracin", self)
        check_writable(trainer, self.out_dir, "TracIn")

    def _featurizer(self, factored: bool = True) -> GradientFeaturizer:
        modules, params = self._targets
        return GradientFeaturizer(
            modules, self.projection_dim, self.seed, params=params, factored=factored, owner=self
        )

    def _check_factored(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The exact factored store (``[a | g]`` per sample and layer) needs ``(batch,
        features)`` layer inputs; layers fed token sequences ``(batch, T, features)`` (a
        transformer's projections, LoRA matrices) get exact flattened gradients instead. One
        no-grad loss pass on the first training batch tells (an extra pass: invisible to the
        other callbacks, training unchanged)."""
        if self.features.layout is None:
            return
        ndims: Dict[str, int] = {}

        def make_hook(name: str) -> Callable:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if recording_allowed(self) and inputs and isinstance(inputs[0], torch.Tensor):
                    ndims[name] = inputs[0].ndim

            return hook

        handles = [
            add_forward_hook(m, make_hook(n), "observe") for n, m in self.features.modules.items()
        ]
        try:
            with extra_pass(self, pl_module), torch.no_grad():
                batch = next(iter(sequential_loader(trainer)), None)
                if batch is not None:
                    self._loss()(pl_module, trainer.strategy.batch_to_device(batch))
        finally:
            for h in handles:
                h.remove()
        if any(d != 2 for d in ndims.values()):
            self.features = self._featurizer(factored=False)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ds = getattr(trainer.train_dataloader, "dataset", None)
        if ds is None or not hasattr(ds, "__len__"):
            raise TypeError(
                "TracIn needs a map-style training dataset wrapped with IndexedDataset so every "
                "sample keeps its index across epochs and ranks."
            )
        n = len(ds)
        self._check_factored(trainer, pl_module)
        self._restore()
        if self.store is None:
            path = os.path.join(self.out_dir, "store") if self.store_on_disk else None
            self.store = GradientStore(
                n, self.features.dim, self.store_dtype, path, self.features.layout
            )
        if self._labels is None:
            self._labels = torch.zeros(n, dtype=torch.long)
            self._labels_seen = torch.zeros(n, dtype=torch.bool)
        if self._labels_seen is None:  # older checkpoints: -1 meant "no label"
            self._labels_seen = self._labels != -1
        self._all_labels_seen = False
        if self.mode == "online":
            if trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    "mode='online' needs accumulate_grad_batches=1 (it reads each step's "
                    "gradients); use mode='checkpoints'."
                )
            if self._online_self is None:
                self._online_self = torch.zeros(n, dtype=torch.float64)
            self.features.capture.attach()

    def _loss(self) -> Callable[[Any, Any], torch.Tensor]:
        return self.loss_fn or module_per_sample_loss

    def _lrs(self, trainer: Trainer) -> Dict[str, float]:
        """Learning rate of each differentiated layer (from its optimizer parameter group)."""
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        key = tuple(id(g) for g in groups) + tuple(len(g["params"]) for g in groups)
        if self._lr_slots is None or self._lr_slots[0] != key:  # which group holds each layer
            slots: Dict[str, int] = {}
            ids = [{id(p) for p in g["params"]} for g in groups]
            for name, mod in self.features.modules.items():
                for gi, group_ids in enumerate(ids):
                    if any(id(p) in group_ids for p in mod.parameters(recurse=False)):
                        slots[name] = gi
                        break
            self._lr_slots = (key, slots)
        return {name: float(groups[gi]["lr"]) for name, gi in self._lr_slots[1].items()}

    # ------------------------------------------------------------------ online mode
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # a dataset that repeats an index within a batch does so in the first epoch
        check = world_size(trainer.strategy) == 1 and trainer.current_epoch == 0
        idx = get_indices(batch, self._get_index, self.store.num_samples, check_duplicates=check)
        if not self._all_labels_seen:
            try:  # labels only annotate the result files; a loss_fn may not need them
                cpu_idx = idx.cpu()
                self._labels[cpu_idx] = get_labels(batch, self._get_label).cpu()
                self._labels_seen[cpu_idx] = True
                self._all_labels_seen = bool(self._labels_seen.all())
            except ValueError:
                pass
        if self.mode == "online":
            self._batch_idx = idx
            self.features.capture.active = True

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the training step's backward is done: stop recording before other callbacks'
        # on_before_optimizer_step run extra passes (e.g. another online TracIn's queries)
        if self.mode == "online" and self.features is not None:
            self.features.capture.active = False

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        if self.mode == "checkpoints":
            # the lr the interval ending at the next checkpoint was trained with (Lightning steps
            # epoch-level schedulers before on_train_epoch_end / on_train_batch_end)
            self._step_lrs = self._lrs(trainer)
        if self.mode != "online" or self._batch_idx is None:
            return
        cap = self.features.capture
        cap.active = False
        if set(cap.grads) != set(self.features.modules):
            return  # a layer unused in this step
        self.features.set_learning_rates(self._lrs(trainer))
        scale = loss_reduction_scale(self._batch_idx.shape[0], self.loss_reduction)
        # self-influence: squared gradient norms, exact for layers that see one row per sample
        own = self.features.sq_norms_from_linear_io(cap.inputs, cap.grads, scale)
        feats = None
        if self.queries is not None:  # the (B, k) rows, for the train -> query products
            feats = self.features.from_linear_io(dict(cap.inputs), dict(cap.grads), scale)
        cap.clear()
        idx, own_g = gather_rows(trainer.strategy, self._batch_idx, own[:, None])
        self._online_self[idx.cpu()] += own_g[:, 0].cpu()
        if feats is not None:
            idx, feats = gather_rows(trainer.strategy, self._batch_idx, feats)
            q = self._query_features(trainer, pl_module)
            if self._online_scores is None:
                self._online_scores = torch.zeros(q.shape[0], self.store.num_samples)
            self._online_scores[:, idx.cpu()] += self.features.pair_products(
                q.float(), feats.float()
            ).cpu()
        self._batch_idx = None

    # ------------------------------------------------------------------ checkpoints mode
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps: unchanged while gradients accumulate
        recorded = self.store is not None and len(self.store) and self.store.steps[-1] == step
        if (
            self.mode == "checkpoints"
            and self.checkpoints == "every_n_steps"
            and step > 0
            and step % self.every_n_steps == 0
            and not recorded
        ):
            self._checkpoint(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self.mode == "checkpoints"
            and self.checkpoints == "epoch_end"
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self._checkpoint(trainer, pl_module)

    def _featurize(self, trainer: Trainer, pl_module: LightningModule, loader: Any, desc: str):
        """(sample indices, features) of every sample of the training ``loader`` on this rank."""
        from tqdm.auto import tqdm

        idxs, feats = [], []
        show = show_progress(self.progress, trainer)
        with extra_pass(self, pl_module):
            for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
                idxs.append(get_indices(batch, self._get_index, None, check_duplicates=False))
                batch = trainer.strategy.batch_to_device(batch)
                feats.append(self.features(pl_module, batch, self._loss()).detach())
        return torch.cat(idxs), torch.cat(feats)

    def _query_features(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """Query features (n_query, k) at the current weights, in the query loader's order."""
        feats = []
        with extra_pass(self, pl_module):  # inside a training step: other callbacks see nothing
            for batch in self.queries:
                try:
                    get_labels(batch, self._get_label)
                except ValueError as err:
                    raise ValueError(f"The query loader has no labels: {err}") from None
                batch = trainer.strategy.batch_to_device(batch)
                feats.append(self.features(pl_module, batch, self._loss()).detach())
        return torch.cat(feats)

    def _checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.features.set_learning_rates(self._step_lrs or self._lrs(trainer))
        c = self.store.add_checkpoint(1.0, trainer.global_step)  # lr is inside the features
        loader = sequential_loader(trainer)
        idx, feats = self._featurize(trainer, pl_module, loader, "TracIn: train gradients")
        idx, feats = gather_rows(trainer.strategy, idx.to(feats.device), feats)
        self.store.write(c, idx, feats)
        if self.queries is not None:
            self.query_grads.append(self._query_features(trainer, pl_module).cpu())

    # ------------------------------------------------------------------ results
    @property
    def self_influence(self) -> Optional[torch.Tensor]:
        """TracIn self-influence of every training sample: (N,) float64; ``None`` before ``fit``.
        Checkpoints mode: computed from the store at each access."""
        if self.store is None:
            return None
        if self.mode == "online":
            return self._online_self
        return tracin_self_influence(self.store)

    @property
    def scores(self) -> Optional[torch.Tensor]:
        """Influence of every training sample on each query: (n_query, N) float32, rows in the
        query loader's order (positive: proponent); ``None`` without ``queries=`` or before
        ``fit``. Checkpoints mode: computed from the store at each access, so keep the tensor
        rather than reading the property in a loop."""
        if self.queries is None or self.store is None:
            return None
        if self.mode == "online":
            return self._online_scores
        return tracin_scores(self.store, self.query_grads)

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """(N,) int64 labels read from the training batches (merged over ranks at the end of
        ``fit``); 0 where no label was read: see :attr:`labels_seen`. ``None`` before ``fit``."""
        return self._labels

    @property
    def labels_seen(self) -> Optional[torch.Tensor]:
        """(N,) bool: a label was read for the sample (the result files leave the others empty)."""
        return self._labels_seen

    def top_k_for(self, query_index: int, k: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Proponents and opponents (training indices and scores) of one query.

        Raises:
            ValueError: no scores (built without ``queries=``, or before ``fit``).
        """
        scores = self.scores
        if scores is None:
            raise ValueError(
                "TracIn has no scores yet: they are recorded during trainer.fit."
                if self.queries is not None
                else "TracIn was built without queries=; pass a query DataLoader."
            )
        row = scores[query_index]
        pro, opp = top_k(row, k or self.top_k)
        return {
            "proponents": pro.numpy(),
            "proponent_scores": row[pro].numpy(),
            "opponents": opp.numpy(),
            "opponent_scores": row[opp].numpy(),
        }

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.features is not None and self.features.capture is not None:
            self.features.capture.remove()  # checkpoints mode attaches hooks on its first pass
        if self.mode == "checkpoints" and len(self.store) == 0:
            rank_zero_warn("TracIn recorded no checkpoint (check every_n_epochs / every_n_steps).")
            return
        if world_size(trainer.strategy) > 1:  # each rank saw the labels of its own batches only
            merged, seen = self._labels.clone(), self._labels_seen.clone()
            parts = {"labels": self._labels, "seen": self._labels_seen.long()}
            for part in gather_stats(trainer.strategy, parts):
                has = part["seen"].cpu().bool()
                merged = torch.where(has, part["labels"].cpu(), merged)
                seen |= has
            self._labels, self._labels_seen = merged, seen
        if trainer.is_global_zero:
            self._write(trainer)
        maybe_write_report(self, trainer)

    def _write(self, trainer: Trainer) -> None:
        si = self.self_influence.cpu().numpy()
        order = np.argsort(-si, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        labels = self._labels.numpy()
        seen = self._labels_seen.numpy()
        lab = [int(v) if k else "" for v, k in zip(labels.tolist(), seen.tolist())]
        atomic_write_csv(
            os.path.join(self.out_dir, "self_influence.csv"),
            ["index", "label", "self_influence", "rank"],
            [[i, lab[i], float(si[i]), int(rank[i])] for i in range(len(si))],
        )
        if self.queries is not None and self.top_k:
            rows = []
            scores = self.scores
            for q in range(scores.shape[0]):
                pro, opp = top_k(scores[q], self.top_k)
                for r, (p, o) in enumerate(zip(pro.tolist(), opp.tolist())):
                    rows.append([q, r, p, float(scores[q, p]), o, float(scores[q, o])])
            atomic_write_csv(
                os.path.join(self.out_dir, "top_k.csv"),
                ["query", "rank", "proponent", "proponent_score", "opponent", "opponent_score"],
                rows,
            )
        if self.mode == "checkpoints":
            path = os.path.join(self.out_dir, "store.pt")
            atomic_torch_save(
                {
                    "state": self.store.state_ref(),
                    "query_grads": self.query_grads,
                    "projection_dim": self.projection_dim,
                    "seed": self.seed,
                    "layers": list(self.features.modules),
                },
                path,
            )
        atomic_write_json(
            os.path.join(self.out_dir, "config.json"),
            {
                "mode": self.mode,
                "projection_dim": self.projection_dim,
                "seed": self.seed,
                "layers": list(self.features.modules),
                "feature_dim": self.features.dim,
                "checkpoints": len(self.store) if self.mode == "checkpoints" else None,
                "missing_samples": self.store.missing() if self.mode == "checkpoints" else None,
            },
        )
        ds = getattr(trainer.train_dataloader, "dataset", None)
        top = [int(i) for i in order[:N_TOP]] if ds is not None else []
        items = {i: ds[i] for i in top}
        if items:
            write_samples(
                self.out_dir,
                items,
                self._get_input,
                self._get_label,
                describe=samples_describe(self.describe, self.text_key),
                image_shape=self.image_shape,
                merge=False,  # written once, at the end of fit: no sample of an earlier run stays
            )
        writer = tensorboard_writer(trainer)
        if writer is not None:
            step = trainer.global_step
            writer.add_histogram("tracin/self_influence", si, step)
            texts = sample_texts(self._describe, list(items.values()), "TracIn")
            text_col = any(t is not None for t in texts)
            head = "| rank | index | label | self-influence |" + (" text |" if text_col else "")
            rows = [head, "|---" * (5 if text_col else 4) + "|"]
            for r, (i, t) in enumerate(zip(top, texts)):
                cell = f" {markdown_cell(t)} |" if text_col else ""
                rows.append(f"| {r} | {i} | {lab[i]} | {si[i]:.4g} |{cell}")
            if top:
                writer.add_text("tracin/top_self_influence", "\n".join(rows), step)
            grid = dataset_grid(
                list(items.values()), self._get_input, [str(lab[i]) for i in top], self.image_shape
            )
            if grid is not None:
                writer.add_image("tracin/top_self_influence", grid, step)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exc: BaseException
    ) -> None:
        if self.features is not None and self.features.capture is not None:
            self.features.capture.remove()
