"""``pyoptk.optim.LAMB``: layer-wise adaptive moments, fused over each param group."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

from torch import Tensor

from pyoptk.ops import lamb_
from pyoptk.optim._fused import FusedOptimizer, check_common_args

__all__ = ["LAMB"]


class LAMB(FusedOptimizer):
    r"""LAMB (You et al., https://arxiv.org/abs/1904.00962), the variant of Algorithm 2
    used by NVIDIA's FusedLAMB, with per-tensor trust ratios:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        u_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\theta_{t-1}
            \quad (\hat m, \hat v \text{ bias-corrected when bias\_correction}) \\
        r_t &= \frac{\min(\lVert\theta_{t-1}\rVert, c)}{\lVert u_t\rVert}
            \text{ (1 if either norm is 0, or in adam mode)} \\
        \theta_t &= \theta_{t-1} - \gamma\, r_t\, u_t

    Args:
        params (iterable): parameters or param-group dicts.
        lr (float or Tensor, default 1e-3): learning rate.
        betas (Tuple[float, float], default (0.9, 0.999)): moment decays.
        eps (float, default 1e-6): denominator term.
        weight_decay (float, default 0): decay added to the update inside the trust ratio.
        bias_correction (bool, default True): divide the moments by ``1 - beta^t``.
        adam (bool, default False): trust ratio 1 (Adam with this weight decay).
        clamp_value (float, default 10): upper clamp of the weight norm ``c``
            (``math.inf`` for none).
        maximize (bool, default False): ascend instead of descend.
        centralize (bool, default False): gradient centralization of 2+ dim gradients
            (on a copy; ``p.grad`` is left as it is).

    The state (``exp_avg``, ``exp_avg_sq``) is float32 for any param dtype; ``step`` is
    a float32 scalar on the param's device. A NaN/Inf gradient propagates into its
    parameter (the trust ratio falls back to 1).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _name = "LAMB"

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, bias_correction: bool = True, adam: bool = False,
                 clamp_value: float = 10.0, *, maximize: bool = False,
                 centralize: bool = False) -> None:
        check_common_args(lr, betas, eps, weight_decay)
        if not (isinstance(clamp_value, (int, float)) and clamp_value > 0):
            raise ValueError(f"Invalid clamp_value: {clamp_value} (a positive float, "
                             "math.inf for no clamp)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, adam=adam,
                        clamp_value=float(clamp_value), maximize=maximize,
                        centralize=centralize)
        super().__init__(params, defaults)

    def _fused_step(self, group: Dict[str, Any], tensors: Dict[str, List[Tensor]]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != tensors["params"][0].device:
            lr = lr.to(tensors["params"][0].device)
        lamb_(tensors["params"], tensors["grads"], tensors["exp_avg"], tensors["exp_avg_sq"],
              tensors["steps"], lr=lr, betas=group["betas"], eps=group["eps"],
              weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
              adam=group["adam"], clamp_value=group["clamp_value"],
              maximize=group["maximize"])


