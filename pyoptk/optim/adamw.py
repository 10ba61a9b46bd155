"""``pyoptk.optim.AdamW``: ``torch.optim.AdamW`` with every step one fused call."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

from torch import Tensor

from pyoptk.ops import adamw_
from pyoptk.optim._fused import FusedOptimizer, check_common_args

__all__ = ["AdamW"]


class AdamW(FusedOptimizer):
    r"""AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101), exactly
    ``torch.optim.AdamW``'s update, fused over each param group:

    .. math::
        \theta_t &= \theta_{t-1}(1 - \gamma\lambda) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_t - \frac{\gamma}{1-\beta_1^t}
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon},\quad
            \hat v_t = \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t

    Args:
        params (iterable): parameters or param-group dicts.
        lr (float or Tensor, default 1e-3): learning rate; a one-element tensor on the
            params' device is read on device (no host sync).
        betas (Tuple[float, float], default (0.9, 0.999)): moment decays.
        eps (float, default 1e-8): denominator term.
        weight_decay (float, default 1e-2): decoupled weight decay.
        amsgrad (bool, default False): use the running maximum of the second moment.
        maximize (bool, default False): ascend instead of descend.
        centralize (bool, default False): gradient centralization
            (https://arxiv.org/abs/2004.01461) of 2+ dim gradients before the update;
            applied to a copy, ``p.grad`` is left as it is.
        foreach, fused, capturable: accepted for compatibility with torch's signature
            and ignored (pyoptk is always fused and capturable).
        differentiable (bool): must be False (use :mod:`pyoptk.learned` for
            differentiable steps).

    Parameters may be float32, bfloat16 or float16; the state (``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``) is float32 and ``step`` is a float32 scalar on
    the param's device. ``state_dict`` uses torch's keys, so it loads into
    ``torch.optim.AdamW`` and torch's loads here. Params with no gradient are skipped.
    A NaN/Inf gradient propagates into its parameter, as in torch.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _name = "AdamW"

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 centralize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None) -> None:
        check_common_args(lr, betas, eps, weight_decay)
        if differentiable:
            raise ValueError("pyoptk.optim.AdamW does not support differentiable=True; "
                             "use torch.optim.AdamW(differentiable=True) for that")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, centralize=centralize,
                        foreach=foreach, capturable=capturable, differentiable=False,
                        fused=fused)
        super().__init__(params, defaults)

    def _extra_state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ("max_exp_avg_sq",) if group["amsgrad"] else ()

    def _fused_step(self, group: Dict[str, Any], tensors: Dict[str, List[Tensor]]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != tensors["params"][0].device:
            lr = lr.to(tensors["params"][0].device)
        adamw_(tensors["params"], tensors["grads"], tensors["exp_avg"], tensors["exp_avg_sq"],
               tensors["steps"], max_exp_avg_sqs=tensors.get("max_exp_avg_sq"), lr=lr,
               betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
               amsgrad=group["amsgrad"], maximize=group["maximize"])
