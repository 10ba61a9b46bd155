"""The interface of outer-loop gradient estimators over truncated unrolls.

Meta-training a learned optimizer runs many inner trainings ("unrolls"), each a task
trained for ``horizon`` inner steps by the learned rule, cut into truncations of
``truncation`` steps. One :meth:`GradientEstimator.estimate` call advances every unroll
it is given by one truncation and returns an estimate of the gradient of the meta-loss
(the mean inner loss over the truncation) with respect to the meta-parameters.

* :class:`Unroll` is one inner trajectory between truncations: the task (rebuilt from
  its spec), the inner parameters and rule state (always detached: truncation really
  cuts the graph), the inner step count, and the estimator's own per-unroll tensors
  (``extra``, e.g. PES's accumulated perturbation). It round-trips through
  :meth:`Unroll.state_dict` for bit-exact checkpoint/resume.
* Estimators take no randomness from global RNG: ``estimate(..., seed=)`` seeds every
  perturbation, so a resumed run draws what the uninterrupted one would have.
* A finished unroll (``step >= horizon``) is replaced by the caller, with
  :meth:`GradientEstimator.init_unroll` on the next task of its sampler.
* :class:`MetaLoss` is the one definition of the meta-loss every estimator uses, and
  :func:`finish_estimate` the one place where a meta-gradient is checked for NaN/Inf and
  clipped (see ``docs/meta.md``).
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyoptk.learned.mlp import MLPState
from pyoptk.tasks.base import SPLIT_NAMES, Task, TaskSpec
from pyoptk.tasks.registry import build_task

__all__ = ["Unroll", "Estimate", "GradientEstimator", "MetaLoss", "finish_estimate",
           "check_estimator_args"]


@dataclass
class Unroll:
    """One inner training trajectory between two truncations (see the module docstring).

    Attributes:
        task (Task): the inner problem.
        params (OrderedDict[str, Tensor]): inner parameters, detached.
        state: the rule's per-tensor state for ``params`` (e.g. ``MLPState``), detached.
        step (int): inner steps taken so far.
        extra (dict[str, Tensor]): estimator-specific tensors carried across truncations.
    """

    task: Task
    params: "OrderedDict[str, Tensor]"
    state: Any
    step: int = 0
    extra: Dict[str, Tensor] = field(default_factory=dict)

    def done(self, horizon: int) -> bool:
        return self.step >= horizon

    def state_dict(self) -> Dict[str, Any]:
        """A checkpointable dict: the task as its :class:`TaskSpec` dict, tensors as they
        are (no copies), an :class:`MLPState` as a dict of its fields' lists. Loads with
        ``torch.load(..., weights_only=True)``."""
        state, state_type = self.state, "raw"
        if isinstance(state, MLPState):
            state, state_type = {k: list(v) for k, v in state._asdict().items()}, "MLPState"
        return {"task": self.task.spec.to_dict(), "params": OrderedDict(self.params),
                "state_type": state_type, "state": state, "step": int(self.step),
                "extra": dict(self.extra)}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "Unroll":
        """The unroll of :meth:`state_dict` ``d``; the task is rebuilt from its spec with
        :func:`pyoptk.tasks.build_task` (so its family must be registered)."""
        state = d["state"]
        if d["state_type"] == "MLPState":
            state = MLPState(**{k: list(state[k]) for k in MLPState._fields})
        elif d["state_type"] != "raw":
            raise ValueError(f"Unroll.from_state_dict: unknown state_type {d['state_type']!r}")
        return cls(task=build_task(TaskSpec.from_dict(d["task"])),
                   params=OrderedDict(d["params"]), state=state, step=int(d["step"]),
                   extra=dict(d["extra"]))


@dataclass
class Estimate:
    """What one :meth:`GradientEstimator.estimate` call returns.

    Attributes:
        grads (OrderedDict[str, Tensor]): the meta-gradient estimate, one tensor per
            meta-parameter (same names, shapes, dtype), averaged over the unrolls.
        meta_loss (float): mean inner loss over the truncation, averaged over unrolls.
        finite (bool): False when a loss or the gradient was NaN/Inf; ``grads`` are then
            zeros and the caller should skip the meta-update (NaN-safe meta-training).
        metrics (dict[str, float]): extra scalars for logging (gradient norm, …).
    """

    grads: "OrderedDict[str, Tensor]"
    meta_loss: float
    finite: bool = True
    metrics: Dict[str, float] = field(default_factory=dict)


#: Loss below which ``log_loss`` counts a task as solved (meta-loss and validation).
LOG_LOSS_FLOOR = 1e-8


@dataclass(frozen=True)
class MetaLoss:
    """The meta-loss of one truncation, shared by every estimator.

    A truncation of ``T`` inner steps starting at step ``s`` from parameters ``θ_0``
    produces ``θ_1 … θ_T``; the meta-loss is

    .. math::  \\frac{1}{T} \\sum_{t=1}^{T} f\\big(L(θ_t;\\ b_{s+t})\\big)

    with ``b_k = task.batch(k, split)`` and ``f`` the identity (or ``log`` when
    ``log_loss``). The losses are those of the parameters the truncation's steps
    *produced*: ``θ_0`` does not depend on the meta-parameters of this truncation, and
    with this choice the terms of consecutive truncations tile the horizon (each of
    ``θ_1 … θ_H`` counted once), so PES summed over truncations is the gradient of the
    whole unroll's loss. With ``split="train"`` the terms reuse the losses the inner
    gradients are taken from (one extra forward per truncation, at ``θ_T``); another
    split costs one extra forward per step.

    Args:
        split (str, default "train"): data split of the batches ``b_k`` (one of
            :data:`pyoptk.tasks.SPLIT_NAMES`).
        log_loss (bool, default False): average ``log(max(L, LOG_LOSS_FLOOR))``
            instead of ``L`` (for tasks whose loss spans orders of magnitude, e.g.
            quadratics). Below the floor (1e-8) a task counts as solved: its term is
            constant and gets no gradient, so a loss of exactly 0 is neither ``-inf``
            (which TBPTT would take for a divergence) nor a term that outweighs every
            other task's. The same floor as ``validation.log_loss``.
    """

    split: str = "train"
    log_loss: bool = False

    def __post_init__(self):
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"MetaLoss.split must be one of {SPLIT_NAMES}, got {self.split!r}")
        if not isinstance(self.log_loss, bool):
            raise TypeError(f"MetaLoss.log_loss must be a bool, got {self.log_loss!r}")

    def term(self, loss: Tensor) -> Tensor:
        """``f(L)`` of one inner loss (any shape: per particle under ``vmap``)."""
        return torch.log(loss.clamp_min(LOG_LOSS_FLOOR)) if self.log_loss else loss


def check_estimator_args(owner: str, truncation: int, horizon: int,
                         max_grad_norm: Optional[float], meta_loss: MetaLoss) -> None:
    """``ValueError``/``TypeError`` naming the argument, for the arguments every
    estimator shares."""
    for name, v in (("truncation", truncation), ("horizon", horizon)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {v!r}")
    if truncation > horizon:
        raise ValueError(f"{owner}: truncation ({truncation}) must be <= horizon ({horizon})")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(
            max_grad_norm, (int, float)) or not (max_grad_norm > 0 and math.isfinite(
            max_grad_norm))):
        raise ValueError(f"{owner}: max_grad_norm must be None or a finite float > 0, got "
                         f"{max_grad_norm!r}")
    if not isinstance(meta_loss, MetaLoss):
        raise TypeError(f"{owner}: meta_loss must be a MetaLoss, got {type(meta_loss).__name__}")


def finish_estimate(meta_params: Mapping[str, Tensor], grad_sum: Optional[Sequence[Tensor]],
                    n_ok: int, losses: Sequence[float], n_bad: int,
                    max_grad_norm: Optional[float],
                    metrics: Optional[Dict[str, float]] = None, *,
                    drop_nonfinite: bool = False) -> Estimate:
    """The :class:`Estimate` of summed per-unroll gradients (the NaN policy and the
    clipping of every estimator).

    Args:
        meta_params: names, shapes and dtypes of the gradient.
        grad_sum: the sum of the finite unrolls' gradients (None when there were none).
        n_ok: how many unrolls ``grad_sum`` sums.
        losses: the finite unrolls' meta-losses.
        n_bad: unrolls whose loss or gradient was non-finite. Unless
            ``drop_nonfinite``, any makes the estimate ``finite=False`` with zero
            gradients: a caller skipping the meta-update then never steps on a partial
            average that over-weights the surviving tasks (ES/PES, whose particles of a
            diverged unroll carry no usable difference).
        drop_nonfinite: average over the ``n_ok`` contributing unrolls whatever
            ``n_bad`` is (TBPTT, whose diverged unrolls still contribute the gradient of
            their finite prefix); ``finite=False`` only when ``n_ok == 0``.
        max_grad_norm: clip the averaged gradient to this global L2 norm (None: no
            clipping). ``metrics["grad_norm"]`` is the norm before clipping.
    """
    metrics = dict(metrics or {})
    metrics["n_nonfinite"] = float(n_bad)
    meta_loss = float(sum(losses) / len(losses)) if losses else float("nan")
    if (n_bad and not drop_nonfinite) or grad_sum is None or n_ok == 0:
        zeros = OrderedDict((k, torch.zeros_like(v)) for k, v in meta_params.items())
        metrics["grad_norm"] = float("nan")
        return Estimate(zeros, meta_loss, finite=False, metrics=metrics)
    grads = [g / n_ok for g in grad_sum]
    # Global norm in float64 so that tiny meta-gradients (the rule's steps are ~1e-4 by
    # construction) do not underflow when squared in float32.
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    metrics["grad_norm"] = norm
    if not math.isfinite(norm):
        zeros = OrderedDict((k, torch.zeros_like(v)) for k, v in meta_params.items())
        metrics["n_nonfinite"] = float(n_ok)
        return Estimate(zeros, meta_loss, finite=False, metrics=metrics)
    if max_grad_norm is not None and norm > max_grad_norm:
        grads = [g * (max_grad_norm / norm) for g in grads]
    metrics["clipped"] = float(max_grad_norm is not None and norm > max_grad_norm)
    return Estimate(OrderedDict(zip(meta_params.keys(), grads)), meta_loss, True, metrics)


class GradientEstimator(abc.ABC):
    """Base of TBPTT, ES and PES estimators (see the module docstring)."""

    #: Inner steps per truncation and per unroll (set by subclasses' ``__init__``).
    truncation: int
    horizon: int

    @abc.abstractmethod
    def init_unroll(self, task: Task, meta_params: Mapping[str, Tensor], seed: int) -> Unroll:
        """A fresh unroll of ``task`` (``seed`` picks the init draw and any per-unroll
        randomness)."""

    @abc.abstractmethod
    def estimate(self, meta_params: Mapping[str, Tensor], unrolls: List[Unroll], *,
                 seed: int) -> Tuple[Estimate, List[Unroll]]:
        """Advance each unroll by one truncation; return the estimate and the new
        (detached) unrolls. ``meta_params`` are not modified."""
