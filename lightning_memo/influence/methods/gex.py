"""Geometric-ensemble influence (GEX; Kim, Kim, Yang, NeurIPS 2023, ``la_fge``).

GEX reads influence functions as the average product of two sample-loss deviations over
parameters drawn from a posterior around the trained weights theta*,

    I(z, z') = E_theta[(l(z; theta) - l(z; theta*)) (l(z'; theta) - l(z'; theta*))],

and replaces the linearised losses and the Laplace posterior of the classical estimators by the
*actual* losses of a geometric ensemble: E members theta_1..theta_E from short SGD fine-tuning
runs around theta* (fast geometric ensembling, Garipov et al. 2018). With linearised losses,
l(z; theta) - l(z; theta*) ~ g_z . (theta - theta*), it reduces to g_z^T Sigma g_z', Sigma the
second moment of the ensemble around theta* (the Laplace / K-FAC influence when Sigma is the
Laplace covariance); without the linearisation the self-influence distribution is no longer
unimodal and mislabeled samples stand out.

Rows: ``train_rows_batch(z) = query_rows_batch(z) = (l_e(z) - c(z))_{e=1..E} / sqrt(E')``, so
``score(q, z) = rows(q) . rows(z)`` and ``self_influence_batch(z) = ||rows(z)||^2``. With
``center="trained"`` (GEX, default) c(z) = max(l(z; theta*), loss_floor) and E' = E; with
``center="mean"`` c(z) is the ensemble mean and E' = E - 1 (the sample covariance of losses
across the ensemble). Math core: torch only.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import nn

from ...capture import eval_mode
from ..grads import _LossModule
from .base import BatchInfluenceMethod, FitContext, LossFn

__all__ = ["GeometricEnsembleInfluence", "lr_schedule"]

SCHEDULES = ("cosine", "constant")


def lr_schedule(kind: str, ft_lr: float, ft_step: int) -> List[float]:
    """Learning rate of each of the ``ft_step`` steps of one fine-tuning cycle.

    ``"cosine"``: ft_lr * (1 + cos(pi t / ft_step)) / 2, t = 0..ft_step-1 (optax's
    ``cosine_decay_schedule(ft_lr, ft_step)``, GEX's ``ft_lr_sched=cosine``); ``"constant"``:
    ft_lr.
    """
    if kind == "constant":
        return [float(ft_lr)] * ft_step
    return [float(ft_lr) * 0.5 * (1.0 + math.cos(math.pi * t / ft_step)) for t in range(ft_step)]


def _batch_stream(batches: Iterable[Any], buffer: int, gen: torch.Generator) -> Iterator[Any]:
    """Endless batches in a seeded random order: passes over ``batches`` through a shuffle
    buffer of ``buffer`` batches (``tf.data``'s ``repeat().shuffle(buffer)``)."""
    pool: List[Any] = []
    while True:
        count = 0
        for batch in batches:
            count += 1
            pool.append(batch)
            if len(pool) >= buffer:
                i = int(torch.randint(len(pool), (1,), generator=gen))
                pool[i], pool[-1] = pool[-1], pool[i]
                yield pool.pop()
        if count == 0:
            raise ValueError(
                "GEX fine-tuning needs training batches, but the training data is empty."
            )


class GeometricEnsembleInfluence(BatchInfluenceMethod):
    """Geometric-ensemble influence (GEX ``la_fge``; Kim, Kim, Yang, "GEX: A flexible method
    for approximating influence via Geometric Ensemble", NeurIPS 2023).

    Fitting builds ``num_ens`` members from the trained weights by fine-tuning the chosen
    parameters (``params``; the others stay frozen) with SGD (momentum 0.9, as GEX) on the
    mean per-sample loss of the training batches. As GEX's single-device path (and FGE), member
    e continues from member e-1's weights (member 1 from the trained ones) through one fresh
    cycle of ``ft_step`` steps of the ``schedule`` (momentum reset each cycle); with
    ``start="trained"`` every member starts from the trained weights instead (GEX's
    ``ft_local`` path, one member per device), differing by its data order. Batches come in a
    seeded random order (a shuffle buffer over the passes), and the global RNG is forked and
    seeded while fine-tuning, so shuffling DataLoaders reproduce and the caller's RNG is
    untouched. The model itself is never modified: members are parameter dicts (on the
    model's device) evaluated with ``torch.func.functional_call``; fine-tuning and evaluation
    run with the model in eval mode (no dropout, BatchNorm statistics frozen), so members
    differ only in the chosen parameters.

    Influence: ``score(q, z) = mean_e (l_e(q) - c(q)) (l_e(z) - c(z))`` with c the trained
    model's loss (``center="trained"``, GEX; floored at ``loss_floor``, GEX's ``gex_eps``,
    whose code default is 0.05) or the ensemble-mean loss with 1 / (E - 1) (``center="mean"``,
    the covariance of losses across the ensemble). Larger self-influence = more influential
    (GEX ranks mislabeled samples by it).

    Args:
        num_ens: ensemble members E (>= 2; GEX's README uses 8).
        ft_lr: peak fine-tuning learning rate (GEX: 0.05).
        ft_step: SGD steps per member (GEX: 800).
        schedule: ``"cosine"`` (decay from ft_lr to 0 in each cycle: a cyclic schedule over
            the members; GEX's README setting) or ``"constant"``.
        momentum: SGD momentum (GEX: 0.9).
        max_grad_norm: clip the gradient's global norm; ``"auto"``: 1.0 with the constant
            schedule and none with cosine (as GEX); ``None``: never.
        weight_decay: L2 coefficient added to the gradient.
        start: ``"previous"`` (chain, default) or ``"trained"`` (see above).
        center: ``"trained"`` (GEX) or ``"mean"``.
        loss_floor: floor of the trained model's loss in ``center="trained"`` (GEX's gex_eps).
        shuffle_buffer: batches held to randomise their order (1: the loader's order).
        seed: data order and the forked global RNG.
    """

    name = "gex"
    fit_data = "train"
    has_scores = True

    def __init__(
        self,
        num_ens: int = 8,
        ft_lr: float = 0.05,
        ft_step: int = 800,
        schedule: str = "cosine",
        momentum: float = 0.9,
        max_grad_norm: Union[str, float, None] = "auto",
        weight_decay: float = 0.0,
        start: str = "previous",
        center: str = "trained",
        loss_floor: float = 0.0,
        shuffle_buffer: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(None)
        if int(num_ens) < 2:
            raise ValueError(
                f"num_ens={num_ens}: GEX needs at least 2 ensemble members (the influence is a "
                "covariance of sample losses across the ensemble, which one member cannot "
                "estimate). Use num_ens >= 2 (GEX uses 8 to 32)."
            )
        if not ft_lr > 0 or not math.isfinite(ft_lr):
            raise ValueError(f"ft_lr={ft_lr}: use a finite learning rate > 0 (GEX: 0.05).")
        if int(ft_step) < 1:
            raise ValueError(f"ft_step={ft_step}: use at least 1 fine-tuning step per member.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: use one of {list(SCHEDULES)}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}: use 0 <= momentum < 1 (GEX: 0.9).")
        if max_grad_norm == "auto":
            max_grad_norm = 1.0 if schedule == "constant" else None
        elif max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm}: use 'auto', None or a number > 0.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay}: use a number >= 0.")
        if start not in ("previous", "trained"):
            raise ValueError(f"start={start!r}: use 'previous' (chain) or 'trained'.")
        if center not in ("trained", "mean"):
            raise ValueError(f"center={center!r}: use 'trained' (GEX) or 'mean' (covariance).")
        if int(shuffle_buffer) < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer}: use at least 1 batch.")
        self.num_ens, self.ft_lr, self.ft_step = int(num_ens), float(ft_lr), int(ft_step)
        self.schedule, self.momentum = schedule, float(momentum)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.weight_decay, self.start, self.center = float(weight_decay), start, center
        self.loss_floor, self.shuffle_buffer = float(loss_floor), int(shuffle_buffer)
        self.seed = int(seed)
        self.members: List[Dict[str, torch.Tensor]] = []  # E x {param name: tensor}
        self.trained: Optional[Dict[str, torch.Tensor]] = None  # theta*
        self.model: Optional[nn.Module] = None
        self.loss_fn: Optional[LossFn] = None

    # -- model
    def bind(self, model: nn.Module, loss_fn: LossFn) -> GeometricEnsembleInfluence:
        """Attach the model and loss (done by :meth:`fit`; call it after
        :meth:`load_state_dict`). Members move to the model's device."""
        self.model, self.loss_fn = model, loss_fn
        dev = next((p.device for p in model.parameters()), None)
        if dev is not None and self.trained is not None:
            self.trained = {k: v.to(dev) for k, v in self.trained.items()}
            self.members = [{k: v.to(dev) for k, v in m.items()} for m in self.members]
        return self

    def _losses(self, wrapper: nn.Module, theta: Dict[str, torch.Tensor], batch: Any):
        from torch.func import functional_call

        loss = functional_call(wrapper, {f"model.{k}": v for k, v in theta.items()}, (batch,))
        if not isinstance(loss, torch.Tensor) or loss.ndim != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return per-sample losses of shape (B,), got {shape}. Use "
                "reduction='none'."
            )
        return loss

    # -- fit
    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        batches: Iterable[Any],
        context: FitContext,
    ) -> None:
        progress = context.progress
        if not params:
            raise ValueError("params is empty: select at least one parameter tensor to fine-tune.")
        self.model, self.loss_fn = model, loss_fn
        self.trained = {k: v.detach().clone() for k, v in params.items()}
        dev = next(iter(self.trained.values())).device
        wrapper = _LossModule(model, loss_fn)
        lrs = lr_schedule(self.schedule, self.ft_lr, self.ft_step)
        gen = torch.Generator().manual_seed(self.seed)
        devices = [dev] if dev.type == "cuda" else []
        steps: Iterable[int] = range(self.num_ens * self.ft_step)
        ticks = iter(progress(steps)) if progress is not None else None
        members: List[Dict[str, torch.Tensor]] = []
        with eval_mode(model):  # each module's own train/eval flag restored
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                stream = _batch_stream(batches, self.shuffle_buffer, gen)
                theta = self.trained
                for e in range(self.num_ens):
                    if self.start == "trained":
                        theta = self.trained
                    theta = self._cycle(wrapper, theta, stream, lrs, e, ticks)
                    members.append(theta)
        if ticks is not None:
            for _ in ticks:  # close the progress bar
                pass
        self.members = members

    def _cycle(self, wrapper, theta, stream, lrs, member, ticks):
        """One member: ``len(lrs)`` SGD steps from ``theta``; returns detached parameters."""
        names = list(theta)
        cur = [theta[k].detach().clone().requires_grad_(True) for k in names]
        buf = [torch.zeros_like(t) for t in cur]
        for step, lr in enumerate(lrs):
            batch = next(stream)
            with torch.enable_grad():
                loss = self._losses(wrapper, dict(zip(names, cur)), batch).mean()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"GEX fine-tuning diverged: the mean training loss is {value} at member "
                        f"{member + 1}, step {step + 1} (ft_lr={self.ft_lr}). Lower ft_lr or set "
                        "max_grad_norm."
                    )
                grads = torch.autograd.grad(loss, cur)
            with torch.no_grad():
                grads = [g.detach() for g in grads]
                if self.weight_decay:
                    grads = [g + self.weight_decay * t for g, t in zip(grads, cur)]
                if self.max_grad_norm is not None:
                    norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
                    factor = min(1.0, self.max_grad_norm / max(float(norm), 1e-300))
                    grads = [g * factor for g in grads]
                for t, g, m in zip(cur, grads, buf):
                    m.mul_(self.momentum).add_(g)
                    t.sub_(lr * m)
            if ticks is not None:
                next(ticks, None)
        return {k: t.detach() for k, t in zip(names, cur)}

    # -- rows
    def member_losses(self, batch: Any) -> Dict[str, torch.Tensor]:
        """``{"members": (B, E) float64, "trained": (B,) float64}``: each member's per-sample
        loss and the trained model's, evaluated with ``functional_call`` in eval mode."""
        if self.model is None or not self.members:
            raise RuntimeError(
                "GeometricEnsembleInfluence has no ensemble: call fit(...) first (after "
                "load_state_dict, call bind(model, loss_fn))."
            )
        wrapper = _LossModule(self.model, self.loss_fn)
        with eval_mode(self.model):  # each module's own train/eval flag restored
            with torch.no_grad():
                ref = self._losses(wrapper, self.trained, batch).double()
                cols = [self._losses(wrapper, m, batch).double() for m in self.members]
        losses = torch.stack(cols, dim=1)
        bad = ~torch.isfinite(losses).all(dim=1) | ~torch.isfinite(ref)
        if bool(bad.any()):
            raise ValueError(
                f"GEX: {int(bad.sum())} of {bad.numel()} samples have a non-finite loss under the "
                "trained model or an ensemble member (NaN/inf inputs, or members that drifted "
                "too far: lower ft_lr or ft_step)."
            )
        return {"members": losses, "trained": ref}

    def _rows(self, batch: Any) -> torch.Tensor:
        out = self.member_losses(batch)
        losses, e = out["members"], out["members"].shape[1]
        if self.center == "mean":
            return (losses - losses.mean(dim=1, keepdim=True)) / math.sqrt(e - 1)
        ref = out["trained"].clamp(min=self.loss_floor)
        return (losses - ref[:, None]) / math.sqrt(e)

    def query_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, E) float64 loss deviations of the queries."""
        return self._rows(batch)

    def train_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, E) float64 loss deviations of the training samples."""
        return self._rows(batch)

    def self_influence_batch(self, batch: Any) -> torch.Tensor:
        """(B,) float64: mean_e (l_e - c)^2 (``center="trained"``) or Var_e l_e (``"mean"``)."""
        return self._rows(batch).square().sum(dim=1)

    def hinv_norm_batch(self, batch: Any) -> torch.Tensor:
        """(B,) NaN: GEX has no Hessian."""
        n = self.member_losses(batch)["trained"].shape[0]
        return torch.full((n,), float("nan"), dtype=torch.float64)

    def parameter_deviations(self) -> torch.Tensor:
        """(E, P) float64: theta_e - c with c = theta* (``center="trained"``) or the ensemble
        mean (``"mean"``), parameters flattened in ``params`` order."""
        flat = torch.stack(
            [torch.cat([m[k].reshape(-1).double() for k in self.trained]) for m in self.members]
        )
        if self.center == "mean":
            return flat - flat.mean(dim=0, keepdim=True)
        return flat - torch.cat([v.reshape(-1).double() for v in self.trained.values()])

    # -- state
    def _config(self) -> Dict[str, Any]:
        keys = ("num_ens", "ft_lr", "ft_step", "schedule", "momentum", "max_grad_norm")
        keys += ("weight_decay", "start", "center", "loss_floor", "shuffle_buffer", "seed")
        return {k: getattr(self, k) for k in keys}

    def state_dict(self) -> Dict[str, Any]:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {
            **super().state_dict(),
            "config": self._config(),
            "trained": cpu(self.trained) if self.trained is not None else None,
            "members": [cpu(m) for m in self.members],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k, v in state.get("config", {}).items():
            setattr(self, k, v)
        self.trained, self.members = state["trained"], list(state["members"])
        if self.model is not None:
            self.bind(self.model, self.loss_fn)
