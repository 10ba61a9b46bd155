"""Truncated backpropagation through time (TBPTT) over unrolls of the MLP rule.

Each :meth:`TruncatedBPTT.estimate` call advances every unroll by one truncation of
``T`` inner steps, differentiably in the meta-parameters, and backpropagates the
truncation's :class:`~pyoptk.meta.estimator.MetaLoss` into them. The graph starts at
the unroll's detached parameters and state, so memory is that of ``T`` steps whatever
the horizon, and the gradient ignores how this truncation's meta-parameters would have
changed the earlier steps (the truncation bias that PES removes).

The inner step is :func:`pyoptk.learned.update` with ``fused`` passed through: by
default the differentiable fused op :func:`pyoptk.ops.mlp_step`, whose backward
recomputes the step per element instead of autograd storing its ~50 intermediate
planes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from pyoptk.learned.mlp import MLPConfig, MLPState, check_meta_params, init_state, update
from pyoptk.meta.estimator import (
    Estimate, GradientEstimator, MetaLoss, Unroll, check_estimator_args, finish_estimate)
from pyoptk.tasks.base import Task, derive_seed

__all__ = ["TruncatedBPTT", "fresh_unroll"]


def fresh_unroll(task: Task, config: MLPConfig, meta_params: Mapping[str, Tensor],
                 seed: int) -> Unroll:
    """Step 0 of ``task``: ``task.init_params(seed)`` in the meta-parameters' dtype and
    device, and the rule's zero state."""
    ref = next(iter(meta_params.values()))
    params = task.init_params(int(seed), dtype=ref.dtype, device=ref.device)
    return Unroll(task=task, params=params, state=init_state(list(params.values()), config))


def _detach_state(state: MLPState) -> MLPState:
    return MLPState(*[[t.detach() for t in lst] for lst in state])


class TruncatedBPTT(GradientEstimator):
    """Meta-gradients by backpropagation through truncations of the inner loop.

    Args:
        config (MLPConfig): the rule.
        truncation (int): inner steps per :meth:`estimate` (the backprop length ``T``).
        horizon (int): inner steps per unroll (the last truncation is cut to fit).
        meta_loss (MetaLoss, default MetaLoss()): mean train loss of ``θ_1 … θ_T``.
        lr (float, default 1.0): the inner learning-rate multiplier of :func:`update`.
        max_grad_norm (float or None, default None): clip the averaged meta-gradient
            to this global L2 norm.
        second_order (bool, default False): backpropagate through the inner gradients'
            dependence on the inner parameters (``create_graph=True``: Hessian-vector
            products of the task loss). False treats each inner gradient as an input of
            the rule, as learned_optimization does — the usual choice for learned
            optimizers: about half the cost and memory, and empirically no worse. Only
            True is the exact gradient of the unroll's loss.
        fused (bool or None, default None): passed to :func:`update` (None: the fused
            differentiable op when the inputs allow, False: autograd through the
            reference).

    NaN policy (divergence): an unroll whose inner loss turns non-finite during the
    truncation stops there and is restarted from step 0 of its task with a fresh
    initialization. Its meta-loss is the mean over the steps *before* that point, so
    its gradient still says "these steps made the loss grow" — skipping it instead
    would leave the rule no signal against diverging, and as meta-training makes the
    rule bolder an ever larger share of meta-steps would be skipped (measured: more
    than half after 500 outer steps on the ``train`` split). An unroll whose
    meta-gradient is itself non-finite is left out of the average; the estimate is
    ``finite=False`` (zero gradients) only when no unroll contributes.
    ``metrics["n_nonfinite"]`` counts the unrolls that diverged.
    """

    def __init__(self, config: MLPConfig, truncation: int, horizon: int, *,
                 meta_loss: MetaLoss = MetaLoss(), lr: float = 1.0,
                 max_grad_norm: Optional[float] = None, second_order: bool = False,
                 fused: Optional[bool] = None):
        if not isinstance(config, MLPConfig):
            raise TypeError(f"TruncatedBPTT: config must be an MLPConfig, got "
                            f"{type(config).__name__}")
        check_estimator_args("TruncatedBPTT", truncation, horizon, max_grad_norm, meta_loss)
        if not isinstance(second_order, bool):
            raise TypeError(f"TruncatedBPTT: second_order must be a bool, got {second_order!r}")
        if fused not in (None, True, False):
            raise TypeError(f"TruncatedBPTT: fused must be None, True or False, got {fused!r}")
        self.config = config
        self.truncation = truncation
        self.horizon = horizon
        self.meta_loss = meta_loss
        self.lr = float(lr)
        self.max_grad_norm = max_grad_norm
        self.second_order = second_order
        self.fused = fused

    def init_unroll(self, task: Task, meta_params: Mapping[str, Tensor], seed: int) -> Unroll:
        return fresh_unroll(task, self.config, meta_params, seed)

    def estimate(self, meta_params: Mapping[str, Tensor], unrolls: List[Unroll], *,
                 seed: int) -> Tuple[Estimate, List[Unroll]]:
        """One truncation of every unroll; the meta-gradient averaged over them.

        ``seed`` only picks the re-initialization of unrolls reset for a non-finite
        loss (TBPTT itself draws nothing). ``metrics``: ``grad_norm`` (before clipping),
        ``clipped``, ``n_nonfinite``, ``inner_loss`` (mean train loss at ``θ_0``).
        """
        check_meta_params(meta_params, self.config)
        if not unrolls:
            raise ValueError("TruncatedBPTT.estimate: unrolls must not be empty")
        leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in meta_params.items())
        grad_sum: Optional[List[Tensor]] = None
        losses, inner, out = [], [], []
        n_ok = n_bad = 0
        for i, u in enumerate(unrolls):
            if u.done(self.horizon):
                raise ValueError(f"TruncatedBPTT.estimate: unroll {i} is done (step {u.step} "
                                 f">= horizon {self.horizon}); replace it with init_unroll")
            meta_loss, loss0, new = self._truncation(u, leaves)
            grads = None
            if meta_loss is not None:
                grads = torch.autograd.grad(meta_loss, list(leaves.values()), allow_unused=True)
                grads = [torch.zeros_like(v) if g is None else g
                         for g, v in zip(grads, leaves.values())]
                if not all(bool(torch.isfinite(g).all()) for g in grads):
                    grads = None
            if new is None:  # diverged: restart the task
                n_bad += 1
                new = self.init_unroll(u.task, meta_params, derive_seed(
                    "tbptt-reset", seed, i, u.task.seed))
            if grads is None:
                out.append(new)
                continue
            n_ok += 1
            grad_sum = grads if grad_sum is None else [a + b for a, b in zip(grad_sum, grads)]
            losses.append(float(meta_loss.detach()))
            inner.append(loss0)
            out.append(new)
        metrics = {"inner_loss": sum(inner) / len(inner) if inner else float("nan")}
        est = finish_estimate(meta_params, grad_sum, n_ok, losses, n_bad, self.max_grad_norm,
                              metrics, drop_nonfinite=True)
        return est, out

    def _truncation(self, u: Unroll, meta: Mapping[str, Tensor]
                    ) -> Tuple[Optional[Tensor], float, Optional[Unroll]]:
        """``(meta_loss, train loss at θ_0, advanced detached unroll)``; the meta-loss
        carries the graph back to ``meta``. When a loss turns non-finite the truncation
        stops: the meta-loss is the mean of the finite terms before it (None if there
        are none) and the unroll is None (the caller restarts it)."""
        task, names = u.task, list(u.params.keys())
        named = lambda ps: OrderedDict(zip(names, ps))  # noqa: E731
        steps = min(self.truncation, self.horizon - u.step)
        params = [p.detach() for p in u.params.values()]
        state = _detach_state(u.state)
        split = self.meta_loss.split
        terms: List[Tensor] = []
        diverged = False
        for t in range(steps + 1):
            k = u.step + t
            if t == 0:
                # θ_0 is detached: its loss only gives the first inner gradient.
                leaf = [p.detach().requires_grad_() for p in params]
                loss = task.loss(named(leaf), task.batch(k, "train"))
                loss0 = float(loss.detach())
                grads = torch.autograd.grad(loss, leaf)
            else:
                train = None
                if split == "train":
                    train = task.loss(named(params), task.batch(k, "train"))
                    term = self.meta_loss.term(train)
                else:
                    term = self.meta_loss.term(task.loss(named(params), task.batch(k, split)))
                    if t < steps:
                        train = task.loss(named(params), task.batch(k, "train"))
                # A host sync per inner step: where a divergence starts decides which
                # terms carry its gradient. With split "train" the term is f(train), so
                # a finite term already implies a finite train loss: one sync, not two.
                train_ok = split == "train" or train is None or bool(torch.isfinite(train))
                if not (bool(torch.isfinite(term)) and train_ok):
                    diverged = True
                    break
                terms.append(term)
                if t == steps:
                    break
                # second_order=False: the inner gradient enters the rule as a constant
                # (no graph through it). The loss's graph is kept (retain_graph) because
                # the meta-loss term above backpropagates through it.
                grads = torch.autograd.grad(train, params, retain_graph=True,
                                            create_graph=self.second_order)
            params, state = update(params, grads, state, meta, self.config, lr=self.lr,
                                   fused=self.fused)
        meta_loss = torch.stack(terms).mean() if terms else None
        if diverged:
            return meta_loss, loss0, None
        new = Unroll(task=task, params=OrderedDict(zip(names, (p.detach() for p in params))),
                     state=_detach_state(state), step=u.step + steps, extra=dict(u.extra))
        return meta_loss, loss0, new
