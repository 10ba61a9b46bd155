"""MAML on any ``nn.Module``: exact second-order, first-order, MetaSGD and ANIL.

For a batch of ``T`` tasks with support ``(x_s, y_s)`` and query ``(x_q, y_q)`` sets,
MAML (Finn et al. 2017) meta-learns the initialization ``θ`` of ``model`` by
differentiating through ``K`` inner gradient steps:

.. math::
    θ^{(t)}_0 = θ,\\qquad θ^{(t)}_{k+1} = θ^{(t)}_k - α ⊙ ∇_θ L(θ^{(t)}_k; x^{(t)}_s, y^{(t)}_s),
    \\qquad \\mathcal{L}(θ) = \\frac1T \\sum_t L(θ^{(t)}_K; x^{(t)}_q, y^{(t)}_q)

* ``first_order=False`` (default): the exact meta-gradient, Hessian–vector products
  included. ``first_order=True``: FOMAML, the inner gradients are treated as constants,
  so ``∇\\mathcal{L} = \\frac1T \\sum_t ∇L(θ^{(t)}_K; x_q, y_q)``.
* ``learn_inner_lr=True``: MetaSGD (Li et al. 2017), ``α`` is a learned tensor per
  parameter element (initialized to ``inner_lr``), one of this module's parameters.
* ``adapt=["head"]``: ANIL (Raghu et al. 2020), only the named parameters (names or
  name prefixes of ``model.named_parameters()``) move in the inner loop; the others are
  shared by all tasks and meta-learned through the outer loss only.
* ``inner_optimizer="adam"``: the inner steps are Adam steps (fresh moments per task).

**How it runs.** The model is called through ``torch.func.functional_call`` with the
adapted tensors substituted — the user's module is never modified. The adapted
parameters of all ``T`` tasks are held as ``[T, *shape]`` tensors (step 0's are
expanded views of the meta-parameters, not copies); with ``batched=True`` one
``torch.func.vmap`` over tasks runs every task's support forward at once, so one
``torch.autograd.grad`` gives all tasks' inner gradients and the second-order backward
computes the Hessian–vector products of all tasks in one batched pass. The plain SGD
step is ``θ + s`` with ``s = -α ∇L`` taken from a backward seeded with ``-α`` (no
multiply, and its backward allocates nothing); MetaSGD and Adam use the fused
differentiable ops of :mod:`pyoptk.ops.inner_step` (``inner_metasgd`` /
``inner_adam``) on the whole task batch. ``batched=False`` loops over tasks (needed
when the model's forward cannot be vmapped, e.g. batch norm updating running stats).

**Convolutions.** vmap turns a convolution with per-task weights into one grouped
convolution; on CPU that is slower than ``T`` separate ones (measured 1.3–2× on the
bench CNN) and its backward holds all ``T`` tasks' activation gradients at once. So when
an adapted parameter belongs to a convolution, the query pass (one forward of ``T``
query sets, the largest activations) loops over tasks by default on CPU
(``batch_query``; GPUs keep it vmapped: unmeasured there, and a loop costs launches);
the many small support passes stay vmapped. Bench CNN, 8 tasks, 1 step, 1 thread:
1.0× → 1.4–1.6× the speed of ``higher`` (the query pass alone is half of ``higher``'s
time there, so 2× is out of reach on one thread).

**Memory.** The exact meta-gradient keeps every inner step's graph: memory grows
linearly in ``inner_steps`` (activations of ``T`` support forwards and their
double-backward per step). It saves for backward what a plain per-task unroll saves
(tested): no inner gradients, no per-task copies of the initialization. The query pass
— usually the largest activations (75 query images per task against 5 support images
on the bench CNN) — is backpropagated inside :meth:`MAML.meta_loss`, right after its
forward and task by task when it loops over tasks, into the adapted parameters and
the shared ones (``early_query_backward``, :class:`_QueryLoss`): the outer backward then
starts from those cotangents, so query activations never coexist with the inner graphs
(bench CNN, 8 tasks, 1 step: 16.7 → 5.9 MB, same time and meta-gradient). It falls back
to the plain path when the query outputs are returned, the query data require grad,
autocast is on (the loss scale must reach the query pass), or the query loss depends on
a tensor requiring grad outside the model's parameters (found by a walk of the first
task's query graph; e.g. a ``loss_fn`` with a learned temperature). The meta-loss is
then differentiable once (``create_graph=True`` in its backward raises; build with
``early_query_backward=False`` for that). A batched
backward still forms each step's cotangents for all ``T`` tasks at once (a few
``[T, *shape]`` tensors live together), where a per-task unroll forms one task's at a
time, so a loop over tasks (``batched=False``) or over halves of the meta-batch has a
lower peak at a higher cost (docs/maml.md). Bounded alternatives: ``first_order=True``
(memory of one step, no second-order term); ``checkpoint_inner=True`` (exact: each
inner step is a ``torch.utils.checkpoint`` segment, only its input parameters are kept
and its graph is recomputed in the backward — one extra support forward + gradient per
step); and ``hvp="finite_difference"`` (no inner graph: only the ``K`` adapted parameter
vectors and gradients are kept, and each inner step's backward costs two extra gradient
evaluations; see :meth:`MAML.meta_loss` for its error).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.checkpoint import checkpoint

from pyoptk.ops.inner_step import inner_adam, inner_metasgd, inner_sgd

__all__ = ["MAML", "shard_meta_batch"]

LossFn = Callable[[Tensor, Tensor], Tensor]
_OPTIMIZERS = ("sgd", "adam")
_HVP = ("exact", "finite_difference")


def shard_meta_batch(batch, rank: int, world_size: int):
    """This rank's contiguous share of a meta-batch (every field sliced along the task
    dimension), for data-parallel meta-training: ``T`` must divide by ``world_size`` so
    that the mean of the ranks' meta-losses is the full meta-batch's."""
    T = int(batch[0].shape[0])
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_meta_batch: rank {rank} out of range for world_size {world_size}")
    if T % world_size:
        raise ValueError(f"shard_meta_batch: {T} tasks do not split evenly over {world_size} ranks")
    n = T // world_size
    return type(batch)(*(t[rank * n:(rank + 1) * n] for t in batch))


def _adapts_convolution(model: nn.Module, adapted: Sequence[str]) -> bool:
    """Whether one of the ``adapted`` parameters belongs to a convolution module."""
    return any(name in adapted for prefix, m in model.named_modules()
               if isinstance(m, nn.modules.conv._ConvNd)
               for name, _ in m.named_parameters(prefix=prefix, recurse=False))


def _resolve_adapted(model: nn.Module, adapt: Optional[Sequence[str]]) -> List[str]:
    names = [n for n, p in model.named_parameters()]
    if not names:
        raise ValueError("MAML: model has no parameters")
    if adapt is None:
        return names
    if isinstance(adapt, str):
        adapt = [adapt]
    chosen = []
    for key in adapt:
        hit = [n for n in names if n == key or n.startswith(key + ".")]
        if not hit:
            raise ValueError(f"MAML: adapt entry {key!r} matches no parameter of the model; "
                             f"parameters are {names}")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in names if n in chosen]


class MAML(nn.Module):
    """Meta-learner wrapping ``model`` (module docstring for the math and the modes).

    Args:
        model (nn.Module): maps a task's inputs ``x`` (one task, no task dimension) to
            outputs; its parameters are the meta-learned initialization.
        loss_fn (callable): ``loss_fn(outputs, targets) -> scalar`` of one task, e.g.
            ``torch.nn.functional.cross_entropy``.
        inner_steps (int): ``K``, gradient steps on the support set (default 1).
        inner_lr (float): ``α`` (the initial ``α`` with ``learn_inner_lr``). Default 0.01.
        first_order (bool): FOMAML (default False: exact second order).
        learn_inner_lr (bool): MetaSGD learned per-element ``α`` (default False).
        adapt (sequence of str, optional): names / prefixes of the parameters adapted in
            the inner loop (ANIL); default all.
        inner_optimizer (str): ``"sgd"`` (default) or ``"adam"``.
        adam_betas, adam_eps: the inner Adam's hyperparameters.
        batched (bool): vmap the forward over tasks (default True).
        batch_query (bool, optional): with ``batched``, vmap the query pass too (one
            forward of the adapted parameters on each task's query set). Default
            (None): yes, except on CPU when an adapted parameter belongs to a
            convolution; then the query pass loops over tasks (see the module
            docstring, **Convolutions**, and :meth:`query_batched`).
        hvp (str): ``"exact"`` (default) or ``"finite_difference"`` (see :meth:`meta_loss`).
        checkpoint_inner (bool): gradient checkpointing of the inner loop (default False;
            see the module docstring).
        fd_eps (float): the finite-difference step ``r·‖w‖`` (default 1e-4, for float64;
            use ~1e-3 in float32, see docs/maml.md).
        early_query_backward (bool): backpropagate the query pass inside
            :meth:`meta_loss`, so its activations are freed before the outer backward
            (default True; see the module docstring, **Memory**). The meta-loss is then
            differentiable once (a backward with ``create_graph=True`` raises): set
            False to differentiate the meta-gradient again.

    ``MAML(...).parameters()`` are the meta-parameters: the model's, and ``α`` under
    MetaSGD (:attr:`inner_lrs`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, inner_steps: int = 1,
                 inner_lr: float = 0.01, first_order: bool = False,
                 learn_inner_lr: bool = False, adapt: Optional[Sequence[str]] = None,
                 inner_optimizer: str = "sgd", adam_betas: Tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, batched: bool = True,
                 batch_query: Optional[bool] = None, hvp: str = "exact",
                 checkpoint_inner: bool = False, fd_eps: float = 1e-4,
                 early_query_backward: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML: model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("MAML: loss_fn must be callable (outputs, targets) -> scalar")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"MAML: inner_steps must be an int >= 1, got {inner_steps!r}")
        if not inner_lr > 0:
            raise ValueError(f"MAML: inner_lr must be > 0, got {inner_lr!r}")
        if inner_optimizer not in _OPTIMIZERS:
            raise ValueError(f"MAML: inner_optimizer must be one of {_OPTIMIZERS}, "
                             f"got {inner_optimizer!r}")
        if hvp not in _HVP:
            raise ValueError(f"MAML: hvp must be one of {_HVP}, got {hvp!r}")
        if learn_inner_lr and inner_optimizer != "sgd":
            raise ValueError("MAML: learn_inner_lr (MetaSGD) needs inner_optimizer='sgd'")
        if hvp == "finite_difference" and (inner_optimizer != "sgd" or first_order):
            raise ValueError("MAML: hvp='finite_difference' needs inner_optimizer='sgd' and "
                             "first_order=False (it approximates the second-order term)")
        if not fd_eps > 0:
            raise ValueError(f"MAML: fd_eps must be > 0, got {fd_eps!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)
        self.inner_optimizer = inner_optimizer
        self.adam_betas = (float(adam_betas[0]), float(adam_betas[1]))
        self.adam_eps = float(adam_eps)
        self.batched = bool(batched)
        self.hvp = hvp
        self.checkpoint_inner = bool(checkpoint_inner)
        self.fd_eps = float(fd_eps)
        self.early_query_backward = bool(early_query_backward)
        self.adapted_names: List[str] = _resolve_adapted(model, adapt)
        #: Whether (with :attr:`batched`) the query pass is vmapped over tasks; None:
        #: per call (:meth:`query_batched`).
        self.batch_query = None if batch_query is None else bool(batch_query)
        self._adapts_conv = _adapts_convolution(model, self.adapted_names)
        # Set once a query loss is found to need gradients beyond the model's parameters
        # (then the query pass is always backpropagated with the rest, see _QueryLoss).
        self._query_reaches_other_leaves = False
        params = dict(model.named_parameters())
        #: MetaSGD's learned inner learning rates, one per adapted parameter (same shape),
        #: in the order of :attr:`adapted_names`; ``None`` without ``learn_inner_lr``.
        self.inner_lrs: Optional[nn.ParameterList] = None
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(params[n].detach(), self.inner_lr))
                 for n in self.adapted_names])

    # ------------------------------------------------------------------ forward
    def _shared(self) -> Dict[str, Tensor]:
        """Parameters not adapted and buffers: the same for every task."""
        out = {n: p for n, p in self.model.named_parameters() if n not in self.adapted_names}
        out.update(dict(self.model.named_buffers()))
        return out

    def forward_tasks(self, adapted: Dict[str, Tensor], x: Tensor, *,
                      batched: Optional[bool] = None,
                      shared: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Outputs ``[T, ...]`` of the model on each task's inputs ``x [T, ...]`` with that
        task's adapted parameters ``adapted[name]: [T, *shape]`` (the other parameters
        shared, ``shared[name]`` replacing those given): one vmapped call, or a loop over
        tasks (``batched``, default :attr:`batched`)."""
        shared = {**self._shared(), **(shared or {})}

        def one(p: Dict[str, Tensor], xt: Tensor) -> Tensor:
            return functional_call(self.model, {**shared, **p}, (xt,))

        if self.batched if batched is None else batched:
            return vmap(one)(adapted, x)
        # unbind, not indexing: its backward stacks the T per-task gradients once,
        # where T selects would each scatter into a zero [T, *shape] tensor.
        per_task = zip(*(v.unbind(0) for v in adapted.values()))
        return torch.stack([one(dict(zip(adapted, ps)), xt)
                            for ps, xt in zip(per_task, x.unbind(0))])

    def task_losses(self, adapted: Dict[str, Tensor], x: Tensor, y: Tensor, *,
                    batched: Optional[bool] = None,
                    shared: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Per-task losses ``[T]`` of the adapted parameters on ``(x [T, ...], y [T, ...])``
        (``shared`` as in :meth:`forward_tasks`)."""
        return self._losses(self.forward_tasks(adapted, x, batched=batched, shared=shared),
                            y, batched)

    def _losses(self, out: Tensor, y: Tensor, batched: Optional[bool] = None) -> Tensor:
        """``loss_fn`` per task: ``[T]`` from outputs ``[T, ...]`` and targets ``[T, ...]``."""
        if self.batched if batched is None else batched:
            return vmap(self.loss_fn)(out, y)
        return torch.stack([self.loss_fn(o, t) for o, t in zip(out.unbind(0), y.unbind(0))])

    # ------------------------------------------------------------------ inner loop
    def query_batched(self, device: torch.device) -> bool:
        """Whether the query pass on ``device`` is vmapped over tasks (with
        :attr:`batched`): ``batch_query`` when given; else yes, except on CPU when an
        adapted parameter belongs to a convolution (module docstring, **Convolutions**;
        measured on CPU only — on a GPU the loop would cost ``T`` launches per op)."""
        if self.batch_query is not None:
            return self.batch_query
        return not (self._adapts_conv and device.type == "cpu")

    def _check_batch(self, x: Tensor, y: Tensor, what: str) -> int:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"MAML: {what}_x and {what}_y must be tensors")
        if x.dim() < 2 or y.dim() < 1:
            raise ValueError(f"MAML: {what}_x must be [T, n, ...] and {what}_y [T, n, ...] "
                             f"(a leading task dimension); got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(f"MAML: {what}_x {tuple(x.shape)} and {what}_y {tuple(y.shape)} "
                             "must agree in the task and example dimensions [T, n]")
        return int(x.shape[0])

    def _lrs(self, num_tasks: int) -> Optional[List[Tensor]]:
        if self.inner_lrs is None:
            return None
        return [a.unsqueeze(0).expand(num_tasks, *a.shape).contiguous() for a in self.inner_lrs]

    def inner_grads(self, theta: List[Tensor], x: Tensor, y: Tensor, create_graph: bool,
                    scale: float = 1.0) -> Tuple[Tensor, List[Tensor]]:
        """``(losses [T], grads)``: every task's support loss and ``scale`` times its
        gradient with respect to that task's adapted parameters (one backward for the
        whole batch: tasks are independent, so the gradient of the summed loss is the
        per-task gradient). The grads may be non-contiguous (e.g. a vmapped linear
        layer's weight gradient is a transpose)."""
        losses = self.task_losses(dict(zip(self.adapted_names, theta)), x, y)
        total = losses.sum()
        return losses, _grads(total, theta, torch.full_like(total, scale), create_graph)

    @torch.compiler.disable
    def adapt(self, support_x: Tensor, support_y: Tensor, *,
              create_graph: Optional[bool] = None) -> Dict[str, Tensor]:
        """The adapted parameters ``{name: [T, *shape]}`` after ``inner_steps`` steps on
        each task's support set (``support_x [T, n, ...]``, ``support_y [T, n, ...]``).

        ``create_graph`` (default: ``not first_order`` when grad mode is on) keeps the
        graph of the inner gradients for the second-order meta-gradient. With grad mode
        off (``torch.no_grad()``, evaluation) the result is detached.

        Runs eagerly under ``torch.compile`` (``torch.compiler.disable``): a compiled
        region's backward is not differentiable again, so compiling the inner loop
        silently drops the second-order term (measured: a wrong meta-gradient). A
        ``torch.compile``'d ``model`` gives the same meta-gradient (tested)."""
        T = self._check_batch(support_x, support_y, "support")
        track = torch.is_grad_enabled()
        if create_graph is None:
            create_graph = track and not self.first_order
        with torch.enable_grad():
            params = dict(self.model.named_parameters())
            start = [params[n] if track else params[n].detach().requires_grad_()
                     for n in self.adapted_names]
            # Step 0's [T, *shape] parameters: expanded views of θ_0, never copies (the
            # support forward would save T copies until the outer backward).
            theta = [p.expand(T, *p.shape) for p in start]
            lrs = self._lrs(T)
            n = len(theta)
            # Adam's moments (m then v) travel with the parameters through each step.
            state = ([torch.zeros_like(t) for t in theta + theta]
                     if self.inner_optimizer == "adam" else [])

            def step(k: int, *flat: Tensor) -> Tuple[Tensor, ...]:
                th, m, v = list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:])
                if self.inner_optimizer == "sgd" and lrs is None:
                    # SGD with a fixed lr: the step s = -α ∇L comes out of the backward
                    # seeded with -α, and θ' = θ + s is a plain add, whose backward hands
                    # the cotangent of θ' to both inputs as the same tensor. Through
                    # inner_sgd, d_g = -α d_θ' would be one more [T, *shape] tensor per
                    # parameter, alive with the step's Hessian-vector terms (measured at
                    # the peak). Step 0 adds to the unbatched θ_0 (broadcast), so its
                    # backward sums the tasks' cotangents at once.
                    _, steps = self.inner_grads(th, support_x, support_y, create_graph,
                                                -self.inner_lr)
                    return tuple(torch.add(p, s) for p, s in zip(start if k == 0 else th, steps))
                _, grads = self.inner_grads(th, support_x, support_y, create_graph)
                if self.inner_optimizer == "adam":
                    th, m, v = inner_adam(_dense(th), _dense(grads), m, v, k + 1, self.inner_lr,
                                          self.adam_betas[0], self.adam_betas[1], self.adam_eps)
                else:
                    th = inner_metasgd(_dense(th), _dense(grads), lrs)
                return tuple(th + m + v)

            for k in range(self.inner_steps):
                if self.checkpoint_inner and create_graph:
                    flat = checkpoint(step, k, *theta, *state, use_reentrant=False)
                else:
                    flat = step(k, *theta, *state)
                theta, state = list(flat[:n]), list(flat[n:])
                if not track:
                    theta = [t.detach().requires_grad_() for t in theta]
        if not track:
            theta = [t.detach() for t in theta]
        return dict(zip(self.adapted_names, theta))

    # ------------------------------------------------------------------ outer loss
    def forward(self, batch) -> Tensor:
        """:meth:`meta_loss` — so ``DistributedDataParallel(maml)(shard)`` all-reduces
        the meta-gradient across ranks (see :func:`shard_meta_batch`)."""
        return self.meta_loss(batch)

    @torch.compiler.disable
    def meta_loss(self, batch, *, return_outputs: bool = False):
        """The meta-loss: the mean over tasks of the query loss after adaptation.

        ``batch`` is a batched :class:`~pyoptk.tasks.fewshot.Episode` (or any 4-tuple
        ``support_x, support_y, query_x, query_y`` with a leading task dimension ``T``).
        ``meta_loss(batch).backward()`` puts the meta-gradient in ``.grad`` of
        :meth:`parameters`. ``return_outputs=True`` also returns the query outputs
        ``[T, n_query, ...]`` (e.g. for accuracy). Runs eagerly under ``torch.compile``
        (see :meth:`adapt`), so a compiled caller gets the same meta-gradient.

        With ``hvp="finite_difference"`` the backward replaces each Hessian–vector
        product ``H w`` of the exact meta-gradient by the central difference
        ``(∇L(θ + r w) − ∇L(θ − r w)) / 2r`` with ``r = fd_eps / ‖w‖`` per task: no inner
        graph is stored (memory of the ``K`` parameter vectors), each inner step's
        backward costs two gradient evaluations, and the error is ``O(r²)`` — ``r²/6``
        times the third derivative of the support loss along ``w`` (≈1e-8 relative in
        float64 with the default ``fd_eps``, tested; in float32 ``fd_eps`` ≈ 1e-3 is best,
        ≈5e-6, and rounding dominates below it).
        """
        sx, sy, qx, qy = batch
        self._check_batch(sx, sy, "support")
        self._check_batch(qx, qy, "query")
        if sx.shape[0] != qx.shape[0]:
            raise ValueError(f"MAML: support has {sx.shape[0]} tasks but query has {qx.shape[0]}")
        if self.hvp == "finite_difference" and torch.is_grad_enabled():
            params = dict(self.model.named_parameters())
            adapted = [params[n] for n in self.adapted_names]
            shared = [p for n, p in params.items()
                      if n not in self.adapted_names and p.requires_grad]
            lrs = list(self.inner_lrs) if self.inner_lrs is not None else []
            loss, out = _FiniteDifferenceMetaLoss.apply(
                self, (sx, sy, qx, qy), len(adapted), len(shared), *adapted, *shared, *lrs)
        else:
            adapted = self.adapt(sx, sy)
            batched = self.batched and self.query_batched(qx.device)
            if self._early_query_backward(adapted, qx, qy, return_outputs):
                shared = [(n, p) for n, p in self.model.named_parameters()
                          if n not in self.adapted_names and p.requires_grad]
                try:
                    return _QueryLoss.apply(self, qx, qy, batched, list(adapted),
                                            [n for n, _ in shared], *adapted.values(),
                                            *(p for _, p in shared))
                except _ReachesOtherLeaves:
                    self._query_reaches_other_leaves = True
            out = self.forward_tasks(adapted, qx, batched=batched)
            loss = self._losses(out, qy, batched).mean()
        return (loss, out) if return_outputs else loss

    def _early_query_backward(self, adapted: Dict[str, Tensor], qx: Tensor, qy: Tensor,
                              return_outputs: bool) -> bool:
        """Whether :meth:`meta_loss` backpropagates the query pass in its forward
        (:class:`_QueryLoss`): when a meta-gradient is coming (grad mode on, the adapted
        parameters carry a graph), the query outputs are not asked for (they stay
        differentiable on the plain path), the query data need no gradient, autocast is
        off (its loss scale must reach the query pass's low-precision gradients, so that
        pass waits for the backward), and the query loss has not been seen to depend on
        tensors other than the model's parameters (e.g. a ``loss_fn`` closing over a
        learned temperature: those need the plain path to get their gradient)."""
        return (self.early_query_backward and torch.is_grad_enabled() and not return_outputs
                and any(t.requires_grad for t in adapted.values())
                and not (qx.requires_grad or qy.requires_grad)
                and not torch.is_autocast_enabled(qx.device.type)
                and not self._query_reaches_other_leaves)


class _QueryLoss(torch.autograd.Function):
    """The query half of the meta-loss, ``mean_t loss_fn(model(x_q^t; θ_K^t, φ), y_q^t)``,
    whose gradient with respect to the adapted parameters ``θ_K [T, *shape]`` and the
    shared trainable parameters ``φ`` is computed in the forward, right after the query
    forward, and handed back by the backward (scaled by the incoming cotangent).

    Why: the query pass has the largest activations (75 query images per task against 5
    support images on the bench CNN). On the plain path they stay alive until the outer
    backward, on top of every inner step's graph; here they are freed before the forward
    returns — task by task when the query pass loops over tasks, so the peak holds one
    task's query activations instead of all ``T``'s. Same kernels, same FLOPs, the same
    meta-gradient (the outer backward just starts from the stored cotangents).
    Differentiable once: a backward with ``create_graph=True`` raises rather than give a
    meta-gradient whose own derivative silently lacks the query pass's terms.
    """

    @staticmethod
    def forward(ctx, maml: MAML, qx: Tensor, qy: Tensor, batched: bool, adapted_names: List[str],
                shared_names: List[str], *tensors: Tensor) -> Tensor:
        n = len(adapted_names)
        adapted, shared = tensors[:n], tensors[n:]
        T = qx.shape[0]
        with torch.enable_grad():
            phi = [p.detach().requires_grad_() for p in shared]
            fixed = dict(zip(shared_names, phi))
            if batched:
                theta = [t.detach().requires_grad_() for t in adapted]
                losses = maml.task_losses(dict(zip(adapted_names, theta)), qx, qy,
                                          batched=True, shared=fixed)
                _check_leaves(losses, theta + phi)
                grads = _grads(losses.sum() / T, theta + phi)
                d_theta, d_phi = grads[:n], grads[n:]
            else:
                # One task at a time: its activations are freed by its own backward before
                # the next task's forward, and its cotangents go into [T, *shape] buffers.
                d_theta = [torch.empty_like(t) for t in adapted]
                d_phi = [torch.zeros_like(p) for p in phi]
                losses = []
                for i in range(T):
                    task = slice(i, i + 1)  # a one-task batch: [1, *shape] parameters
                    theta = [t[task].detach().requires_grad_() for t in adapted]
                    loss = maml.task_losses(dict(zip(adapted_names, theta)), qx[task], qy[task],
                                            batched=False, shared=fixed)[0]
                    if i == 0:
                        _check_leaves(loss, theta + phi)
                    grads = _grads(loss / T, theta + phi)
                    for buf, g in zip(d_theta, grads[:n]):
                        buf[task].copy_(g)
                    for acc, g in zip(d_phi, grads[n:]):
                        acc.add_(g)
                    losses.append(loss.detach())
                losses = torch.stack(losses)
        # Saved (not a ctx attribute) so that autograd frees them once the backward has
        # used them, before the rest of the outer backward runs.
        ctx.save_for_backward(*d_theta, *d_phi)
        return losses.detach().mean()

    @staticmethod
    def backward(ctx, d_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the cotangents below are constants
            raise RuntimeError(
                "MAML.meta_loss: the meta-gradient was asked for with create_graph=True, but "
                "the query pass was already backpropagated in the forward "
                "(early_query_backward=True), so the meta-gradient cannot be differentiated "
                "again; build MAML(..., early_query_backward=False) to differentiate it twice")
        return (None,) * 6 + tuple(g * d_loss for g in ctx.saved_tensors)


class _ReachesOtherLeaves(Exception):
    """The query loss depends on a tensor requiring grad that :class:`_QueryLoss` does not
    hand gradients to (raised before any state changes; the caller takes the plain path)."""


def _check_leaves(loss: Tensor, leaves: List[Tensor]) -> None:
    """Raise :class:`_ReachesOtherLeaves` if ``loss``'s graph reaches a leaf requiring
    grad other than ``leaves`` — e.g. a parameter outside the model that ``loss_fn`` or
    the model's forward closes over. A walk over one task's query graph (tens of nodes)."""
    own = {id(t) for t in leaves}
    stack, seen = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it feeds
        if variable is not None:
            if id(variable) not in own:
                raise _ReachesOtherLeaves
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)


def _grads(loss: Tensor, inputs: List[Tensor], grad_output: Optional[Tensor] = None,
           create_graph: bool = False) -> List[Tensor]:
    """``d loss / d inputs`` (seeded with ``grad_output``), zeros for inputs it does not
    depend on."""
    grads = torch.autograd.grad(loss, inputs, grad_output, create_graph=create_graph,
                                allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _dense(ts: List[Tensor]) -> List[Tensor]:
    """``ts`` made contiguous for the fused inner-step ops: a copy only of step 0's
    expanded views and of transposed gradients. The ops save neither their params nor
    the copies' originals, so the copies live only for the step."""
    return [t.contiguous() for t in ts]


def _broadcast(r: Tensor, like: Tensor) -> Tensor:
    """Per-task scalars ``[T]`` shaped to multiply a ``[T, *shape]`` tensor."""
    return r.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class _FiniteDifferenceMetaLoss(torch.autograd.Function):
    """The MAML meta-loss with the second-order term by central differences.

    Forward: the inner loop without a graph, keeping each step's parameters ``θ_k`` and
    gradients ``g_k`` (``[T, *shape]``). Backward: reverse-mode through
    ``θ_{k+1} = θ_k − α ⊙ g(θ_k)``, i.e. ``v ← v − H_k (α ⊙ v)`` for the adapted
    parameters, ``∇φ −= H_{φθ,k} (α ⊙ v)`` for the shared ones and ``∇α −= g_k ⊙ v``,
    with ``H w ≈ (∇L(θ_k + r w) − ∇L(θ_k − r w)) / 2r``, ``r = fd_eps / ‖w‖`` per task.
    Both perturbed gradients come from one batched backward each, weighted per task by
    ``1 / 2r`` so the shared parameters' cross term is exact in the per-task scaling.
    """

    @staticmethod
    def forward(ctx, maml: MAML, batch, n_adapted: int, n_shared: int, *tensors: Tensor):
        sx, sy, qx, qy = batch
        T = sx.shape[0]
        lrs = tensors[n_adapted + n_shared:]
        lr_b = [a.detach().unsqueeze(0).expand(T, *a.shape).contiguous() for a in lrs]
        theta = [p.detach().unsqueeze(0).expand(T, *p.shape).contiguous()
                 for p in tensors[:n_adapted]]
        thetas, grads = [], []
        with torch.enable_grad():
            for _ in range(maml.inner_steps):
                theta = [t.requires_grad_() for t in theta]
                _, g = maml.inner_grads(theta, sx, sy, create_graph=False)
                g = _dense(g)
                theta = [t.detach() for t in theta]
                thetas.append(theta)
                grads.append(g)
                theta = (inner_metasgd(theta, g, lr_b) if lr_b
                         else inner_sgd(theta, g, maml.inner_lr))
        out = maml.forward_tasks(dict(zip(maml.adapted_names, theta)), qx)
        loss = maml._losses(out, qy).mean()
        ctx.maml, ctx.batch = maml, batch
        ctx.n_adapted, ctx.n_shared = n_adapted, n_shared
        ctx.thetas, ctx.grads, ctx.theta_K, ctx.lr_b = thetas, grads, theta, lr_b
        ctx.shared = tensors[n_adapted:n_adapted + n_shared]
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx, d_loss: Tensor, d_out: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the differences below are constants
            raise RuntimeError(
                "MAML.meta_loss: hvp='finite_difference' gives a meta-gradient that cannot be "
                "differentiated again (create_graph=True); use hvp='exact' with "
                "early_query_backward=False for that")
        maml, (sx, sy, qx, qy) = ctx.maml, ctx.batch
        nA, shared = ctx.n_adapted, list(ctx.shared)
        names = maml.adapted_names
        with torch.enable_grad():
            theta = [t.detach().requires_grad_() for t in ctx.theta_K]
            q = maml.task_losses(dict(zip(names, theta)), qx, qy).mean() * d_loss
            gr = _grads(q, theta + shared)
            v, d_shared = gr[:nA], gr[nA:]
            d_lrs = [torch.zeros_like(a[0]) for a in ctx.lr_b]
            for k in reversed(range(maml.inner_steps)):
                th, g = ctx.thetas[k], ctx.grads[k]
                if ctx.lr_b:
                    d_lrs = [d - (gi * vi).sum(0) for d, gi, vi in zip(d_lrs, g, v)]
                    w = [a * vi for a, vi in zip(ctx.lr_b, v)]
                else:
                    w = [maml.inner_lr * vi for vi in v]
                norm = torch.stack([wi.flatten(1).square().sum(1) for wi in w]).sum(0).sqrt()
                r = maml.fd_eps / torch.where(norm > 0, norm, torch.ones_like(norm))
                hw = None
                for sign in (1.0, -1.0):
                    pert = [(t + sign * _broadcast(r, t) * wi).requires_grad_()
                            for t, wi in zip(th, w)]
                    losses = maml.task_losses(dict(zip(names, pert)), sx, sy)
                    gs = [sign * gi for gi in _grads((losses / (2 * r)).sum(), pert + shared)]
                    hw = gs if hw is None else [a + b for a, b in zip(hw, gs)]
                v = [vi - h for vi, h in zip(v, hw[:nA])]
                d_shared = [d - h for d, h in zip(d_shared, hw[nA:])]
        return (None, None, None, None, *[vi.sum(0) for vi in v], *d_shared, *d_lrs)
