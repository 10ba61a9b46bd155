"""``pyoptk.optim.LAMB``: layer-wise adaptive moments, fused over each param group."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Union

from torch import Tensor

from pyoptk.ops.lamb import lamb_unchecked_
from pyoptk.optim._fused import (
    Bucket, FusedOptimizer, check_adam_args, check_clamp_value, split_lr)

__all__ = ["LAMB"]


class LAMB(FusedOptimizer):
    r"""LAMB (You et al., https://arxiv.org/abs/1904.00962), the variant of Algorithm 2
    used by NVIDIA's FusedLAMB: Adam moments, optional bias correction, weight decay
    added to the update *inside* the trust ratio, weight norm clamped at ``clamp_value``,
    one trust ratio per tensor.

    .. math::
        g_t &= -\nabla f(\theta_{t-1}) \text{ if maximize else } \nabla f(\theta_{t-1})
            \quad (\text{centralized first if centralize}) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
            v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat m_t &= m_t/(1-\beta_1^t),\quad \hat v_t = v_t/(1-\beta_2^t)
            \quad (\hat m_t = m_t,\ \hat v_t = v_t \text{ without bias\_correction}) \\
        u_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\,\theta_{t-1} \\
        r_t &= \frac{\min(\lVert\theta_{t-1}\rVert_2,\ c)}{\lVert u_t\rVert_2}
            \quad (1 \text{ if either norm is } 0, \text{ and } 1 \text{ if adam}) \\
        \theta_t &= \theta_{t-1} - \gamma\, r_t\, u_t

    Norms are over each tensor. With ``bias_correction=False`` this is
    pytorch-optimizer's ``Lamb(weight_decouple=False, max_grad_norm=0)`` at learning rate
    :math:`\gamma(1-\beta_1^t)`, except that it adds :math:`\epsilon` to
    :math:`\lVert u_t\rVert` in the trust ratio.

    Args:
        params (iterable): parameters, or dicts defining param groups.
        lr (float or Tensor, default 1e-3): learning rate :math:`\gamma`; a one-element
            float32 tensor on the params' device is read on device (no host sync).
        betas (Tuple[float, float], default (0.9, 0.999)): moment decays.
        eps (float, default 1e-6): denominator term :math:`\epsilon`.
        weight_decay (float, default 0): :math:`\lambda`, added to the update inside the
            trust ratio.
        bias_correction (bool, default True): divide the moments by :math:`1-\beta^t`.
        adam (bool, default False): trust ratio fixed at 1 (Adam with this weight decay).
        clamp_value (float, default 10.0): upper clamp :math:`c` of the weight norm
            (``math.inf`` for none).
        maximize (bool, default False): ascend the objective instead of descending.
        centralize (bool, default False): gradient centralization
            (https://arxiv.org/abs/2004.01461) of 2+ dim gradients, on a copy (``p.grad``
            is left as backward produced it).

    Params without a grad are skipped; state (``exp_avg``, ``exp_avg_sq``) is float32 for
    any param dtype and ``step`` a float32 scalar on the param's device; mixed devices
    and dtypes in a group are bucketed, one fused call each; params must be contiguous.
    A NaN/Inf gradient propagates into its own param (its trust ratio falls back to 1);
    other params are unaffected.
    """

    _name = "LAMB"
    _state_keys = ("exp_avg", "exp_avg_sq")
    _backfill = {"bias_correction": True, "adam": False, "clamp_value": 10.0,
                 "maximize": False, "centralize": False}

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, bias_correction: bool = True, adam: bool = False,
                 clamp_value: float = 10.0, *, maximize: bool = False,
                 centralize: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        adam=adam, clamp_value=clamp_value, maximize=maximize,
                        centralize=centralize)
        self._check_group(defaults, "")
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        check_adam_args(group, where)
        check_clamp_value(group["clamp_value"], where)

    def _fused_step(self, group: Dict[str, Any], bucket: Bucket) -> None:
        # The lists are valid by construction (_init_group): skip the op's checks.
        lamb_unchecked_(bucket.params, bucket.grads, bucket.state["exp_avg"],
                        bucket.state["exp_avg_sq"], bucket.steps,
                        split_lr(group["lr"], bucket.params[0].device), group["betas"],
                        group["eps"], group["weight_decay"], group["bias_correction"],
                        group["adam"], group["clamp_value"], group["maximize"])
