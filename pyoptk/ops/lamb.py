"""Fused multi-tensor LAMB: ``torch.ops.pyoptk.lamb_``.

The variant (You et al., https://arxiv.org/abs/1904.00962, Algorithm 2, as in NVIDIA's
FusedLAMB): Adam moments, optional bias correction, weight decay added to the update
*inside* the trust ratio, and the weight norm clamped at ``clamp_value``:

.. math::
    m &\\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2 \\\\
    u &= \\frac{\\hat m}{\\sqrt{\\hat v} + \\epsilon} + \\lambda\\theta
        \\qquad (\\hat m = m/(1-\\beta_1^t),\\ \\hat v = v/(1-\\beta_2^t)
        \\text{ with bias\\_correction, else } m, v) \\\\
    r &= \\frac{\\min(\\lVert\\theta\\rVert, c)}{\\lVert u\\rVert}
        \\text{ if both norms} > 0 \\text{ else } 1 \\qquad (r = 1 \\text{ in adam mode}) \\\\
    \\theta &\\leftarrow \\theta - \\gamma\\, r\\, u

Norms are per tensor. ``u`` is never stored: fused backends update the moments and
reduce the norms in one pass and recompute ``u`` in the next. With
``bias_correction=False`` this equals pytorch-optimizer's ``Lamb(weight_decouple=False,
max_grad_norm=0)`` but for its ``+eps`` in the trust-ratio denominator. NaN/Inf in a
gradient propagate into the parameter (the trust ratio falls back to 1).
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

OP = "lamb_"


@dataclass(frozen=True)
class LambHyper:
    """Hyperparameters of one LAMB call (``lr_t`` overrides ``lr`` when given)."""

    lr: float
    lr_t: Optional[Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    adam: bool
    clamp_value: float
    maximize: bool


# ----------------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------------
def lamb_reference(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                   exp_avg_sqs: List[Tensor], steps: List[Tensor], hp: LambHyper) -> None:
    """LAMB over lists, in place; ``steps`` already hold this update's step number."""
    for i, p in enumerate(params):
        ct = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64 for fp64 runs
        g = grads[i].to(ct)
        if hp.maximize:
            g = -g
        m, v = exp_avgs[i], exp_avg_sqs[i]
        lr = (hp.lr_t.double().reshape(()) if hp.lr_t is not None
              else torch.full((), hp.lr, dtype=torch.float64, device=p.device))
        m.lerp_(g, 1 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
        if hp.bias_correction:
            step = steps[i].double().reshape(())
            mh = m / (1 - torch.pow(hp.beta1, step)).to(ct)
            vh = v / (1 - torch.pow(hp.beta2, step)).to(ct)
        else:
            mh, vh = m, v
        p32 = p.to(ct)
        u = mh / (vh.sqrt() + hp.eps) + hp.weight_decay * p32
        if hp.adam:
            ratio = torch.ones((), dtype=ct, device=p.device)
        else:
            w_norm = torch.linalg.vector_norm(p32).clamp(max=hp.clamp_value)
            u_norm = torch.linalg.vector_norm(u)
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                torch.ones_like(w_norm))
        p.copy_(p32 - (lr.to(ct) * ratio) * u)


register_backend(OP, "torch")(lamb_reference)


# ----------------------------------------------------------------------------------
# Backend launchers.
# ----------------------------------------------------------------------------------
def _native_config(hp: LambHyper):
    return native().LambConfig(
        lr=hp.lr, lr_ptr=nc.lr_ptr(hp.lr_t), beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
        weight_decay=hp.weight_decay, bias_correction=hp.bias_correction, adam=hp.adam,
        clamp_value=hp.clamp_value, maximize=hp.maximize)


def _native_lists(params, grads, exp_avgs, exp_avg_sqs, steps):
    return (nc.ptrs(params), nc.ptrs(grads), nc.ptrs(exp_avgs), nc.ptrs(exp_avg_sqs),
            nc.ptrs(steps), nc.numels(params), nc.dtype_code(params[0].dtype))


@register_backend(OP, "cpu")
def _lamb_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, hp):
    native().lamb_cpu(*_native_lists(params, grads, exp_avgs, exp_avg_sqs, steps),
                      _native_config(hp))


@register_backend(OP, "cuda")
def _lamb_cuda(params, grads, exp_avgs, exp_avg_sqs, steps, hp):
    lib = native()
    counts = nc.numels(params)
    workspace = torch.empty(max(1, lib.lamb_workspace_numel(counts)), dtype=torch.float32,
                            device=params[0].device)
    lib.lamb_cuda(*_native_lists(params, grads, exp_avgs, exp_avg_sqs, steps),
                  _native_config(hp), workspace.data_ptr(), nc.stream_handle(params[0].device))


@register_backend(OP, "triton")
def _lamb_triton(params, grads, exp_avgs, exp_avg_sqs, steps, hp):
    from pyoptk.kernels import lamb as kernels

    kernels.lamb_(params, grads, exp_avgs, exp_avg_sqs, steps, hp)


# ----------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------
@torch.library.custom_op("pyoptk::lamb_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def _lamb_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], steps: List[Tensor], lr: float,
             lr_t: Optional[Tensor], beta1: float, beta2: float, eps: float,
             weight_decay: float, bias_correction: bool, adam: bool, clamp_value: float,
             maximize: bool) -> None:
    """Default kernel (devices without a fused backend): the reference."""
    torch._foreach_add_(steps, 1)
    hp = LambHyper(lr, lr_t, beta1, beta2, eps, weight_decay, bias_correction, adam,
                   clamp_value, maximize)
    lamb_reference(params, grads, exp_avgs, exp_avg_sqs, steps, hp)


@_lamb_op.register_kernel(("cpu", "cuda"))
def _lamb_dispatch(params, grads, exp_avgs, exp_avg_sqs, steps, lr, lr_t, beta1, beta2,
                   eps, weight_decay, bias_correction, adam, clamp_value, maximize) -> None:
    if not params:
        return
    torch._foreach_add_(steps, 1)
    hp = LambHyper(lr, lr_t, beta1, beta2, eps, weight_decay, bias_correction, adam,
                   clamp_value, maximize)
    implementation(OP, params[0].device.type)(params, grads, exp_avgs, exp_avg_sqs, steps, hp)


@_lamb_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, lr_t, beta1, beta2, eps,
      weight_decay, bias_correction, adam, clamp_value, maximize) -> None:
    return None


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def lamb_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *, lr=1e-3,
          betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
          weight_decay: float = 0.0, bias_correction: bool = True, adam: bool = False,
          clamp_value: float = 10.0, maximize: bool = False) -> None:
    """One LAMB step over lists of tensors, in place (see the module docstring).

    Args:
        params: parameters (float32, bfloat16 or float16, one dtype per call), updated.
        grads: their gradients, same dtypes and shapes; not modified.
        exp_avgs, exp_avg_sqs: float32 moments, updated.
        steps: one float32 scalar tensor per param, incremented by one (the new value
            is this update's step number).
        lr: float or one-element float32 tensor on the params' device.
        betas, eps: moment decays and denominator epsilon.
        weight_decay: decay added to the update inside the trust ratio.
        bias_correction: divide the moments by ``1 - beta**t``.
        adam: trust ratio fixed at 1 (Adam with this weight decay).
        clamp_value: upper clamp of the weight norm in the trust ratio (``math.inf``
            for none).
        maximize: ascend instead of descend.
    """
    op = "lamb_"
    params, grads, exp_avgs, exp_avg_sqs, steps = (
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps))
    check_tensor_lists(op, {"params": params, "grads": grads, "exp_avgs": exp_avgs,
                            "exp_avg_sqs": exp_avg_sqs},
                       same_dtype=("grads",), state_keys=("exp_avgs", "exp_avg_sqs"))
    if not params:
        return
    check_betas(op, *betas)
    check_nonneg(op, eps=eps, weight_decay=weight_decay)
    if isinstance(clamp_value, bool) or not isinstance(clamp_value, (int, float)) \
            or not clamp_value > 0:
        raise ValueError(f"{op}: clamp_value must be a positive float (math.inf for no "
                         f"clamp), got {clamp_value!r}")
    device = params[0].device
    check_steps(op, steps, len(params), device)
    lamb_unchecked_(params, grads, exp_avgs, exp_avg_sqs, steps, check_lr(op, lr, device),
                    betas, eps, weight_decay, bias_correction, adam, clamp_value, maximize)


@annotate("lamb_")
def lamb_unchecked_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                    exp_avg_sqs: List[Tensor], steps: List[Tensor],
                    lr: Tuple[float, Optional[Tensor]], betas: Tuple[float, float],
                    eps: float, weight_decay: float, bias_correction: bool, adam: bool,
                    clamp_value: float, maximize: bool) -> None:
    """:func:`lamb_` without its checks, for callers that built valid lists themselves
    (see :func:`pyoptk.ops.adamw.adamw_unchecked_`)."""
    lr_f, lr_t = lr
    call_op(torch.ops.pyoptk.lamb_, _lamb_dispatch,
            (params, grads, exp_avgs, exp_avg_sqs, steps),
            (params, exp_avgs, exp_avg_sqs, steps),
            params, grads, exp_avgs, exp_avg_sqs, steps, lr_f, lr_t, float(betas[0]),
            float(betas[1]), float(eps), float(weight_decay), bool(bias_correction),
            bool(adam), float(clamp_value), bool(maximize))
