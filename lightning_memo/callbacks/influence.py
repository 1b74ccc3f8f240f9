"""InfluenceAnalysis: influence functions at the end of training (exact, CG, Arnoldi, K-FAC,
EK-FAC and the other methods of :data:`lightning_memo.influence.registry.METHODS`), or on demand
for a trained model with :meth:`InfluenceAnalysis.run`.

score(q, z) = grad l(q)^T (H + damping I)^{-1} grad l(z): positive = proponent. The formulas live
in :mod:`lightning_memo.influence.methods`; this file decides which data, which ranks, which files.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..capture import extra_pass, layers_key, resolve_layers, resolve_parameters
from ..data import Accessor, get_indices, get_labels, make_accessor
from ..distributed import gather_rows, world_size
from ..influence.features import GradientFeaturizer
from ..influence.grads import FactoredGrads, select_parameters
from ..influence.methods import (
    FitContext,
    InfluenceMethod,
    check_damping,
    param_checksum,
    query_matrix,
    train_pass,
)
from ..influence.registry import (
    METHODS,
    check_method,
    default_layer_types,
    make_method,
    method_options,
)
from ..influence.tracin import top_k as top_k_of
from ..io import atomic_torch_save, check_writable, resolve_output_dir
from .common import (
    RankShard,
    batch_mask,
    default_forward,
    default_layers,
    module_per_sample_loss,
    resumed_output_dir,
    sequential_loader,
    show_progress,
)
from .reports import maybe_write_report, write_influence_results

__all__ = ["InfluenceAnalysis"]

#: result tensors up to this many entries are kept in ``state_dict`` (else only their shape)
MAX_STATE_NUMEL = 1_000_000
#: the callback's settings that go to the methods that take them (see ``method_options``)
_SHARED_OPTIONS = ("damping", "arnoldi_dim", "arnoldi_k", "fisher", "max_examples", "seed")


class InfluenceAnalysis(Callback):
    """Influence of every training sample on queries, self-influence and top-k proponents /
    opponents, computed when training ends (``on_fit_end``) or with :meth:`run` (influence
    functions: Koh & Liang, ICML 2017; the methods' papers are cited in their classes).

    Args:
        method: ``"ekfac"``, ``"kfac"``, ``"arnoldi"``, ``"exact"`` (full Hessian, small heads),
            ``"cg"`` (conjugate gradients on Hessian-vector products), ``"relatif"`` (on
            ``relatif_base``), ``"randproj"``, ``"representer"``, ``"representer_lje"``,
            ``"boundary"`` (self-influence only) or ``"gex"``.
        layers: layer names / globs / modules whose parameters are differentiated (default: every
            trainable ``nn.Linear``, plus ``nn.Conv2d`` for K-FAC / EK-FAC and randproj).
        parameters: parameter names or globs (e.g. ``["net.4.*"]``; ``fnmatch`` globs whose ``*``
            crosses dots, so ``"*lora_*"`` selects the LoRA matrices of a PEFT model) to
            differentiate instead of whole layers (K-FAC / EK-FAC need every parameter of the
            layers they touch: LoRA A / B are whole bias-free ``nn.Linear`` layers).
        train: training DataLoader to score (default: the Trainer's, read sequentially).
        queries: query DataLoader with labels (default: the Trainer's validation loader, if any).
        hessian_data: DataLoader for the curvature (default: the first ``max_examples`` training
            samples).
        damping: lambda > 0; ``None``: 0.1 x mean eigenvalue (per layer for K-FAC).
        arnoldi_dim, arnoldi_k: Krylov iterations and eigenpairs kept (``method="arnoldi"``).
        fisher: ``"true"`` (labels sampled from the model) or ``"empirical"`` (K-FAC / EK-FAC).
        max_examples: samples used to fit the curvature.
        top_k: proponents / opponents kept per query (``top_k.csv``, :meth:`top_k_for`).
        loss_fn: ``(module, batch) -> (B,)``; default ``module.per_sample_loss(batch)``.
        output_fn: ``(module, batch) -> logits (B, C)`` for the true Fisher; default
            ``module(inputs)`` with the input accessor, or ``module(**batch)`` without the index /
            label keys for a dict batch with an attention mask (``mask_key``).
        index_key, label_key, input_key: batch accessors (see ``lightning_memo.data``);
            ``label_key`` also reads the query batches.
        mask_key: dict key of the padding mask of token batches (K-FAC statistics per token).
        image_shape: reshape flat inputs for image grids.
        n_show: queries drawn in the TensorBoard image grid (or listed in its text table).
        output_dir: result folder (default ``<log_dir>/lightning_memo/influence``).
        cache: reuse saved factors / scores when the configuration and the weights are unchanged.
        run_on_fit_end: run automatically when ``trainer.fit`` ends.
        progress: progress bars; ``None`` follows the Trainer (``enable_progress_bar``).
        report: write / update the run's HTML report (``lightning-memo report``) at fit end.
        seed: Arnoldi start vector, Fisher label sampling, projections, ensembles.
        relatif_base: the curvature under ``method="relatif"``.
        method_kwargs: further options of the method (e.g. ``{"num_ens": 8}`` for gex,
            ``{"projection_dim": 1024}`` for randproj, ``{"l2": 1e-3}`` for representer); an
            option the method does not take is an error naming its options.

    Attributes (after a run):
        self_influence: (N,) float64, by sample index.
        hinv_norm: (N,) float64 ``||(H + lambda I)^{-1} g||`` (NaN without a Hessian).
        scores: (n_query, N) influence of each training sample on each query, or ``None``.
        labels: (N,) int64 training labels (-1 where a batch had none).
        estimator: the fitted :class:`~lightning_memo.influence.methods.InfluenceMethod`.
        config: the resolved configuration of the run (the cache key, saved as config.json).
        reused: ``{"factors": bool, "scores": bool}``; out_dir: the result folder.
    """

    def __init__(
        self,
        method: str = "ekfac",
        *,
        layers: Any = None,
        parameters: Optional[Sequence[str]] = None,
        train: Any = None,
        queries: Any = None,
        hessian_data: Any = None,
        damping: Optional[float] = None,
        arnoldi_dim: int = 200,
        arnoldi_k: int = 50,
        fisher: str = "true",
        max_examples: int = 1000,
        top_k: int = 10,
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        output_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        index_key: Accessor = None,
        label_key: Accessor = None,
        input_key: Accessor = None,
        mask_key: Optional[str] = "attention_mask",
        image_shape: Optional[Sequence[int]] = None,
        n_show: int = 4,
        output_dir: Optional[str] = None,
        cache: bool = True,
        run_on_fit_end: bool = True,
        progress: Optional[bool] = None,
        report: bool = False,
        seed: int = 0,
        relatif_base: str = "ekfac",
        method_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.write_report = bool(report)  # the run's HTML report at fit end
        if method not in METHODS:
            raise ValueError(f"method={method!r}: use one of {list(METHODS)}.")
        if layers is not None and parameters is not None:
            raise ValueError("Pass layers= or parameters=, not both.")
        if isinstance(parameters, str):
            parameters = [parameters]
        if max_examples < 1:
            raise ValueError(f"max_examples={max_examples}: use a positive number of samples.")
        check_damping(damping)  # every method: a typo fails now, not after training
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher={fisher!r}: use 'true' or 'empirical'.")
        self.method, self.layers, self.damping = method, layers, damping
        self.parameters = list(parameters) if parameters is not None else None
        self.train, self.queries, self.hessian_data = train, queries, hessian_data
        self.arnoldi_dim, self.arnoldi_k, self.fisher = arnoldi_dim, arnoldi_k, fisher
        self.max_examples, self.top_k, self.seed = int(max_examples), int(top_k), int(seed)
        self.relatif_base = relatif_base
        self.method_kwargs = dict(method_kwargs or {})
        check_method(method, **self._method_options())  # names and values of every option
        self.loss_fn, self.output_fn = loss_fn, output_fn
        self.index_key, self.label_key, self.input_key = index_key, label_key, input_key
        self._get_index = make_accessor(index_key, "index")
        self._get_label = make_accessor(label_key, "label")
        self._get_input = make_accessor(input_key, "input")
        self.mask_key = mask_key
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.n_show, self.output_dir, self.cache = n_show, output_dir, cache
        self.run_on_fit_end, self.progress = run_on_fit_end, progress
        # results
        self.self_influence: Optional[torch.Tensor] = None  # (N,) float64
        self.hinv_norm: Optional[torch.Tensor] = None  # (N,) ||(H + lambda)^-1 g||: RelatIF
        self.scores: Optional[torch.Tensor] = None  # (n_query, N)
        self.labels: Optional[torch.Tensor] = None  # (N,) int64
        self.config: Optional[Dict[str, Any]] = None
        self.estimator: Optional[InfluenceMethod] = None
        self.reused: Dict[str, bool] = {"factors": False, "scores": False}
        self.out_dir: Optional[str] = None
        self._ctx: Optional[Dict[str, Any]] = None  # what group_influence needs after run()

    def _method_options(self) -> Dict[str, Any]:
        """The options the method gets: the callback's shared settings that it takes (e.g.
        ``arnoldi_k`` only for Arnoldi), then ``method_kwargs`` (checked by the registry)."""
        relatif = self.method == "relatif"
        accepted = method_options(self.method, self.relatif_base if relatif else None)
        opts = {k: getattr(self, k) for k in _SHARED_OPTIONS if k in accepted}
        if relatif:
            opts["relatif_base"] = self.relatif_base
        return {**opts, **self.method_kwargs}

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method,
            layers=layers_key(self.layers if self.parameters is None else self.parameters),
            output_dir=self.output_dir,
        )

    def state_dict(self) -> Dict[str, Any]:
        """What the analysis computed: method, configuration, whether it ran, the shapes of the
        results and the result tensors themselves up to ``MAX_STATE_NUMEL`` entries each."""
        results = {
            "self_influence": self.self_influence,
            "hinv_norm": self.hinv_norm,
            "scores": self.scores,
            "labels": self.labels,
        }
        results = {k: v for k, v in results.items() if v is not None}
        return {
            "version": 1,
            "method": self.method,
            "config": self.config,
            "ran": self.self_influence is not None,
            "shapes": {k: list(v.shape) for k, v in results.items()},
            "results": {k: v for k, v in results.items() if v.numel() <= MAX_STATE_NUMEL},
            "reused": dict(self.reused),
            "out_dir": self.out_dir,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys, e.g. of older versions, are skipped)."""
        for key, val in state.get("results", {}).items():
            if key in ("self_influence", "hinv_norm", "scores", "labels"):
                setattr(self, key, val)
        if state.get("config") is not None:
            self.config = dict(state["config"])
        self.reused = dict(state.get("reused", self.reused))
        self.out_dir = resumed_output_dir(self.output_dir, self.out_dir, state)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.out_dir = resolve_output_dir(trainer, self.output_dir, "influence", self)  # all ranks
        if stage == "fit" and self.run_on_fit_end:  # fail now, not after training
            check_writable(trainer, self.out_dir, "InfluenceAnalysis")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run_on_fit_end:
            self.run(trainer, pl_module)
        maybe_write_report(self, trainer)

    # ------------------------------------------------------------------ the analysis
    def run(
        self, trainer: Trainer, model: LightningModule, train: Any = None, queries: Any = None
    ) -> InfluenceAnalysis:
        """Fit the method, then self-influence, scores and top-k for ``model`` as it is now.

        Call it on every rank under DDP. ``train`` / ``queries`` override the constructor's.
        """
        if self.out_dir is None:
            self.out_dir = resolve_output_dir(trainer, self.output_dir, "influence")
        self.reused = {"factors": False, "scores": False}
        train = train if train is not None else self.train
        if train is None:
            train = trainer.train_dataloader
        if train is None:
            raise ValueError(
                "No training data to score: pass train= (a DataLoader over an IndexedDataset) to "
                "InfluenceAnalysis or to run(), or call run() after trainer.fit."
            )
        queries = queries if queries is not None else self.queries
        if queries is None:
            val = trainer.val_dataloaders
            queries = val[0] if isinstance(val, (list, tuple)) and val else val
        ds = getattr(train, "dataset", None)
        if ds is None or not hasattr(ds, "__len__"):
            raise TypeError(
                "InfluenceAnalysis needs a map-style training dataset wrapped with IndexedDataset."
            )
        n = len(ds)
        modules, params = self._targets(model)
        feats = GradientFeaturizer(
            modules, projection_dim=None, factored=False, params=params, owner=self
        )
        loss = self.loss_fn or module_per_sample_loss
        show = show_progress(self.progress, trainer)

        def bar(desc: str) -> Callable[[Iterable[Any]], Iterable[Any]]:
            from tqdm.auto import tqdm

            return lambda it: tqdm(it, desc=f"Influence ({self.method}): {desc}", leave=False,
                                   disable=not show)  # fmt: skip

        uses_gradients = True

        def grad_fn(batch: Any) -> Any:
            batch = trainer.strategy.batch_to_device(batch)
            if not uses_gradients:
                return batch
            grads = feats.grad_dict(model, batch, loss, lazy=True)
            if isinstance(grads, FactoredGrads):  # hook path: formed only where a method reads
                return grads
            return {k: v.detach() for k, v in grads.items()}

        config = self._config(modules, feats, n)
        with extra_pass(self, model):
            est = self._fit(trainer, model, modules, feats, loss, train, config, bar)
            est.check_model(feats.params)
            self.estimator = est
            uses_gradients = est.uses_gradients
            q_rows = None
            if queries is not None and est.has_scores:
                self._check_query_labels(queries)
                q_rows = query_matrix(est, grad_fn, queries, bar("query gradients"))
            cached = self._load_scores(config, q_rows)
            if cached is None:
                shard = sequential_loader(trainer, train)
                out = train_pass(
                    est,
                    grad_fn,
                    shard,
                    n,
                    index_fn=lambda b: get_indices(b, self._get_index, n, check_duplicates=False),
                    query_rows=q_rows,
                    want_norm=est.uses_gradients,
                    progress=bar("train gradients"),
                )
                cached = self._gather(trainer, out, q_rows is not None)
                self._save_scores(trainer, config, cached, q_rows)
            self._ctx = dict(
                trainer=trainer, model=model, grad_fn=grad_fn, queries=queries, train=train,
                n=n, params=feats.params, loss=loss,
            )  # fmt: skip
            self.self_influence = cached["self_influence"]
            self.hinv_norm = cached["hinv_norm"]
            self.scores = cached.get("scores")
        self.labels = self._labels(train, n)
        self.config = config
        if trainer.is_global_zero:
            self._write(trainer, config, train, queries)
        return self

    # ------------------------------------------------------------------ pieces
    def _targets(self, model: nn.Module) -> tuple:
        """``(modules, params)``: the layers and (with ``parameters=``) the parameters
        differentiated; ``params`` is ``None`` for whole layers."""
        if self.parameters is not None:
            params = select_parameters(model, resolve_parameters(model, self.parameters))
            owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in params}
            return {n: model.get_submodule(n) for n in sorted(owners)}, params
        if self.layers is None:
            kinds = default_layer_types(self.method, self.relatif_base)
            return default_layers(model, kinds), None
        return resolve_layers(model, self.layers), None

    def _config(self, modules: Dict[str, nn.Module], feats: GradientFeaturizer, n: int) -> dict:
        config = {
            "method": self.method,
            "layers": _layers_used(self.method, modules),
            "damping": self.damping,
            "arnoldi_dim": self.arnoldi_dim if self.method == "arnoldi" else None,
            "arnoldi_k": self.arnoldi_k if self.method == "arnoldi" else None,
            "fisher": self.fisher if self.method in ("kfac", "ekfac", "relatif") else None,
            "relatif_base": self.relatif_base if self.method == "relatif" else None,
            "method_kwargs": {k: repr(v) for k, v in sorted(self.method_kwargs.items())},
            "max_examples": self.max_examples,
            "seed": self.seed,
            "num_train": n,
            "num_parameters": feats.total,
            "checksum": param_checksum(feats.params),
        }
        if self.parameters is not None:
            config["parameters"] = list(feats.params)
        return config

    def _hessian_loader(self, trainer: Trainer, train: Any, shard: bool) -> Any:
        """The curvature data: ``hessian_data`` or the first ``max_examples`` training samples;
        split over ranks when the method's statistics sum (``fit_shardable``), whole on every
        rank otherwise."""
        src = self.hessian_data if self.hessian_data is not None else train
        ds = src.dataset
        keep = list(range(min(len(ds), self.max_examples)))
        sub = Subset(ds, keep)
        sampler = None
        if shard and world_size(trainer.strategy) > 1:
            sampler = RankShard(len(sub), trainer.global_rank, trainer.world_size)
        return DataLoader(
            sub,
            batch_size=src.batch_size or 64,
            sampler=sampler,
            shuffle=False,
            collate_fn=src.collate_fn,
        )

    def _fit(self, trainer, model, modules, feats, loss, train, config, bar) -> InfluenceMethod:
        est = make_method(self.method, modules, **self._method_options())
        if self.parameters is not None and est.whole_layers:
            _check_whole_layers(self.method, modules, feats.params)
        path = os.path.join(self.out_dir, "factors.pt")
        if self.cache and est.cacheable and os.path.exists(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors, dicts
            if saved.get("config") == config:
                est.load_state_dict(saved["state"])
                self.reused["factors"] = True
                return est
        if est.fit_data == "train":  # e.g. a last-layer refit: every rank sees all samples
            data = DataLoader(
                train.dataset, batch_size=train.batch_size or 64, collate_fn=train.collate_fn
            )
        else:
            data = self._hessian_loader(trainer, train, shard=est.fit_shardable)
        sharded = est.fit_shardable and world_size(trainer.strategy) > 1

        def reduce(stats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in stats.items()}

        context = FitContext(
            output_fn=self.output_fn or self._default_output,
            mask_fn=self._mask,
            reduce=reduce if sharded else None,
            progress=bar("fitting the curvature"),
            input_fn=self._get_input,
            label_fn=lambda b: get_labels(b, self._get_label),
            index_fn=self._get_index,
        )
        est.fit(model, feats.params, loss, _OnDevice(data, trainer.strategy), context)
        if trainer.is_global_zero and est.cacheable:
            atomic_torch_save({"config": config, "state": est.state_dict()}, path)
        return est

    def _default_output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits for the true Fisher: ``module(**inputs)`` for a dict batch with an attention
        mask (a Hugging Face style forward; index / label keys left out), else
        ``module(input)``; the ``logits`` of a ``ModelOutput``."""
        if self._mask(batch) is not None:
            out = default_forward(model, batch, [self.index_key, self.label_key])
        else:
            out = model(self._get_input(batch))
        return out if isinstance(out, torch.Tensor) else getattr(out, "logits", out)

    def _mask(self, batch: Any) -> Optional[torch.Tensor]:
        """The padding mask of a dict batch (``mask_key``), for token-level statistics."""
        return batch_mask(batch, self.mask_key)

    def _check_query_labels(self, queries: Any) -> None:
        for batch in queries:
            try:
                get_labels(batch, self._get_label)
            except ValueError as err:
                raise ValueError(f"The query loader has no labels: {err}") from None
            return

    def _gather(self, trainer: Trainer, out: Dict[str, torch.Tensor], with_scores: bool) -> dict:
        """Merge every rank's share (rows by sample index) into full (N,) / (n_query, N)."""
        idx = torch.nonzero(out["seen"]).reshape(-1)
        nan = torch.full((out["seen"].shape[0],), float("nan"), dtype=torch.float64)
        cols = [out["self_influence"][idx, None], out.get("hinv_norm", nan)[idx, None]]
        if with_scores:
            cols.append(out["scores"][:, idx].T.double())
        vals = torch.cat(cols, dim=1)
        dev = trainer.strategy.root_device
        idx, vals = gather_rows(trainer.strategy, idx.to(dev), vals.to(dev))
        idx, vals = idx.cpu(), vals.cpu()
        n = out["seen"].shape[0]
        full = torch.zeros(n, vals.shape[1], dtype=torch.float64)
        full[idx] = vals
        missing = n - int(torch.unique(idx).numel())
        if missing:
            rank_zero_warn(f"InfluenceAnalysis: {missing} of {n} training samples were not scored.")
        res = {"self_influence": full[:, 0].clone(), "hinv_norm": full[:, 1].clone()}
        if with_scores:
            res["scores"] = full[:, 2:].T.to(out["scores"].dtype).contiguous()
        return res

    @staticmethod
    def _query_key(q_rows: Optional[torch.Tensor]) -> Optional[list]:
        """Fingerprint of the preconditioned queries: (count, sum, sum of squares)."""
        if q_rows is None:
            return None
        q = q_rows.double()
        return [int(q.shape[0]), float(q.sum()), float(q.square().sum())]

    def _load_scores(self, config: dict, q_rows: Optional[torch.Tensor]) -> Optional[dict]:
        path = os.path.join(self.out_dir, "scores.pt")
        if not (self.cache and os.path.exists(path)):
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors, dicts
        want, got = self._query_key(q_rows), saved.get("queries")
        if saved.get("config") != config or (want is None) != (got is None):
            return None
        if want is not None and not np.allclose(want, got, rtol=1e-6, atol=0):
            return None
        self.reused["scores"] = True
        return saved["results"]

    def _save_scores(
        self, trainer: Trainer, config: dict, results: dict, q_rows: Optional[torch.Tensor]
    ) -> None:
        if not trainer.is_global_zero:
            return
        saved = {"config": config, "queries": self._query_key(q_rows), "results": results}
        atomic_torch_save(saved, os.path.join(self.out_dir, "scores.pt"))

    def _labels(self, train: Any, n: int) -> torch.Tensor:
        labels = torch.full((n,), -1, dtype=torch.long)
        for batch in DataLoader(train.dataset, batch_size=256, collate_fn=train.collate_fn):
            try:
                idx = get_indices(batch, self._get_index, n, check_duplicates=False)
                labels[idx.cpu()] = get_labels(batch, self._get_label).reshape(-1).cpu()
            except ValueError:
                break
        return labels

    # ------------------------------------------------------------------ results
    def group_influence(
        self,
        groups: Any,
        order: int = 1,
        renormalize: bool = False,
        query_curvature: bool = False,
        allow_overlap: bool = False,
    ) -> torch.Tensor:
        """Predicted change of each query's loss when each group of training samples is removed
        (Basu et al., ICML 2020): ``(n_groups, n_query)``, positive = the group is a proponent.

        Args:
            groups: list of index lists, or an ``(N,)`` label / metadata column (one group per
                value). order: 1 (sum of individual influences) or 2 (with the pairwise term;
                ``method="exact"`` or ``"cg"`` only). See
                :func:`lightning_memo.influence.group.group_influence` for the other options.
        """
        from ..influence.group import group_influence

        if self._ctx is None:
            raise RuntimeError("Run the analysis first (trainer.fit or run()), with queries=.")
        c = self._ctx
        if c["queries"] is None:
            raise ValueError("group_influence needs queries: pass queries= to InfluenceAnalysis.")
        tr = c["train"]
        full = DataLoader(tr.dataset, batch_size=tr.batch_size or 64, collate_fn=tr.collate_fn)
        n = c["n"]
        model = c["model"]
        self._check_unchanged()
        with extra_pass(self, model):
            out = group_influence(
                self.estimator,
                c["grad_fn"],
                _OnDevice(c["queries"], c["trainer"].strategy),
                _OnDevice(full, c["trainer"].strategy),
                groups,
                index_fn=lambda b: get_indices(b, self._get_index, n, check_duplicates=False),
                num_train=n,
                order=order,
                model=model,
                params=c["params"],
                loss_fn=c["loss"],
                renormalize=renormalize,
                query_curvature=query_curvature,
                allow_overlap=allow_overlap,
            )
        return out

    def _check_unchanged(self) -> None:
        """Refuse to use fitted state (curvature, scores) once the model's weights changed."""
        if self._ctx is None or self.estimator is None:
            return
        try:
            self.estimator.check_model(self._ctx["params"])
        except RuntimeError as err:
            raise RuntimeError(
                f"{err} InfluenceAnalysis: call run(trainer, model) again to refit the curvature "
                "and rescore before group_influence / top_k_for."
            ) from None

    def top_k_for(self, query_index: int, k: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Proponents and opponents (training indices and scores) of one query."""
        if self.scores is None:
            raise ValueError("No scores: run the analysis with a query loader (queries=).")
        self._check_unchanged()
        row = self.scores[query_index]
        pro, opp = top_k_of(row, k or self.top_k)
        return {
            "proponents": pro.numpy(),
            "proponent_scores": row[pro].numpy(),
            "opponents": opp.numpy(),
            "opponent_scores": row[opp].numpy(),
        }

    def _write(self, trainer: Trainer, config: dict, train: Any, queries: Any) -> None:
        write_influence_results(self, trainer, config, train, queries)


def _layers_used(method: str, modules: Dict[str, nn.Module]) -> Any:
    """The layers a method differentiates or reads (for config.json)."""
    if method == "boundary":
        return None  # input gradients only
    if method.startswith("representer"):
        return "the last nn.Linear (the model's output layer)"
    return list(modules)


def _check_whole_layers(
    method: str, modules: Dict[str, nn.Module], params: Dict[str, torch.Tensor]
) -> None:
    """Methods that factor whole layers (K-FAC, EK-FAC): ``parameters=`` must select every
    trainable parameter of each layer it touches."""
    chosen = {id(p) for p in params.values()}
    for name, mod in modules.items():
        own = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if p.requires_grad]
        missing = [f"{name}.{pn}" for pn, p in own if id(p) not in chosen]
        if missing:
            raise ValueError(
                f"method={method!r} factors whole layers, but parameters= selects only part of "
                f"layer {name!r} (missing {missing}). Select all of its parameters (e.g. "
                f"'{name}.*'), use layers=, or use method='arnoldi' / 'exact' for single "
                "parameters."
            )


class _OnDevice:
    """Re-iterable view of a loader whose batches are moved to the strategy's device."""

    def __init__(self, loader: Any, strategy: Any) -> None:
        self.loader, self.strategy = loader, strategy

    def __iter__(self):
        for batch in self.loader:
            yield self.strategy.batch_to_device(batch)

    def __len__(self) -> int:
        return len(self.loader)
