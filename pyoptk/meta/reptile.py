"""Reptile (Nichol et al. 2018): meta-learn an initialization without second derivatives.

For a batch of ``T`` tasks, run ``K`` plain SGD steps from ``θ`` on each task's support
set (``θ̃_t``), then move the initialization towards the adapted parameters:

.. math::
    θ \\leftarrow θ + ε \\, \\frac1T \\sum_t (θ̃_t - θ)

(the "batched" Reptile of the paper). The inner loop is :meth:`MAML.adapt
<pyoptk.meta.maml.MAML.adapt>` without a graph — the same vmapped forward and fused
``inner_sgd`` op over the task batch — so memory is that of one inner step whatever
``K`` is. Evaluation is MAML's: adapt on the support set, score the query set.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from pyoptk.meta.maml import MAML

__all__ = ["Reptile"]


class Reptile:
    """Reptile meta-learner of ``model``'s initialization (module docstring).

    Args:
        model (nn.Module): the model; its parameters are updated in place by :meth:`step`.
        loss_fn (callable): ``loss_fn(outputs, targets) -> scalar`` of one task.
        inner_steps (int): ``K`` SGD steps per task (default 5).
        inner_lr (float): the inner SGD learning rate (default 0.02).
        outer_lr (float): ``ε``, the interpolation step towards the adapted weights
            (default 0.1).
        adapt (sequence of str, optional): names / prefixes of the parameters adapted
            (others stay fixed; default all).
        batched (bool): vmap the forward over tasks (default True).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 inner_steps: int = 5, inner_lr: float = 0.02, outer_lr: float = 0.1,
                 adapt: Optional[Sequence[str]] = None, batched: bool = True):
        if not 0 < outer_lr <= 1:
            raise ValueError(f"Reptile: outer_lr must be in (0, 1], got {outer_lr!r}")
        self.learner = MAML(model, loss_fn, inner_steps=inner_steps, inner_lr=inner_lr,
                            first_order=True, adapt=adapt, batched=batched)
        self.model = model
        self.outer_lr = float(outer_lr)

    @torch.no_grad()
    def step(self, batch) -> Tensor:
        """One Reptile update from a batched episode (only its support set is used).
        Returns the mean support loss of the adapted parameters ``[]`` (detached)."""
        sx, sy = batch[0], batch[1]
        adapted = self.learner.adapt(sx, sy)
        loss = self.learner.task_losses(adapted, sx, sy).mean()
        params = dict(self.model.named_parameters())
        for name, new in adapted.items():
            p = params[name]
            p.add_(new.mean(0) - p, alpha=self.outer_lr)
        return loss

    def evaluate(self, batch) -> Tensor:
        """Mean query loss after adapting on the support set (no meta-gradient)."""
        with torch.no_grad():
            return self.learner.meta_loss(batch)
