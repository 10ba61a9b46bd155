"""Fused multi-tensor AdamW: ``torch.ops.pyoptk.adamw_``.

Layout (as every op file): reference → backend launchers → op registration → public
function. The update is exactly ``torch.optim.AdamW``'s (Loshchilov & Hutter,
https://arxiv.org/abs/1711.05101), computed in fp32 whatever the parameter dtype:

.. math::
    g &\\leftarrow -g \\text{ if maximize} \\\\
    \\theta &\\leftarrow \\theta (1 - \\gamma\\lambda) \\\\
    m &\\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2 \\\\
    \\hat v &= \\max(\\hat v_{max}, v) \\text{ if amsgrad else } v \\\\
    \\theta &\\leftarrow \\theta - \\frac{\\gamma}{1-\\beta_1^t}\\,
        \\frac{m}{\\sqrt{\\hat v}/\\sqrt{1-\\beta_2^t} + \\epsilon}

NaN/Inf in a gradient propagate into the parameter and state, as in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyoptk._backend import implementation, register_backend
from pyoptk._native import native
from pyoptk._nvtx import annotate
from pyoptk.ops import _native_call as nc
from pyoptk.ops._eager import call_op
from pyoptk.ops._validation import (
    check_betas, check_lr, check_nonneg, check_steps, check_tensor_lists)

OP = "adamw_"


@dataclass(frozen=True)
class AdamWHyper:
    """Hyperparameters of one AdamW call. ``lr_t`` (a one-element float32 tensor on
    the params' device) overrides ``lr`` when given, so lr schedules need no host sync."""

    lr: float
    lr_t: Optional[Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool


# ----------------------------------------------------------------------------------
# Reference: one tensor at a time, fp32 math (fp64 for fp64 tensors), bias
# corrections in fp64.
# ----------------------------------------------------------------------------------
def adamw_reference(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                    exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
                    steps: List[Tensor], hp: AdamWHyper) -> None:
    """AdamW over lists, in place. ``steps`` hold the step number of this update
    (already incremented). The specification every backend is tested against."""
    for i, p in enumerate(params):
        ct = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64 for fp64 runs
        g = grads[i].to(ct)
        if hp.maximize:
            g = -g
        m, v = exp_avgs[i], exp_avg_sqs[i]
        # Scalars as float64 tensors: no host sync for tensor lr/steps (capturable).
        lr = (hp.lr_t.double().reshape(()) if hp.lr_t is not None
              else torch.full((), hp.lr, dtype=torch.float64, device=p.device))
        step = steps[i].double().reshape(())
        bc1 = 1 - torch.pow(hp.beta1, step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(hp.beta2, step))
        p32 = p.to(ct)
        p32.mul_((1 - lr * hp.weight_decay).to(ct))
        m.lerp_(g, 1 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
        if hp.amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            vv = max_exp_avg_sqs[i]
        else:
            vv = v
        denom = (vv.sqrt() / bc2_sqrt.to(ct)).add_(hp.eps)
        p32.sub_((lr / bc1).to(ct) * m / denom)
        if p32 is not p:
            p.copy_(p32)


register_backend(OP, "torch")(adamw_reference)


# ----------------------------------------------------------------------------------
# Backend launchers.
# ----------------------------------------------------------------------------------
def _native_config(hp: AdamWHyper):
    return native().AdamWConfig(
        lr=hp.lr, lr_ptr=nc.lr_ptr(hp.lr_t), beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
        weight_decay=hp.weight_decay, amsgrad=hp.amsgrad, maximize=hp.maximize)


def _native_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
    return (nc.ptrs(params), nc.ptrs(grads), nc.ptrs(exp_avgs), nc.ptrs(exp_avg_sqs),
            nc.ptrs(max_exp_avg_sqs), nc.ptrs(steps), nc.numels(params),
            nc.dtype_code(params[0].dtype))


@register_backend(OP, "cpu")
def _adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp):
    native().adamw_cpu(*_native_lists(params, grads, exp_avgs, exp_avg_sqs,
                                      max_exp_avg_sqs, steps), _native_config(hp))


@register_backend(OP, "cuda")
def _adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp):
    native().adamw_cuda(*_native_lists(params, grads, exp_avgs, exp_avg_sqs,
                                       max_exp_avg_sqs, steps), _native_config(hp),
                        nc.stream_handle(params[0].device))


@register_backend(OP, "triton")
def _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp):
    from pyoptk.kernels import adamw as kernels

    kernels.adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)


# ----------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------
@torch.library.custom_op(
    "pyoptk::adamw_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def _adamw_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
              exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], steps: List[Tensor],
              lr: float, lr_t: Optional[Tensor], beta1: float, beta2: float, eps: float,
              weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    """Default kernel (devices without a fused backend): the reference."""
    torch._foreach_add_(steps, 1)
    hp = AdamWHyper(lr, lr_t, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    adamw_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)


@_adamw_op.register_kernel(("cpu", "cuda"))
def _adamw_dispatch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    lr, lr_t, beta1, beta2, eps, weight_decay, amsgrad, maximize) -> None:
    if not params:
        return
    # Steps are incremented before the kernel reads them, in one foreach launch, so
    # every block of a tensor sees the same step (the kernels never write steps).
    torch._foreach_add_(steps, 1)
    hp = AdamWHyper(lr, lr_t, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    fn = implementation(OP, params[0].device.type)
    fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)


@_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_t, beta1,
      beta2, eps, weight_decay, amsgrad, maximize) -> None:
    return None


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
           exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
           max_exp_avg_sqs: Optional[Sequence[Tensor]] = None, lr=1e-3,
           betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False) -> None:
    """One AdamW step over lists of tensors, in place, in one fused launch.

    Args:
        params: parameters (float32, bfloat16 or float16, one dtype per call), updated.
        grads: their gradients, same dtypes and shapes; not modified.
        exp_avgs, exp_avg_sqs: float32 first and second moments, updated.
        steps: one float32 scalar tensor per param; each is incremented by one and the
            new value is this update's step number (for bias correction).
        max_exp_avg_sqs: float32 running maxima of the second moment (amsgrad only).
        lr: float, or a one-element float32 tensor on the params' device (no host sync).
        betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.

    All tensors must be contiguous and on one device. The backend follows
    :func:`pyoptk.set_backend`.
    """
    op = "adamw_"
    params, grads, exp_avgs, exp_avg_sqs, steps = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps))
    max_sqs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else []
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        if len(max_sqs) != len(params):
            raise ValueError(f"{op}: amsgrad=True needs max_exp_avg_sqs with one tensor per "
                             f"param ({len(params)}), got {len(max_sqs)}")
        lists["max_exp_avg_sqs"] = max_sqs
    else:
        max_sqs = []
    check_tensor_lists(op, lists, same_dtype=("grads",),
                       state_keys=("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
    if not params:
        return
    check_betas(op, *betas)
    check_nonneg(op, eps=eps, weight_decay=weight_decay)
    device = params[0].device
    check_steps(op, steps, len(params), device)
    adamw_unchecked_(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
                     check_lr(op, lr, device), betas, eps, weight_decay, amsgrad, maximize)


@annotate("adamw_")
def adamw_unchecked_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                     exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
                     steps: List[Tensor], lr: Tuple[float, Optional[Tensor]],
                     betas: Tuple[float, float], eps: float, weight_decay: float,
                     amsgrad: bool, maximize: bool) -> None:
    """:func:`adamw_` without its checks, for callers that built valid lists themselves
    (pyoptk.optim's optimizers: contiguous params of one device and dtype, float32
    state they created, ``lr`` already split by ``check_lr`` into (float, tensor or
    None)). The checks cost ~2 µs per tensor, a tenth of a 160-tensor step on CPU."""
    lr_f, lr_t = lr
    call_op(torch.ops.pyoptk.adamw_, _adamw_dispatch,
            (params, grads, exp_avgs, exp_avg_sqs, steps),
            (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps),
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_f, lr_t,
            float(betas[0]), float(betas[1]), float(eps), float(weight_decay), bool(amsgrad),
            bool(maximize))
