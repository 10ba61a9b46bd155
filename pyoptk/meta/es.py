"""Evolution strategies over truncated unrolls: antithetic truncated ES and Persistent
ES (PES; Vicol, Metz & Sohl-Dickstein 2021, "Unbiased Gradient Estimation in Unrolled
Computation Graphs with Persistent Evolution Strategies", https://arxiv.org/abs/2112.13835).

Both perturb the meta-parameters ``φ`` with ``N`` antithetic pairs ``φ ± ε_j``,
``ε_j ~ N(0, σ² I)``, run the truncation once per particle and return

.. math::
    \\hat g = \\frac{1}{2σ^2 N} \\sum_{j=1}^{N} ξ_j \\big(L(φ + ε_j) - L(φ - ε_j)\\big)

with ``L`` the truncation's :class:`~pyoptk.meta.estimator.MetaLoss`:

* **ES** (:class:`TruncatedES`): ``ξ_j = ε_j``; every particle starts the truncation
  from the same inner state, the unperturbed trajectory's, which a central particle
  (``φ`` itself) advances. Unbiased for the smoothed loss of one truncation, but greedy
  over the horizon: like TBPTT it ignores how ``φ`` shaped the state it starts from.
* **PES** (:class:`PersistentES`): every particle keeps its own inner state across
  truncations and ``ξ_j`` accumulates the perturbations its trajectory has seen
  (``ξ_j ← ξ_j + ε_j`` each truncation, fresh ``ε_j``; kept in ``Unroll.extra``).
  Summed over the truncations of an unroll, the estimates are the ES gradient of the
  whole unroll's smoothed loss: unbiased, at the cost of a higher variance that grows
  with the number of truncations.

No backpropagation through the rule. The inner gradients of all ``2N (+1)`` particles
come from one ``torch.func.vmap`` of ``torch.func.grad`` of ``task.loss`` per inner
step. The step is the fused rule (:func:`pyoptk.ops.mlp_step`'s forward: the native CPU
kernel, Triton or CUDA on a GPU) called once per particle with that particle's
meta-parameters, written into the stacked outputs. Or it is the reference
:func:`update` under ``vmap`` over the particles: pure torch ops, one batched call.
``fused=None`` (the default) takes the fused loop on CPU for particles of at least
:data:`FUSED_MIN_NUMEL` elements, when the fused op takes the inputs. ``fused=True``
always takes it, ``fused=False`` never.

Measured on CPU, 1 thread, 16 particles, ``pyoptk bench meta``'s tasks (1,000–20,738
parameters):

* The fused loop is 2.6–4.7× faster. The vmapped reference materializes every
  intermediate of the per-element MLP for all particles at once.
* The fused loop needs 8–11× less memory, for the same reason.
* It gives the same estimate up to float32 rounding: bitwise on the quadratic, within
  2e-5 relative after two truncations on the MLPs. An ES difference quotient amplifies
  rounding by ``1/σ``.
* Below ~64 elements per particle (with many particles) the loop's per-call cost
  dominates and ``vmap`` wins.
* GPUs keep the vmapped reference by default (unmeasured there).

The particles' parameters and states are stacked along a leading dimension. Randomness
comes only from ``estimate(..., seed=)``.
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict
from typing import List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from pyoptk.learned.mlp import (
    MLPConfig, MLPState, check_meta_params, decays_tensor, fused_unsupported, meta_weights, update)
from pyoptk.meta.estimator import (
    Estimate, GradientEstimator, MetaLoss, Unroll, check_estimator_args, finish_estimate)
from pyoptk.meta.tbptt import fresh_unroll
from pyoptk.ops.mlp_update import mlp_update_particles_
from pyoptk.tasks.base import Task, derive_seed, generator

__all__ = ["TruncatedES", "PersistentES", "PES_ACCUM", "FUSED_MIN_NUMEL"]

#: ``Unroll.extra`` key prefix of PES's accumulated perturbations (one (N, *shape)
#: tensor per meta-parameter, the positive particles'; the negative ones' are minus).
PES_ACCUM = "pes_accum."


#: Elements per particle from which ``fused=None`` steps the particles one by one with
#: the fused rule (CPU). Measured on CPU, 1 thread, quadratics, 16 and 128 particles,
#: per particle-step, vmapped gradients included:
#:
#: * the loop costs ~35–80 µs up to 1,000 elements (checks once per step, then the
#:   backend per particle: :func:`~pyoptk.ops.mlp_update.mlp_update_particles_`);
#: * the vmapped reference costs ~0.3–0.5 µs per element, plus its per-op overhead
#:   shared by the particles.
#:
#: The loop/vmap time is 2.05 at 30 elements and 0.75 at 100 with 128 particles, and
#: 0.80 at 30 with 16. So the two break even between 30 and 100 elements.
FUSED_MIN_NUMEL = 64


def _stack(t: Tensor, n: int) -> Tensor:
    """``n`` copies of ``t`` along a new leading dim (contiguous: particles diverge)."""
    return t.unsqueeze(0).repeat((n,) + (1,) * t.dim())


class _AntitheticES(GradientEstimator):
    """What :class:`TruncatedES` and :class:`PersistentES` share: arguments, the
    perturbation draw, the truncation (vmapped gradients, fused or vmapped steps) and the
    NaN policy."""

    _name = "ES"

    def __init__(self, config: MLPConfig, truncation: int, horizon: int, *,
                 sigma: float = 0.01, n_particles: int = 8, meta_loss: MetaLoss = MetaLoss(),
                 lr: float = 1.0, max_grad_norm: Optional[float] = None,
                 fused: Optional[bool] = None):
        owner = type(self).__name__
        if not isinstance(config, MLPConfig):
            raise TypeError(f"{owner}: config must be an MLPConfig, got {type(config).__name__}")
        if fused not in (None, True, False):
            raise TypeError(f"{owner}: fused must be None, True or False, got {fused!r}")
        check_estimator_args(owner, truncation, horizon, max_grad_norm, meta_loss)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
                sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"{owner}: sigma must be a finite float > 0, got {sigma!r}")
        if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 1:
            raise ValueError(f"{owner}: n_particles (antithetic pairs) must be an int >= 1, "
                             f"got {n_particles!r}")
        self.config = config
        self.truncation = truncation
        self.horizon = horizon
        self.sigma = float(sigma)
        self.n_particles = n_particles
        self.meta_loss = meta_loss
        self.lr = float(lr)
        self.max_grad_norm = max_grad_norm
        self.fused = fused

    #: Particles beyond the 2N perturbed ones (ES: the central one).
    _n_extra = 0

    @abc.abstractmethod
    def _start(self, u: Unroll, n_total: int) -> Tuple[List[Tensor], MLPState]:
        """The stacked (n_total, *shape) params and state the truncation starts from."""

    @abc.abstractmethod
    def _finish(self, u: Unroll, eps: "OrderedDict[str, Tensor]", losses: Tensor,
                params: List[Tensor], state: MLPState
                ) -> Tuple[List[Tensor], float, Unroll]:
        """``(gradient, reported meta-loss, advanced unroll)`` from the particles'
        meta-losses ``losses`` (n_total,) and end-of-truncation params/state."""

    def draw(self, meta_params: Mapping[str, Tensor], seed: int, index: int
             ) -> "OrderedDict[str, Tensor]":
        """The perturbations ``ε`` (N, *shape) of unroll ``index`` for ``seed``:
        ``σ·N(0, 1)`` from a generator seeded by ``(name, seed, index)`` (on CPU, then
        moved: the same draw on every device)."""
        g = generator(self._name, int(seed), int(index))
        return OrderedDict(
            (k, (self.sigma * torch.randn((self.n_particles,) + tuple(v.shape), generator=g,
                                          dtype=v.dtype)).to(v.device))
            for k, v in meta_params.items())

    def estimate(self, meta_params: Mapping[str, Tensor], unrolls: List[Unroll], *,
                 seed: int) -> Tuple[Estimate, List[Unroll]]:
        """One truncation of every unroll (per inner step: one vmapped gradient call for
        all particles of an unroll, then their steps); the antithetic estimate averaged
        over the unrolls.
        ``metrics``: ``grad_norm`` (before clipping), ``clipped``, ``n_nonfinite``."""
        check_meta_params(meta_params, self.config)
        if not unrolls:
            raise ValueError(f"{type(self).__name__}.estimate: unrolls must not be empty")
        meta = OrderedDict((k, v.detach()) for k, v in meta_params.items())
        grad_sum: Optional[List[Tensor]] = None
        losses, out = [], []
        n_ok = n_bad = 0
        for i, u in enumerate(unrolls):
            if u.done(self.horizon):
                raise ValueError(f"{type(self).__name__}.estimate: unroll {i} is done (step "
                                 f"{u.step} >= horizon {self.horizon}); replace it with "
                                 f"init_unroll")
            eps = self.draw(meta, seed, i)
            particle_meta = OrderedDict(
                (k, torch.cat([v + eps[k], v - eps[k]]
                              + [v.unsqueeze(0)] * self._n_extra)) for k, v in meta.items())
            with torch.no_grad():
                p_losses, params, state = self._truncation(u, particle_meta)
                grads, loss, new = self._finish(u, eps, p_losses, params, state)
            if not (bool(torch.isfinite(p_losses).all())
                    and all(bool(torch.isfinite(g).all()) for g in grads)):
                n_bad += 1
                out.append(self.init_unroll(u.task, meta_params, derive_seed(
                    f"{self._name}-reset", seed, i, u.task.seed)))
                continue
            n_ok += 1
            grad_sum = grads if grad_sum is None else [a + b for a, b in zip(grad_sum, grads)]
            losses.append(loss)
            out.append(new)
        est = finish_estimate(meta_params, grad_sum, n_ok, losses, n_bad, self.max_grad_norm)
        return est, out

    def _antithetic(self, xi: Mapping[str, Tensor], losses: Tensor) -> List[Tensor]:
        """``Σ_j ξ_j (L⁺_j − L⁻_j) / (2σ² N)`` per meta-parameter."""
        n = self.n_particles
        diff = losses[:n] - losses[n:2 * n]
        scale = 1.0 / (2.0 * self.sigma ** 2 * n)
        return [torch.tensordot(diff.to(x.dtype), x, dims=1) * scale for x in xi.values()]

    def _truncation(self, u: Unroll, particle_meta: Mapping[str, Tensor]
                    ) -> Tuple[Tensor, List[Tensor], MLPState]:
        """Every particle through one truncation: ``(meta-losses (P,), params, state)``
        (stacked along dim 0, ``P = 2N + extra``)."""
        task, names = u.task, list(u.params.keys())
        n_total = 2 * self.n_particles + self._n_extra
        params, state = self._start(u, n_total)
        steps = min(self.truncation, self.horizon - u.step)
        split = self.meta_loss.split
        config, lr = self.config, self.lr

        def loss_fn(ps, batch):
            return task.loss(OrderedDict(zip(names, ps)), batch)

        v_grad = torch.func.vmap(torch.func.grad_and_value(loss_fn), in_dims=(0, None))
        v_loss = torch.func.vmap(loss_fn, in_dims=(0, None))

        def step_fn(ps, gs, st, mp):
            return update(ps, gs, st, mp, config, lr=lr, fused=False)

        v_step = torch.func.vmap(step_fn)
        terms: List[Tensor] = []
        fused: Optional[bool] = None  # decided on the first step's tensors
        for t in range(steps + 1):
            k = u.step + t
            if t > 0 and split != "train":
                terms.append(self.meta_loss.term(v_loss(params, task.batch(k, split))))
            if t == steps:
                if split == "train":
                    terms.append(self.meta_loss.term(v_loss(params, task.batch(k, "train"))))
                break
            grads, loss = v_grad(params, task.batch(k, "train"))
            if t > 0 and split == "train":
                terms.append(self.meta_loss.term(loss))
            if fused is None:
                fused = self._use_fused(params, grads, state)
            if fused:
                params, state = self._fused_step(list(params), list(grads), state,
                                                 particle_meta)
            else:
                params, state = v_step(list(params), list(grads), state, particle_meta)
        return torch.stack(terms).mean(0), list(params), state

    def _use_fused(self, params: List[Tensor], grads: List[Tensor], state: MLPState) -> bool:
        """Whether the inner steps run the fused rule particle by particle (``fused``;
        None: on CPU, for particles of at least :data:`FUSED_MIN_NUMEL` elements, when
        :func:`pyoptk.ops.mlp_step` takes one particle's tensors)."""
        if self.fused is False:
            return False
        if self.fused is None and (params[0].device.type != "cpu" or
                                   sum(t[0].numel() for t in params) < FUSED_MIN_NUMEL):
            return False
        why = fused_unsupported([t[0] for t in params], [g[0] for g in grads],
                                MLPState(*[[t[0] for t in lst] for lst in state]))
        if why is not None and self.fused:
            raise ValueError(f"{type(self).__name__}(fused=True): the fused op cannot take "
                             f"these inputs: {why}")
        return why is None

    def _fused_step(self, params: List[Tensor], grads: List[Tensor], state: MLPState,
                    particle_meta: Mapping[str, Tensor]) -> Tuple[List[Tensor], MLPState]:
        """One inner step of every particle: the fused rule with particle ``j``'s
        meta-parameters on its slices ``[j]`` of the stacked tensors, into new stacked
        tensors (the inputs stay intact, as the unroll may still hold them). float32
        state: copies stepped in place by :func:`mlp_update_particles_` (checked once,
        no per-particle dispatch); float64: :func:`update` particle by particle."""
        if state.step[0].dtype == torch.float32:
            new_params = [t.clone() for t in params]
            new_state = MLPState(*[[t.clone() for t in lst] for lst in state])
            decays = decays_tensor(self.config, particle_meta, device=params[0].device)
            P = params[0].shape[0]
            mlp_update_particles_(
                new_params, [g.contiguous() for g in grads], new_state.mom, new_state.rms, new_state.fac_row,
                new_state.fac_col, new_state.step, meta_weights(particle_meta, self.config),
                decays.expand(P, decays.shape[-1]).contiguous(), self.config.op_hyper(self.lr))
            return new_params, new_state
        new_params = [torch.empty_like(t) for t in params]
        new_state = MLPState(*[[torch.empty_like(t) for t in lst] for lst in state])
        for j in range(params[0].shape[0]):
            ps, st = update([t[j] for t in params], [g[j] for g in grads],
                            MLPState(*[[t[j] for t in lst] for lst in state]),
                            OrderedDict((k, v[j]) for k, v in particle_meta.items()),
                            self.config, lr=self.lr, fused=True)
            for dst, src in zip(new_params, ps):
                dst[j].copy_(src)
            for dsts, srcs in zip(new_state, st):
                for dst, src in zip(dsts, srcs):
                    dst[j].copy_(src)
        return new_params, new_state


class TruncatedES(_AntitheticES):
    """Antithetic ES over one truncation (see the module docstring).

    Args:
        config (MLPConfig): the rule.
        truncation (int): inner steps per :meth:`estimate`.
        horizon (int): inner steps per unroll.
        sigma (float, default 0.01): standard deviation σ of the perturbations.
        n_particles (int, default 8): antithetic pairs N (2N + 1 particles are run: the
            central one carries the unroll's state).
        meta_loss (MetaLoss, default MetaLoss()): per particle, the mean train loss of
            ``θ_1 … θ_T``.
        lr (float, default 1.0): the inner learning-rate multiplier.
        max_grad_norm (float or None, default None): clip the averaged estimate.
        fused (bool or None, default None): the inner step, see the module docstring:
            None runs the fused rule particle by particle when it takes the tensors,
            True requires it (``ValueError`` otherwise), False runs the reference under
            ``vmap``.

    ``Estimate.meta_loss`` is the central particle's (unperturbed ``φ``). NaN policy as
    :class:`~pyoptk.meta.TruncatedBPTT`: any non-finite particle loss or estimate of an
    unroll makes the estimate ``finite=False`` (zeros) and restarts that unroll.
    """

    _name = "ES"
    _n_extra = 1

    def init_unroll(self, task: Task, meta_params: Mapping[str, Tensor], seed: int) -> Unroll:
        return fresh_unroll(task, self.config, meta_params, seed)

    def _start(self, u, n_total):
        params = [_stack(p, n_total) for p in u.params.values()]
        state = MLPState(*[[_stack(t, n_total) for t in lst] for lst in u.state])
        return params, state

    def _finish(self, u, eps, losses, params, state):
        grads = self._antithetic(eps, losses)
        center = MLPState(*[[t[-1].clone() for t in lst] for lst in state])
        center_params = OrderedDict(zip(u.params, (p[-1].clone() for p in params)))
        new = Unroll(task=u.task, params=center_params, state=center,
                     step=u.step + min(self.truncation, self.horizon - u.step),
                     extra=dict(u.extra))
        return grads, float(losses[-1]), new


class PersistentES(_AntitheticES):
    """Persistent ES (PES) with antithetic pairs (see the module docstring).

    Args: as :class:`TruncatedES` (``n_particles`` pairs: 2N particles, each with its
    own inner trajectory for the whole unroll).

    The unroll holds the particles' parameters and state stacked along a leading
    dimension of size 2N (positive particles first), and in ``extra`` the accumulated
    perturbations ``ξ`` of the positive particles under :data:`PES_ACCUM` + name. The
    estimate of a truncation uses ``ξ`` *including* this truncation's perturbation.
    ``Estimate.meta_loss`` is the mean over the 2N particles. NaN policy as
    :class:`TruncatedES` (the restarted unroll's ``ξ`` is zero again).
    """

    _name = "PES"

    def init_unroll(self, task: Task, meta_params: Mapping[str, Tensor], seed: int) -> Unroll:
        u = fresh_unroll(task, self.config, meta_params, seed)
        n = 2 * self.n_particles
        u.params = OrderedDict((k, _stack(p, n)) for k, p in u.params.items())
        u.state = MLPState(*[[_stack(t, n) for t in lst] for lst in u.state])
        u.extra = {PES_ACCUM + k: torch.zeros((self.n_particles,) + tuple(v.shape),
                                              dtype=v.dtype, device=v.device)
                   for k, v in meta_params.items()}
        return u

    def _start(self, u, n_total):
        held = {p.shape[0] for p in u.params.values()}
        if held != {n_total}:
            raise ValueError(f"PersistentES: the unroll holds {sorted(held)} "
                             f"particles, this estimator runs {n_total} (2·n_particles); "
                             f"create it with this estimator's init_unroll")
        return list(u.params.values()), MLPState(*[list(lst) for lst in u.state])

    def _finish(self, u, eps, losses, params, state):
        xi = OrderedDict((k, u.extra[PES_ACCUM + k] + e) for k, e in eps.items())
        grads = self._antithetic(xi, losses)
        extra = dict(u.extra)
        extra.update((PES_ACCUM + k, v) for k, v in xi.items())
        new = Unroll(task=u.task, params=OrderedDict(zip(u.params, params)), state=state,
                     step=u.step + min(self.truncation, self.horizon - u.step), extra=extra)
        return grads, float(losses.mean()), new
