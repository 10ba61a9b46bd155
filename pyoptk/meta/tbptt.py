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

    All unrolls step in lockstep, one :func:`update` call per inner step over all their
    tensors (the fused op is multi-tensor; tasks may differ in shapes), and one backward
    for the sum of their meta-losses.

    NaN policy: a non-finite meta-loss or meta-gradient of an unroll makes the whole
    estimate ``finite=False`` with zero gradients (see
    :func:`~pyoptk.meta.estimator.finish_estimate`), and that unroll is restarted from
    step 0 of its task with a fresh initialization; the other unrolls advance. (A
    non-finite gradient is traced to unrolls by backpropagating each finite meta-loss
    alone; since the unrolls share each step's op call, a rare NaN born in the shared
    backward can mark them all.)
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
        for i, u in enumerate(unrolls):
            if u.done(self.horizon):
                raise ValueError(f"TruncatedBPTT.estimate: unroll {i} is done (step {u.step} "
                                 f">= horizon {self.horizon}); replace it with init_unroll")
        leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in meta_params.items())
        runs = self._truncations(unrolls, leaves)
        finite = [bool(torch.isfinite(r.meta_loss)) for r in runs]
        grad_sum: Optional[List[Tensor]] = None
        if any(finite):
            # One backward for all unrolls (the sum of their meta-losses). The graph is
            # kept until we return so that a non-finite gradient can be traced to its
            # unroll(s) below — that costs no memory: the graph is alive until then.
            total = torch.stack([r.meta_loss for r, f in zip(runs, finite) if f]).sum()
            grad_sum = self._grads(total, leaves, retain_graph=True)
            if not all(bool(torch.isfinite(g).all()) for g in grad_sum):
                for i, r in enumerate(runs):
                    if finite[i]:
                        g = self._grads(r.meta_loss, leaves, retain_graph=True)
                        finite[i] = all(bool(torch.isfinite(x).all()) for x in g)
                grad_sum = None
        out, losses, inner = [], [], []
        for i, (u, r, ok) in enumerate(zip(unrolls, runs, finite)):
            if ok:
                out.append(r.unroll)
                losses.append(float(r.meta_loss.detach()))
                inner.append(r.loss0)
            else:
                out.append(self.init_unroll(u.task, meta_params, derive_seed(
                    "tbptt-reset", seed, i, u.task.seed)))
        n_ok, n_bad = len(losses), len(unrolls) - len(losses)
        metrics = {"inner_loss": sum(inner) / len(inner) if inner else float("nan")}
        est = finish_estimate(meta_params, grad_sum, n_ok, losses, n_bad, self.max_grad_norm,
                              metrics)
        return est, out

    @staticmethod
    def _grads(loss: Tensor, leaves: Mapping[str, Tensor], retain_graph: bool) -> List[Tensor]:
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                    retain_graph=retain_graph)
        return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves.values())]

    def _truncations(self, unrolls: List[Unroll], meta: Mapping[str, Tensor]) -> List["_Run"]:
        """Every unroll through its truncation, in lockstep: per inner step, each task's
        loss and gradient, then **one** :func:`update` over the tensors of all unrolls
        still stepping (the fused op is multi-tensor, and its fixed per-call cost is
        paid once per step instead of once per unroll). Each run's meta-loss carries the
        graph back to ``meta``."""
        runs = [_Run(u, min(self.truncation, self.horizon - u.step)) for u in unrolls]
        split = self.meta_loss.split
        for t in range(max(r.steps for r in runs) + 1):
            stepping: List[Tuple["_Run", List[Tensor]]] = []
            for r in runs:
                if t > r.steps:
                    continue
                task, k = r.unroll.task, r.unroll.step + t
                if t == 0:
                    # θ_0 is detached: its loss only gives the first inner gradient.
                    leaf = [p.detach().requires_grad_() for p in r.params]
                    loss = task.loss(r.named(leaf), task.batch(k, "train"))
                    r.loss0 = float(loss.detach())
                    stepping.append((r, list(torch.autograd.grad(loss, leaf))))
                    continue
                train = None
                if split == "train":
                    train = task.loss(r.named(r.params), task.batch(k, "train"))
                    r.terms.append(self.meta_loss.term(train))
                else:
                    r.terms.append(self.meta_loss.term(
                        task.loss(r.named(r.params), task.batch(k, split))))
                    if t < r.steps:
                        train = task.loss(r.named(r.params), task.batch(k, "train"))
                if t == r.steps:
                    continue
                # second_order=False: the inner gradient enters the rule as a constant
                # (no graph through it). The loss's graph is kept (retain_graph) because
                # the meta-loss term above backpropagates through it.
                stepping.append((r, list(torch.autograd.grad(
                    train, r.params, retain_graph=True, create_graph=self.second_order))))
            if not stepping:
                break
            params = [p for r, _ in stepping for p in r.params]
            grads = [g for _, gs in stepping for g in gs]
            state = MLPState(*[[x for r, _ in stepping for x in getattr(r.state, f)]
                               for f in MLPState._fields])
            params, state = update(params, grads, state, meta, self.config, lr=self.lr,
                                   fused=self.fused)
            at = 0
            for r, _ in stepping:
                n = len(r.params)
                r.params = params[at:at + n]
                r.state = MLPState(*[lst[at:at + n] for lst in state])
                at += n
        for r in runs:
            r.finish()
        return runs


class _Run:
    """One unroll's truncation in progress (see :meth:`TruncatedBPTT._truncations`);
    after :meth:`finish`, ``meta_loss`` (with its graph) and the advanced, detached
    ``unroll``."""

    def __init__(self, u: Unroll, steps: int):
        self.unroll, self.steps = u, steps
        self.names = list(u.params.keys())
        self.params = [p.detach() for p in u.params.values()]
        self.state = _detach_state(u.state)
        self.terms: List[Tensor] = []
        self.loss0 = float("nan")
        self.meta_loss: Optional[Tensor] = None

    def named(self, params: List[Tensor]) -> "OrderedDict[str, Tensor]":
        return OrderedDict(zip(self.names, params))

    def finish(self) -> None:
        u = self.unroll
        self.meta_loss = torch.stack(self.terms).mean()
        self.unroll = Unroll(task=u.task, params=OrderedDict(
            zip(self.names, (p.detach() for p in self.params))), state=_detach_state(self.state),
            step=u.step + self.steps, extra=dict(u.extra))
