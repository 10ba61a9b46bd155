"""Shared machinery of pyoptk's fused first-order optimizers (private).

``FusedOptimizer.step`` gathers, per param group, the params with a gradient and their
state (``_init_group``), splits them by (device, dtype) and makes one fused op call per
bucket: never a Python loop over tensors doing math.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from pyoptk._nvtx import nvtx_range
from pyoptk.ops import centralize_gradients_

STATE_DTYPE = torch.float32


def check_common_args(lr, betas, eps, weight_decay) -> None:
    """torch.optim's argument checks, with torch's messages."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = float(lr.detach().cpu().item())
    else:
        lr_value = lr
    if not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of AdamW and LAMB: lazy fp32 state, per-(device, dtype) fused calls.

    Subclasses define ``_state_keys`` (the fp32 buffers per param), ``_name`` and
    ``_fused_step(group, tensors)``, where ``tensors`` maps ``"params"``, ``"grads"``,
    ``"steps"`` and each state key to lists of one device and dtype.
    """

    _state_keys: Tuple[str, ...] = ()
    _name = "FusedOptimizer"

    def _extra_state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ()

    def _init_group(self, group: Dict[str, Any]) -> Dict[Tuple[torch.device, torch.dtype],
                                                          Dict[str, List[Tensor]]]:
        """Params with a grad, their grads and state, bucketed by (device, dtype)."""
        buckets: Dict[Tuple[torch.device, torch.dtype], Dict[str, List[Tensor]]] = {}
        keys = self._state_keys + self._extra_state_keys(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{self._name} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=STATE_DTYPE, device=p.device)
            for k in keys:
                if k not in state:  # lazily (also amsgrad switched on later)
                    state[k] = torch.zeros_like(p, dtype=STATE_DTYPE,
                                                memory_format=torch.preserve_format)
            b = buckets.setdefault((p.device, p.dtype), {"params": [], "grads": [], "steps": [],
                                                         **{k: [] for k in keys}})
            b["params"].append(p)
            b["grads"].append(p.grad)
            b["steps"].append(state["step"])
            for k in keys:
                b[k].append(state[k])
        return buckets

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. ``closure`` (optional) re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with nvtx_range(f"{self._name}.step"):
            for group in self.param_groups:
                for tensors in self._init_group(group).values():
                    if group.get("centralize", False):
                        # Centralize copies so p.grad stays what backward produced.
                        tensors["grads"] = [g.clone() for g in tensors["grads"]]
                        centralize_gradients_(tensors["grads"])
                    self._fused_step(group, tensors)
        return loss

    def _fused_step(self, group: Dict[str, Any], tensors: Dict[str, List[Tensor]]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict (ours or torch's): steps become float32 scalars on the
        param's device and moment buffers float32, whatever they were saved as."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                step = state["step"]
                step = step if isinstance(step, Tensor) else torch.tensor(float(step))
                state["step"] = step.to(device=p.device, dtype=STATE_DTYPE).reshape(())
            for k in self._state_keys + ("max_exp_avg_sq",):
                if k in state and isinstance(state[k], Tensor):
                    state[k] = state[k].to(device=p.device, dtype=STATE_DTYPE).contiguous()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
