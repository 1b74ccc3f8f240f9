"""ConceptErasure: fit LEACE erasers on chosen layers and install them as forward hooks.

Owns *when* erasers are fitted and installed, what is logged and what the checkpoint keeps; the
formulas live in :mod:`lightning_memo.leace`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..capture import (
    POOLINGS,
    LayerSpec,
    OutputKey,
    PoolingSpec,
    _StopForward,
    add_forward_hook,
    add_input_hook,
    check_pooling,
    extra_pass,
    is_input_layer,
    layer_pooling,
    layers_key,
    pool,
    pooling_config,
    recording_allowed,
    replace_output,
    resolve_layers,
    select_output,
)
from ..data import Accessor, make_accessor
from ..distributed import gather_rows, gather_stats, world_size
from ..io import atomic_torch_save, atomic_write_json, check_writable, resolve_output_dir
from ..leace import LeaceEraser, LeaceFitter, edit_norm
from ..probe import probe_accuracy, probe_r2
from .common import (
    batch_mask,
    checked_forward,
    default_forward,
    resumed_output_dir,
    sequential_loader,
    show_progress,
)
from .reports import maybe_write_report

__all__ = ["ConceptErasure"]

WHEN = ("fit_start", "every_epoch", "fit_end")
FIT_POOLINGS = ("all",) + tuple(p for p in POOLINGS if p != "flatten")  # erasure acts on d


class ConceptErasure(Callback):
    """LEACE concept erasure on chosen layers (Belrose et al., NeurIPS 2023).

    Fits the closed-form eraser r(x) = x - W^+ P W (x - mu) on each layer's activations and
    installs it as a forward hook that replaces the layer output by its erased version during
    training, validation, test and predict, so no linear classifier recovers the concept from it.

    Hugging Face models: ``layers="encoder.layer.*"`` finds the blocks of a wrapped model (also
    under PEFT's ``base_model.model.``), tuple / ``ModelOutput`` outputs are erased at their
    hidden states (``output_key=``) and put back in place, ``"classifier:input"`` erases what a
    layer receives, and ``pooling`` may differ per layer.

    Args:
        layers: layer names (globs allowed: ``*`` within one dotted segment, ``**`` across; a
            name may be the dotted ending of the full name) or modules; ``"<name>:input"``
            erases the layer's input (a forward pre-hook on its first argument) instead of its
            output.
        concept: how to read the concept from a batch (dict key, tuple position or callable);
            default: the label (read with ``label_key``). Integer ``(B,)`` = classes; float
            ``(B, k)`` = one-hot or continuous (``z_dim=k``); a float ``(B,)`` needs ``z_dim=1``.
        z_dim: concept dimension; ``None``: inferred (classes grow as they appear; float ``(B, k)``
            gives k).
        fit_on: ``"train"`` (the Trainer's training set, sequential) or a DataLoader.
        when: ``"fit_start"`` (fit once on the initial model, erase for the whole run),
            ``"every_epoch"`` (concept scrubbing: refit on each epoch's training activations,
            apply from the next epoch) or ``"fit_end"`` (fit at the end, installed for inference).
        pooling: which positions of a ``(B, T, d)`` output are used to fit: ``"all"`` (every real
            token, mask-aware), or ``"mean"``, ``"last"``, ``"first"``, a callable (one row per
            sample). Erasure is applied to every position. ``(B, C, H, W)`` maps are erased over
            channels at every pixel. A dict gives each layer its own (``{"encoder.layer.1":
            "first"}``, keys as in ``layers``; layers without a key use ``"all"``).
        method: ``"leace"`` or ``"orth"``.
        shrinkage, constrain_cov_trace, svd_tol: see :class:`~lightning_memo.LeaceFitter`.
        output_key: which part of a layer output that is a tuple or a ``ModelOutput`` is erased:
            ``None`` (default) the hidden states (``last_hidden_state``, else the first tensor),
            an int position or a str key; the other parts are passed on unchanged. Tensor
            outputs are erased as they are.
        output_index: deprecated name of ``output_key`` (a ``DeprecationWarning``).
        sequential: fit layers one after another, each with the layers before it already erased
            (one pass per layer), so every layer's guarantee holds in the erased network.
        max_batches: limit the batches of each fitting pass.
        index_key, label_key: batch accessors (see ``lightning_memo.data``): ``label_key`` reads
            the concept when ``concept`` is ``None``; string keys of both are left out of the
            default forward's ``module(**batch)``. Sample indices are not needed for erasure.
        input_key: accepted so every callback takes the same accessors; ConceptErasure shows no
            inputs and calls the model with ``forward_fn``, so it does not read it.
        mask_key: dict key of the attention mask.
        forward_fn: ``(module, batch) -> output`` of the fitting passes.
        probe: log linear-probe accuracy for the concept before/after erasure at each fit.
        probe_samples: rows kept per layer for the probe.
        output_dir: folder of ``erasers.pt`` and ``config.json``.
        progress: progress bars on fitting passes; ``None`` follows the Trainer
            (``enable_progress_bar``).
        report: write / update the run's HTML report (``lightning-memo report``) at fit end.
    """

    def __init__(
        self,
        layers: LayerSpec,
        *,
        concept: Accessor = None,
        z_dim: Optional[int] = None,
        fit_on: Union[str, Any] = "train",
        when: str = "fit_start",
        pooling: PoolingSpec = "all",
        method: str = "leace",
        shrinkage: bool = True,
        constrain_cov_trace: bool = True,
        svd_tol: float = 0.01,
        output_key: OutputKey = None,
        sequential: bool = True,
        max_batches: Optional[int] = None,
        index_key: Accessor = None,
        label_key: Accessor = None,
        input_key: Accessor = None,
        mask_key: Optional[str] = "attention_mask",
        forward_fn: Optional[Callable[[LightningModule, Any], Any]] = None,
        probe: bool = True,
        probe_samples: int = 4096,
        output_dir: Optional[str] = None,
        progress: Optional[bool] = None,
        report: bool = False,
        output_index: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.write_report = bool(report)  # the run's HTML report at fit end
        if output_index is not None:
            if output_key is not None:
                raise ValueError(
                    f"output_index={output_index!r} and output_key={output_key!r}: pass "
                    "output_key= only (output_index= is its deprecated name)."
                )
            warnings.warn(
                "ConceptErasure(output_index=) is deprecated and will be removed in the next "
                "release: pass output_key= (an int position or a str key of the layer output).",
                DeprecationWarning,
                stacklevel=2,
            )
            output_key = output_index
        if output_key is not None and not isinstance(output_key, (int, str)):
            raise TypeError(f"output_key={output_key!r}: use an int position, a str key or None.")
        if when not in WHEN:
            raise ValueError(f"when={when!r}: use one of {', '.join(WHEN)}.")
        pooling = check_pooling(pooling, FIT_POOLINGS)
        if method not in ("leace", "orth"):
            raise ValueError(f"method={method!r}: use 'leace' or 'orth'.")
        if fit_on != "train" if isinstance(fit_on, str) else not hasattr(fit_on, "__iter__"):
            raise ValueError(f"fit_on={fit_on!r}: use 'train' or a DataLoader.")
        if z_dim is not None and z_dim < 1:
            raise ValueError(f"z_dim={z_dim!r}: use a positive integer or None.")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches!r}: use a positive integer or None.")
        if isinstance(layers, (list, tuple)) and not layers:
            raise ValueError("layers=[] is empty: name at least one layer to erase.")
        self.layers, self.z_dim, self.fit_on, self.when = layers, z_dim, fit_on, when
        self.pooling, self.method, self.shrinkage = pooling, method, shrinkage
        self.constrain_cov_trace, self.svd_tol = constrain_cov_trace, svd_tol
        self.output_key, self.sequential, self.max_batches = output_key, sequential, max_batches
        self.mask_key, self.forward_fn = mask_key, forward_fn
        self.concept = concept
        self.index_key, self.label_key, self.input_key = index_key, label_key, input_key
        self._get_concept = make_accessor(concept if concept is not None else label_key, "label")
        self.probe, self.probe_samples = probe, int(probe_samples)
        self.output_dir, self.progress = output_dir, progress
        # state
        self.erasers: Dict[str, LeaceEraser] = {}
        self.fitted_epoch: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        # run-time
        self.modules: Dict[str, nn.Module] = {}
        self.poolings: Dict[str, Any] = {}
        self.out_dir: Optional[str] = None
        self._handles: List[Any] = []
        self._collect: Dict[str, LeaceFitter] = {}
        self._calls: Dict[str, int] = {}  # hook calls per layer in the current fitting forward
        self._stop_ok = False  # fitting forwards end after the last fitted layer
        self._probe_rows: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._z: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self.metrics: Dict[str, float] = {}
        self._fitted_at_end = False
        self._checked = False

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=layers_key(self.layers), when=self.when)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": 1,
            "erasers": {k: e.state_dict() for k, e in self.erasers.items()},
            "fitted_epoch": self.fitted_epoch,
            "history": self.history,
            "out_dir": self.out_dir,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.erasers = {
            k: LeaceEraser.from_state_dict(v) for k, v in state_dict.get("erasers", {}).items()
        }
        self.fitted_epoch = state_dict.get("fitted_epoch")
        self.history = list(state_dict.get("history", []))
        self.out_dir = resumed_output_dir(self.output_dir, self.out_dir, state_dict)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs: Any) -> ConceptErasure:
        """A callback built with ``kwargs`` whose erasers come from a Lightning checkpoint.

        Use with ``Model.load_from_checkpoint(path)``: ``cb.install(model)`` erases its outputs
        outside a Trainer, or pass ``cb`` to ``Trainer(callbacks=[cb])`` for test / predict.
        """
        cb = cls(**kwargs)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        states = ckpt.get("callbacks", {})
        if cb.state_key not in states:
            found = [k for k in states if k.startswith("ConceptErasure")]
            raise KeyError(
                f"The checkpoint has no state for {cb.state_key}; ConceptErasure states found: "
                f"{found}. Build the callback with the same layers= and when= as in training."
            )
        cb.load_state_dict(states[cb.state_key])
        return cb

    # ------------------------------------------------------------------ hooks on the model
    def install(self, model: nn.Module) -> ConceptErasure:
        """Register the erasure hooks on ``model`` (idempotent); erasers apply once fitted."""
        modules = self._resolve(model)
        if self._handles and modules.keys() == self.modules.keys():
            if all(m is self.modules[n] for n, m in modules.items()):
                return self  # already installed on this model
        self.remove()  # hooks on another model (e.g. the one trained) are moved to this one
        self.modules = modules
        if not self._handles:
            for name, module in self.modules.items():
                if is_input_layer(name):
                    handle = add_input_hook(module, self._make_input_hook(name), "modify")
                else:
                    handle = add_forward_hook(module, self._make_hook(name), "modify")
                self._handles.append(handle)
        return self

    def _resolve(self, model: nn.Module) -> Dict[str, nn.Module]:
        """The erased layers of ``model`` and their fitting pooling."""
        modules = resolve_layers(model, self.layers, inputs=True)
        self.poolings = layer_pooling(self.pooling, list(modules), default="all")
        return modules

    @property
    def output_index(self) -> OutputKey:
        """Deprecated name of :attr:`output_key`."""
        return self.output_key

    def remove(self) -> None:
        """Remove every hook: the layers return their original outputs again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            erased = self._process(name, select_output(output, self.output_key, name))
            return None if erased is None else replace_output(output, erased, self.output_key)

        return hook

    def _make_input_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"Layer {name!r} received no tensor input (first positional argument or "
                    "tensor keyword argument) to erase; name another layer."
                )
            return self._process(name, x)

        return hook

    def _process(self, name: str, out: torch.Tensor) -> Optional[torch.Tensor]:
        """Record fitting statistics of one layer's tensor and return it erased (``None``: no
        eraser yet, the tensor is left as it is)."""
        feats, back = _channels_last(out)
        if name in self._collect and self._z is not None and recording_allowed(self):
            with torch.no_grad():
                rows, z = self._fit_rows(name, feats.detach(), self._z, self._mask)
                fitter = self._collect[name]
                if fitter is None:
                    fitter = self._collect[name] = self._new_fitter(rows.shape[1], z)
                fitter.update(rows, z)
                self._keep_probe_rows(name, rows, z)
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._stop_ok and all(self._calls.get(n, 0) for n in self._collect):
                raise _StopForward  # every layer being fitted has its rows: skip the rest
        eraser = self.erasers.get(name)
        if eraser is None:
            return None
        if eraser.dim != feats.shape[-1]:
            raise ValueError(
                f"The eraser of layer {name!r} was fitted on {eraser.dim} features but the "
                f"layer now outputs {feats.shape[-1]} (shape {tuple(out.shape)}); refit it or "
                "load erasers fitted on this model."
            )
        return back(eraser(feats))

    def _fit_rows(
        self, name: str, feats: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(r, d)`` and their concept ``(r,)``/``(r, k)`` used to fit this layer."""
        b = feats.shape[0]
        if z.shape[0] != b:
            raise ValueError(
                f"The concept has {z.shape[0]} rows but layer {name!r} saw a batch of {b}; "
                "concept= must give one value per sample."
            )
        how = self.poolings.get(name, "all")
        if feats.ndim == 2:
            rows, zr = feats, z
        elif how == "all":
            seq = feats.reshape(b, -1, feats.shape[-1])
            keep = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
            if mask is not None and mask.shape == keep.shape:
                keep = mask.to(seq.device) != 0
            rows = seq[keep]
            zr = z.to(seq.device).repeat_interleave(keep.sum(dim=1), dim=0)
        else:  # one row per sample; conv maps arrive channels-last as (B, H, W, C)
            seq = feats.reshape(b, -1, feats.shape[-1]) if feats.ndim == 4 else feats
            rows, zr = pool(seq, how, mask), z
        if not torch.isfinite(rows).all():
            bad = int((~torch.isfinite(rows).all(dim=1)).sum())
            raise ValueError(
                f"Layer {name!r} produced {bad} NaN/inf activation rows while fitting the eraser; "
                "fix the model's numerics (or erase another layer) before fitting."
            )
        return rows, zr

    def _keep_probe_rows(self, name: str, rows: torch.Tensor, z: torch.Tensor) -> None:
        if not self.probe:
            return
        kept = self._probe_rows.setdefault(name, [])
        have = sum(r.shape[0] for r, _ in kept)
        if have < self.probe_samples:
            take = self.probe_samples - have
            kept.append((rows[:take].float().cpu(), z[:take].cpu()))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.modules = self._resolve(pl_module)
        self.out_dir = resolve_output_dir(trainer, self.output_dir, "erasure", self)
        if stage == "fit":
            check_writable(trainer, self.out_dir, "ConceptErasure")

    def _ensure_installed(self, pl_module: LightningModule) -> None:
        self.install(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_installed(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_installed(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_installed(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_installed(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_start" and not self.erasers:
            self._fit_pass(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_end" and not self._fitted_at_end:  # e.g. max_steps mid-epoch
            self._fit_pass(trainer, pl_module, pl_log=False)

    # every_epoch: statistics from the training forward passes
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "every_epoch":
            self._collect = dict.fromkeys(self.modules)
            self._probe_rows = {}

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.when == "every_epoch":
            self._z, self._mask = self._read_concept(batch), self._batch_mask(batch)
        elif self.when == "fit_end" and self.fit_on == "train" and not self._checked:
            # the fitting pass runs after training: try its forward now, not after the last epoch
            self._read_concept(batch)
            with extra_pass(self, pl_module), torch.no_grad():
                self._forward(pl_module, batch)
            self._checked = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._z = self._mask = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "every_epoch":
            fitters, self._collect = self._collect, {}
            self._finish(trainer, pl_module, fitters)
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if self.when == "fit_end" and (last or trainer.should_stop):
            # fitted before ModelCheckpoint saves this epoch, so checkpoints carry the erasers
            self._fit_pass(trainer, pl_module)
            self._fitted_at_end = True

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exc: BaseException
    ) -> None:
        self.remove()
        self._collect, self._z = {}, None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        maybe_write_report(self, trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.remove()

    # ------------------------------------------------------------------ fitting
    def _new_fitter(self, x_dim: int, z: Optional[torch.Tensor] = None) -> LeaceFitter:
        z_dim = self.z_dim
        if z_dim is None and z is not None and z.ndim == 2:
            z_dim = z.shape[1]  # float (B, k): one-hot / continuous concept with k columns
        return LeaceFitter(
            x_dim,
            z_dim,
            self.method,
            shrinkage=self.shrinkage,
            constrain_cov_trace=self.constrain_cov_trace,
            svd_tol=self.svd_tol,
        )

    def _read_concept(self, batch: Any) -> torch.Tensor:
        try:
            z = torch.as_tensor(self._get_concept(batch))
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"ConceptErasure found no concept in the batch (looked for {err}); pass "
                "concept= (a dict key, a tuple position or a callable batch -> concept)."
            ) from None
        if z.ndim == 1 and z.is_floating_point() and self.z_dim is None:
            raise ValueError(
                "The concept is a float vector (B,): pass z_dim=1 for a continuous concept, or "
                "give integer class ids (.long()) for classes."
            )
        if z.dtype == torch.bool:
            z = z.long()
        return z

    def _batch_mask(self, batch: Any) -> Optional[torch.Tensor]:
        return batch_mask(batch, self.mask_key)

    def _fit_pass(self, trainer: Trainer, pl_module: LightningModule, pl_log: bool = True) -> None:
        """No-grad passes over ``fit_on`` in eval mode: one per layer when ``sequential``."""
        from tqdm.auto import tqdm

        loader = sequential_loader(trainer, None if isinstance(self.fit_on, str) else self.fit_on)
        names = list(self.modules)
        groups = [[n] for n in names] if self.sequential else [names]
        self.install(pl_module)
        try:
            for group in groups:
                self._collect = dict.fromkeys(group)
                self._probe_rows = {}
                show = show_progress(self.progress, trainer)
                desc = f"ConceptErasure: fitting {', '.join(group)}"
                with extra_pass(self, pl_module), torch.no_grad():
                    for i, batch in enumerate(
                        tqdm(loader, desc=desc, leave=False, disable=not show)
                    ):
                        if self.max_batches is not None and i >= self.max_batches:
                            break
                        self._z = self._read_concept(batch)
                        batch = trainer.strategy.batch_to_device(batch)
                        self._mask = self._batch_mask(batch)
                        self._calls = {}
                        with trainer.precision_plugin.forward_context():
                            try:
                                self._forward(pl_module, batch)
                            except _StopForward:
                                pass
                        if i == 0:  # the first forward runs whole: is each layer called once?
                            self._stop_ok = all(self._calls.get(n) == 1 for n in group)
                fitters, self._collect = self._collect, {}
                self._stop_ok = False
                self._z = self._mask = None
                self._finish(trainer, pl_module, fitters, pl_log)
        finally:
            self._collect, self._z, self._mask = {}, None, None
            self._stop_ok, self._calls = False, {}

    def _forward(self, pl_module: LightningModule, batch: Any) -> Any:
        """A fitting pass's forward (``forward_fn`` or ``module(inputs)``), with a clear error."""
        skip = [self.concept, self.index_key, self.label_key]
        fn = self.forward_fn or (lambda m, b: default_forward(m, b, skip))
        return checked_forward(fn, pl_module, batch, "ConceptErasure")

    def _merge_ranks(
        self, trainer: Trainer, fitter: Optional[LeaceFitter]
    ) -> Optional[LeaceFitter]:
        """The statistics of every rank merged in rank order (identical on all ranks)."""
        if world_size(trainer.strategy) == 1:
            return fitter
        dev = trainer.strategy.root_device
        dims = torch.tensor([fitter.x_dim, fitter.z_dim] if fitter else [0, 0], device=dev)
        all_dims = trainer.strategy.all_gather(dims).reshape(-1, 2)
        x_dim, z_dim = int(all_dims[:, 0].max()), int(all_dims[:, 1].max())
        if x_dim == 0:
            return None
        fitter = fitter or self._new_fitter(x_dim)
        fitter.grow_to(z_dim)
        merged = self._new_fitter(x_dim)
        for stats in gather_stats(trainer.strategy, fitter.stats()):
            part = self._new_fitter(x_dim)
            part.grow_to(z_dim)
            merged.merge(part.load_stats(stats))
        return merged

    def _finish(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        fitters: Dict[str, Optional[LeaceFitter]],
        pl_log: bool = True,
    ) -> None:
        """Merge ranks, solve, install, verify with probes, log and save."""
        epoch = trainer.current_epoch
        record: Dict[str, Any] = {"epoch": epoch, "layers": {}}
        for name, fitter in fitters.items():
            fitter = self._merge_ranks(trainer, fitter)
            if fitter is None or fitter.n == 0:
                rank_zero_warn(
                    f"ConceptErasure: layer {name!r} produced no activations during fitting (was "
                    "it called in forward?); it is left unerased."
                )
                continue
            eraser = fitter.eraser.to(device=pl_module.device)
            self.erasers[name] = eraser
            if fitter.trace_mix is not None:
                rank_zero_warn(
                    f"ConceptErasure: at layer {name!r} the covariance-trace constraint mixed "
                    f"LEACE (weight {fitter.trace_mix:.3f}) with an orthogonal projection; linear "
                    "erasure then holds only approximately. Pass constrain_cov_trace=False for "
                    "the exact guarantee."
                )
            info = {"n_rows": fitter.n, "rank": eraser.rank, "trace_mix": fitter.trace_mix}
            self._gather_probe_rows(trainer, name, fitter.x_dim)
            info.update(self._verify(name, eraser))
            record["layers"][name] = info
        self.fitted_epoch = epoch
        self.history.append(record)
        self._log(trainer, pl_module, record, pl_log)
        if trainer.is_global_zero:
            self._save()

    def _gather_probe_rows(self, trainer: Trainer, name: str, x_dim: int) -> None:
        """Under DDP, every rank's probe rows on every rank: the probes then score the erasure
        on the whole fitting set (the guarantee holds there, not on one rank's share)."""
        if not self.probe or world_size(trainer.strategy) == 1:
            return
        rows = self._probe_rows.pop(name, [])
        x = torch.cat([r for r, _ in rows]) if rows else torch.zeros(0, x_dim)
        z = torch.cat([c for _, c in rows]) if rows else None
        # concept layout (classes (n,) or float (n, k)), agreed over the ranks that have rows
        classes = z is not None and z.ndim == 1 and not z.is_floating_point()
        k = 0 if z is None else z.reshape(z.shape[0], -1).shape[1]
        mine = torch.tensor([z is not None, classes, k], device=trainer.strategy.root_device)
        layouts = trainer.strategy.all_gather(mine).reshape(-1, 3)
        layouts = layouts[layouts[:, 0] == 1]
        if layouts.shape[0] == 0:
            return
        classes, k = bool(layouts[0, 1]), int(layouts[0, 2])
        zs = torch.zeros(x.shape[0], k) if z is None else z.reshape(x.shape[0], -1)
        values = torch.cat([x.double(), zs.double()], dim=1)
        _, values = gather_rows(trainer.strategy, torch.arange(x.shape[0]), values)
        z_all = values[:, x_dim:]
        z_all = z_all[:, 0].long() if classes else z_all.float()
        self._probe_rows[name] = [(values[:, :x_dim].float(), z_all)]

    def _verify(self, name: str, eraser: LeaceEraser) -> Dict[str, float]:
        """Linear-probe score of the concept before and after erasure, and the mean edit."""
        rows = self._probe_rows.pop(name, [])
        if not self.probe or not rows:
            return {}
        x = torch.cat([r for r, _ in rows])
        z = torch.cat([c for _, c in rows])
        erased = eraser.to(device="cpu", dtype=x.dtype)(x)
        out = {"edit_norm": float(edit_norm(x, erased))}
        if z.ndim == 1 and not z.is_floating_point():
            before, majority = probe_accuracy(x, z)
            after, _ = probe_accuracy(erased, z)
            out.update(probe_acc_before=before, probe_acc_after=after, majority_rate=majority)
        else:
            out.update(probe_r2_before=probe_r2(x, z), probe_r2_after=probe_r2(erased, z))
        return out

    def _log(
        self, trainer: Trainer, pl_module: LightningModule, record: Dict[str, Any], pl_log: bool
    ) -> None:
        """Through ``pl_module.log`` (callback_metrics, monitorable) where Lightning allows it,
        else (``on_train_end``) straight to the loggers."""
        metrics = {
            f"erasure/{name}/{key}": float(val)
            for name, info in record["layers"].items()
            for key, val in info.items()
            if key
            in (
                "probe_acc_before",
                "probe_acc_after",
                "edit_norm",
                "majority_rate",
                "probe_r2_before",
                "probe_r2_after",
            )
        }
        self.metrics.update(metrics)
        if pl_log:
            for key, val in metrics.items():
                pl_module.log(key, val, on_epoch=True, logger=bool(trainer.loggers), sync_dist=True)
        elif trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def _save(self) -> None:
        atomic_torch_save(
            {
                k: {n: (None if t is None else t.cpu()) for n, t in e.state_dict().items()}
                for k, e in self.erasers.items()
            },
            os.path.join(self.out_dir, "erasers.pt"),
        )
        atomic_write_json(os.path.join(self.out_dir, "history.json"), self.history)
        atomic_write_json(os.path.join(self.out_dir, "config.json"), self._config())

    def _config(self) -> Dict[str, Any]:
        return {
            "layers": list(self.modules),
            "when": self.when,
            "method": self.method,
            "pooling": pooling_config(self.pooling, self.poolings),
            "z_dim": self.z_dim,
            "shrinkage": self.shrinkage,
            "constrain_cov_trace": self.constrain_cov_trace,
            "svd_tol": self.svd_tol,
            "sequential": self.sequential,
            "output_key": self.output_key,
        }


def _channels_last(
    out: torch.Tensor,
) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(B, C, H, W) maps become (B, H, W, C) so features are last; returns the inverse too."""
    if out.ndim == 4:
        return out.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2)
    return out, lambda t: t
