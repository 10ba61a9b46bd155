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
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from pyoptk.tasks.base import Task

__all__ = ["Unroll", "Estimate", "GradientEstimator"]


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
