"""``pyoptk.optim.Lookahead``: k steps forward, 1 step back, around any optimizer."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List

import torch
from torch import Tensor

from pyoptk._nvtx import nvtx_range

__all__ = ["Lookahead"]


class Lookahead(torch.optim.Optimizer):
    r"""Lookahead (Zhang et al., https://arxiv.org/abs/1907.08610) around ``optimizer``.

    The inner optimizer moves the fast weights :math:`\theta`; every ``k`` of its steps
    the slow weights :math:`\phi` move toward them and the fast weights restart there:

    .. math::
        \phi \leftarrow \phi + \alpha(\theta - \phi),\qquad \theta \leftarrow \phi

    Args:
        optimizer (torch.optim.Optimizer): the inner optimizer (any).
        k (int, default 5): inner steps per synchronization.
        alpha (float, default 0.5): slow-weight step size, in [0, 1].

    ``param_groups`` is the inner optimizer's list itself, so LR schedulers and
    ``add_param_group`` act on the inner optimizer. Slow weights are float32, created
    from a parameter the first time it has a gradient at a ``step()``; a parameter that
    never had one is never touched by the synchronization (as torch skips params
    without grads). ``state_dict`` holds everything needed for a bit-exact resume: the
    inner optimizer's state and param groups, the slow weights, ``k``, ``alpha`` and
    the step counter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k (steps per synchronization): {k!r}, expected an int >= 1")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha}, expected a float in [0, 1]")
        self.optimizer = optimizer
        self.k = k
        self.alpha = float(alpha)
        self._inner_steps = 0
        super().__init__(optimizer.param_groups, dict(optimizer.defaults, k=k, alpha=alpha))
        # Share the inner optimizer's list itself (not copies) so that schedulers and
        # add_param_group on either object see the same groups.
        self.param_groups = optimizer.param_groups
        self.state: Dict[Tensor, Dict[str, Any]] = defaultdict(dict)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # During torch's __init__ the groups are ours to add; afterwards, the inner's.
        if getattr(self, "optimizer", None) is None or self.param_groups is not self.optimizer.param_groups:
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One inner step (``closure`` goes to the inner optimizer); every ``k``-th also
        synchronizes slow and fast weights."""
        with nvtx_range("Lookahead.step"):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and "slow_param" not in self.state[p]:
                        self.state[p]["slow_param"] = p.detach().to(torch.float32, copy=True)
            loss = self.optimizer.step(closure)
            self._inner_steps += 1
            if self._inner_steps % self.k == 0:
                self._synchronize()
        return loss

    def _synchronize(self) -> None:
        by_device: Dict[torch.device, List[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if "slow_param" in self.state.get(p, {}):
                    by_device.setdefault(p.device, []).append(p)
        for params in by_device.values():
            slows = [self.state[p]["slow_param"] for p in params]
            fasts = [p.detach().float() for p in params]  # no copy for fp32 params
            torch._foreach_lerp_(slows, fasts, self.alpha)
            for p, s in zip(params, slows):
                p.detach().copy_(s)

    def _params_in_order(self) -> List[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> Dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params_in_order())}
        slow = {index[id(p)]: s["slow_param"] for p, s in self.state.items()
                if "slow_param" in s and id(p) in index}
        return {"inner": self.optimizer.state_dict(),
                "lookahead": {"k": self.k, "alpha": self.alpha,
                              "inner_steps": self._inner_steps, "slow_params": slow}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "lookahead"}:
            raise ValueError("Lookahead.load_state_dict: expected a dict with keys 'inner' and "
                             f"'lookahead' (from Lookahead.state_dict()), got "
                             f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        la = state_dict["lookahead"]
        params = self._params_in_order()
        bad = [i for i in la["slow_params"] if not 0 <= int(i) < len(params)]
        if bad:
            raise ValueError(f"Lookahead.load_state_dict: slow weights for params {bad} but "
                             f"the optimizer has {len(params)} params")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k, self.alpha, self._inner_steps = la["k"], la["alpha"], la["inner_steps"]
        self.state = defaultdict(dict)
        for i, s in la["slow_params"].items():
            p = params[int(i)]
            self.state[p]["slow_param"] = s.to(device=p.device, dtype=torch.float32).clone()
