"""``pyoptk.optim.Lookahead``: k steps forward, 1 step back, around any optimizer."""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyoptk._nvtx import nvtx_range

__all__ = ["Lookahead"]


class Lookahead(torch.optim.Optimizer):
    r"""Lookahead (Zhang et al., https://arxiv.org/abs/1907.08610) around ``optimizer``.

    The inner optimizer moves the fast weights :math:`\theta`; after every ``k`` of its
    steps the slow weights :math:`\phi` move toward them and the fast weights restart
    from there:

    .. math::
        \phi \leftarrow \phi + \alpha\,(\theta - \phi),\qquad \theta \leftarrow \phi

    Args:
        optimizer (torch.optim.Optimizer): the inner optimizer (any).
        k (int, default 5): inner steps per synchronization.
        alpha (float, default 0.5): slow-weight step size :math:`\alpha`, in [0, 1].

    Which params synchronize: a synchronization moves exactly the params that had a
    gradient at one or more of the ``k`` inner steps it closes (the steps the inner
    optimizer could have moved them at). A param without a gradient throughout a window
    is not touched, and its slow weight is dropped: it restarts from the param's value
    the next time the param has a gradient. So frozen params are never written, and a
    param edited by hand while frozen keeps the edit. A param's slow weight starts as
    its value before the first inner step at which it has a gradient; slow weights are
    float32 whatever the param dtype.

    ``param_groups`` and ``defaults`` are the inner optimizer's own objects, so LR
    schedulers, ``add_param_group`` and ``torch.amp.GradScaler`` act on the inner
    optimizer; ``zero_grad`` delegates to it. ``step(closure)`` hands the closure to the
    inner optimizer. ``state_dict()`` holds everything a bit-exact resume needs: the
    inner optimizer's state dict, ``k``, ``alpha``, the inner-step counter and every
    slow weight.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("Lookahead: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        _check_k_alpha(k, alpha)
        self.optimizer = optimizer
        self.k = k
        self.alpha = float(alpha)
        self._inner_steps = 0
        # Optimizer.__init__ would add the inner's groups a second time; __setstate__
        # sets up the hook registries and step profiling without touching param groups.
        super().__setstate__({"defaults": optimizer.defaults, "state": defaultdict(dict)})

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (the same list, also after it reloads)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    def __getstate__(self) -> Dict[str, Any]:
        return {"defaults": self.defaults, "state": self.state, "optimizer": self.optimizer,
                "k": self.k, "alpha": self.alpha, "_inner_steps": self._inner_steps}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group to the inner optimizer."""
        self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One inner step; every ``k``-th also synchronizes slow and fast weights.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss;
                passed to the inner optimizer.
        """
        with nvtx_range("Lookahead.step"):
            n = self._inner_steps + 1
            if closure is None:
                self._track(n)
                loss = self.optimizer.step()
            else:
                def tracked_closure():
                    loss = closure()
                    self._track(n)  # the grads exist only once the closure has run
                    return loss

                loss = self.optimizer.step(tracked_closure)
            self._inner_steps = n
            if n % self.k == 0:
                self._synchronize(first_step=n - self.k + 1)
        return loss

    def _track(self, n: int) -> None:
        """Record that the params with a grad take part in inner step ``n``, creating the
        slow weights of those that start a stretch of training here."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "slow_param" not in state:
                    state["slow_param"] = p.detach().to(torch.float32, copy=True)
                state["last_grad_step"] = n

    def _synchronize(self, first_step: int) -> None:
        with nvtx_range("Lookahead.synchronize"):
            buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
            for p in self._params_in_order():
                state = self.state.get(p)
                if not state:
                    continue
                if state["last_grad_step"] >= first_step:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
                else:
                    del self.state[p]
            for params in buckets.values():
                slows = [self.state[p]["slow_param"] for p in params]
                fasts = [p.float() for p in params]  # no copy for float32 params
                torch._foreach_lerp_(slows, fasts, self.alpha)
                torch._foreach_copy_(params, slows)

    def _params_in_order(self) -> List[Tensor]:
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def state_dict(self) -> Dict[str, Any]:
        """``{"inner": optimizer.state_dict(), "lookahead": {...}}``; the per-param
        Lookahead state is keyed by the param's index over all groups, as torch does."""
        index = {id(p): i for i, p in enumerate(self._params_in_order())}
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if s}
        return {"inner": self.optimizer.state_dict(),
                "lookahead": {"k": self.k, "alpha": self.alpha,
                              "inner_steps": self._inner_steps, "state": state}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: the inner optimizer's, then ``k``, ``alpha``, the
        step counter and the slow weights (copied, as float32, to each param's device)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "lookahead"}:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError("Lookahead.load_state_dict: expected a dict with keys 'inner' and "
                             f"'lookahead' (from Lookahead.state_dict()), got {got}")
        saved = state_dict["lookahead"]
        _check_k_alpha(saved["k"], saved["alpha"])
        params = self._params_in_order()
        bad = sorted(i for i in saved["state"] if not 0 <= int(i) < len(params))
        if bad:
            raise ValueError(f"Lookahead.load_state_dict: state for params {bad} but the "
                             f"optimizer has {len(params)} params")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k, self.alpha = saved["k"], float(saved["alpha"])
        self._inner_steps = int(saved["inner_steps"])
        self.state = defaultdict(dict)
        for i, s in saved["state"].items():
            p = params[int(i)]
            self.state[p] = {
                "slow_param": s["slow_param"].to(device=p.device, dtype=torch.float32,
                                                 copy=True),
                "last_grad_step": int(s["last_grad_step"])}


def _check_k_alpha(k: Any, alpha: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k (inner steps per synchronization): {k!r}, expected an "
                         "int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid alpha: {alpha!r}, expected a float in [0, 1]")
