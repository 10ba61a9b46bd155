"""``pyoptk.optim.AdamW``: ``torch.optim.AdamW`` with every step one fused call per
(device, dtype)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

from torch import Tensor

from pyoptk.ops.adamw import adamw_unchecked_
from pyoptk.optim._fused import Bucket, FusedOptimizer, check_adam_args, split_lr

__all__ = ["AdamW"]


class AdamW(FusedOptimizer):
    r"""AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101): exactly
    ``torch.optim.AdamW``'s update, fused over each param group.

    .. math::
        g_t &= -\nabla f(\theta_{t-1}) \text{ if maximize else } \nabla f(\theta_{t-1})
            \quad (\text{centralized first if centralize}) \\
        \theta_t &= \theta_{t-1}(1 - \gamma\lambda) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
            v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
        \theta_t &= \theta_t - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        params (iterable): parameters, or dicts defining param groups.
        lr (float or Tensor, default 1e-3): learning rate :math:`\gamma`. A one-element
            float32 tensor on the params' device is read on device: LR schedules then
            need no host sync and steps can be captured in CUDA graphs.
        betas (Tuple[float, float], default (0.9, 0.999)): moment decays
            :math:`\beta_1, \beta_2`.
        eps (float, default 1e-8): denominator term :math:`\epsilon`.
        weight_decay (float, default 1e-2): decoupled weight decay :math:`\lambda`.
        amsgrad (bool, default False): use the running maximum of :math:`v`
            (https://openreview.net/forum?id=ryQu7f-RZ).
        maximize (bool, default False): ascend the objective instead of descending.
        centralize (bool, default False): gradient centralization (Yong et al.,
            https://arxiv.org/abs/2004.01461): each gradient of 2+ dims has its mean over
            all dims but the first subtracted before the update. It is applied to a
            copy: ``p.grad`` keeps what backward produced, at the cost of one transient
            copy of the 2+ dim gradients of a (device, dtype) bucket.
        foreach, fused, capturable (default None, None, False): accepted for
            compatibility with ``torch.optim.AdamW`` and ignored: every step is fused,
            and capturable whenever ``lr`` is a float or a device tensor.
        differentiable (bool, default False): must be False; for differentiable steps
            use ``torch.optim.AdamW(differentiable=True)``.

    Behaviour, as in torch unless said otherwise:

    - Params whose ``grad`` is None are skipped (no update, no state created); sparse
      gradients raise RuntimeError.
    - Params may be float32, bfloat16 or float16; mixed dtypes and devices in one group
      are split into (device, dtype) buckets, one fused call each. Params must be
      contiguous (ValueError naming the param otherwise).
    - State per param: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad)
      in float32 whatever the param dtype, and ``step``, a float32 scalar on the param's
      device (torch keeps it on the host unless capturable/fused).
    - ``state_dict()`` has torch's layout and keys: it loads into ``torch.optim.AdamW``,
      and torch's loads here (``step`` moves to the param's device, moments stay
      float32).
    - A NaN/Inf in a gradient propagates into the affected elements of its param and
      state; other elements and params are unaffected.
    """

    _name = "AdamW"
    _state_keys = ("exp_avg", "exp_avg_sq")
    _backfill = {"amsgrad": False, "maximize": False, "centralize": False}

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 centralize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None) -> None:
        if differentiable:
            raise ValueError("pyoptk.optim.AdamW does not support differentiable=True; use "
                             "torch.optim.AdamW(differentiable=True) for differentiable steps")
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, centralize=centralize)
        check_adam_args(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        check_adam_args(group, where)

    def _group_state_keys(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return self._state_keys + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _fused_step(self, group: Dict[str, Any], bucket: Bucket) -> None:
        # The lists are valid by construction (_init_group): skip the op's checks.
        adamw_unchecked_(bucket.params, bucket.grads, bucket.state["exp_avg"],
                         bucket.state["exp_avg_sq"], bucket.state.get("max_exp_avg_sq", []),
                         bucket.steps, split_lr(group["lr"], bucket.params[0].device),
                         group["betas"], group["eps"], group["weight_decay"],
                         group["amsgrad"], group["maximize"])
