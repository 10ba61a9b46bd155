"""Shared machinery of pyoptk's fused first-order optimizers (private).

``FusedOptimizer.step`` gathers, per param group, the params that have a gradient and
their state (``_init_group``), splits them into (device, dtype) buckets and makes one
fused op call per bucket: list building is the only per-tensor Python work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from pyoptk._nvtx import nvtx_range
from pyoptk.ops import centralize_gradients_

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_lr(lr: Any, where: str = "") -> None:
    """torch.optim's learning-rate check (a float or a one-element tensor, >= 0)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element{where}")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be a floating-point tensor, got {lr.dtype}{where}")
        value = float(lr.detach().reshape(()).cpu())
    elif _is_number(lr):
        value = lr
    else:
        raise TypeError(
            f"lr must be a float or a one-element tensor, got {type(lr).__name__}{where}")
    if not 0.0 <= value:
        raise ValueError(f"Invalid learning rate: {lr}{where}")


def check_adam_args(group: Mapping[str, Any], where: str = "") -> None:
    """torch.optim.Adam's checks, with its messages, on ``lr``, ``betas``, ``eps`` and
    ``weight_decay``. ``where`` (e.g. " (param group 1)") is appended to messages."""
    check_lr(group["lr"], where)
    eps, betas, weight_decay = group["eps"], group["betas"], group["weight_decay"]
    if not _is_number(eps):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}{where}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_number(b) for b in betas)):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}{where}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}{where}")
    if not _is_number(weight_decay):
        raise TypeError(f"weight_decay must be a float, got {type(weight_decay).__name__}{where}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}{where}")


def check_clamp_value(clamp_value: Any, where: str = "") -> None:
    if not _is_number(clamp_value) or math.isnan(clamp_value) or not clamp_value > 0:
        raise ValueError(f"Invalid clamp_value value: {clamp_value} (expected a positive "
                         f"float, math.inf for no clamp){where}")


def split_lr(lr: Any, device: torch.device) -> Tuple[float, Optional[Tensor]]:
    """A group's lr as the ops' unchecked entry points take it: ``(lr, None)`` for a
    float; ``(0.0, t)`` for a tensor, ``t`` the float32 one-element tensor on ``device``
    that the kernels read on device (no copy when it already is one)."""
    if isinstance(lr, Tensor):
        return 0.0, lr.to(device=device, dtype=torch.float32)
    return float(lr), None


def split_by_device_dtype(*lists: List[Tensor]) -> List[Tuple[List[Tensor], ...]]:
    """Parallel lists (the first holds the params) split by the params' (device, dtype):
    one tuple of lists per bucket, buckets in first-seen order, tensors in their order —
    the unit of one fused op call."""
    index: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(lists[0]):
        index.setdefault((p.device, p.dtype), []).append(i)
    return [tuple([lst[i] for i in idx] for lst in lists) for idx in index.values()]


def contiguous(tensors: List[Tensor]) -> List[Tensor]:
    """The tensors, with a contiguous copy of any that is not (a hand-assigned grad may be
    a strided view; the kernels read a copy)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


@dataclass
class Bucket:
    """Parallel lists of one (device, dtype): params, grads, steps and each state key."""

    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    steps: List[Tensor] = field(default_factory=list)
    state: Dict[str, List[Tensor]] = field(default_factory=dict)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of :class:`~pyoptk.optim.AdamW` and :class:`~pyoptk.optim.LAMB`.

    Subclasses set ``_name``, ``_state_keys`` (float32 buffers shaped like the param),
    ``_backfill`` (options with their defaults, for checkpoints written before an option
    existed) and implement ``_check_group`` and ``_fused_step``.
    """

    _name = "FusedOptimizer"
    _state_keys: Tuple[str, ...] = ()
    _backfill: Dict[str, Any] = {}

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        raise NotImplementedError

    def _group_state_keys(self, group: Mapping[str, Any]) -> Tuple[str, ...]:
        return self._state_keys

    def _fused_step(self, group: Dict[str, Any], bucket: Bucket) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group; its hyperparameters (or the defaults it falls back on)
        are checked like the constructor's arguments."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        where = f" (param group {len(self.param_groups)})"
        if "params" not in param_group:
            raise ValueError(f"{self._name}: a param group needs a 'params' entry with the "
                             f"tensors to optimize, got keys {sorted(param_group)}{where}")
        self._check_group({**self.defaults, **param_group}, where)
        super().add_param_group(param_group)

    def _init_group(self, group: Dict[str, Any], index: int, params: List[Tensor],
                    grads: List[Tensor], steps: List[Tensor], *states: List[Tensor]) -> None:
        """Append the group's params that have a grad, their grads, steps and state
        (created lazily; one list per key of ``_group_state_keys(group)``) to the lists
        passed in. torch.optim's convention — flat lists filled in place, nothing
        returned — which torch.compile relies on: dynamo runs ``_init_group`` eagerly
        and maps only the tensors appended to such lists."""
        keys = self._group_state_keys(group)
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            where = f"param_groups[{index}]['params'][{i}]"
            if grad.layout != torch.strided:
                raise RuntimeError(f"{self._name} does not support sparse gradients "
                                   f"({where} has a {grad.layout} gradient)")
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"{self._name}: {where} has dtype {p.dtype}; pyoptk's fused "
                                "kernels take float32, bfloat16 or float16 parameters")
            if not p.is_contiguous():
                raise ValueError(
                    f"{self._name}: {where} (shape {tuple(p.shape)}, strides {p.stride()}) "
                    "is not contiguous; pyoptk's fused kernels need contiguous parameters: "
                    "make it contiguous before creating the optimizer "
                    "(`p.data = p.data.contiguous()`)")
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=STATE_DTYPE, device=p.device)
            for k in keys:
                if k not in state:  # also when e.g. amsgrad is switched on mid-run
                    state[k] = torch.zeros_like(p, dtype=STATE_DTYPE,
                                                memory_format=torch.contiguous_format)
            params.append(p)
            grads.append(grad)
            steps.append(state["step"])
            for k, lst in zip(keys, states):
                lst.append(state[k])

    def _buckets(self, group: Dict[str, Any], index: int) -> List[Bucket]:
        """The group's params with a grad and their state, split by (device, dtype)."""
        keys = self._group_state_keys(group)
        params: List[Tensor] = []
        grads: List[Tensor] = []
        steps: List[Tensor] = []
        states: Tuple[List[Tensor], ...] = tuple([] for _ in keys)
        self._init_group(group, index, params, grads, steps, *states)
        return [Bucket(b[0], b[1], b[2], dict(zip(keys, b[3:])))
                for b in split_by_device_dtype(params, contiguous(grads), steps, *states)]

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every param group.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with nvtx_range(f"{self._name}.step"):
            for index, group in enumerate(self.param_groups):
                for bucket in self._buckets(group, index):
                    if group["centralize"]:
                        bucket.grads = _centralized(bucket.grads)
                    self._fused_step(group, bucket)
        return loss

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict from this class or from its torch.optim counterpart.

        torch casts loaded state to the param's dtype and keeps ``step`` on the host; here
        the moments stay float32 (bf16/fp16 params keep full-precision state) and
        ``step`` becomes a float32 scalar on the param's device. Tensors are copied, so
        the optimizer never shares memory with ``state_dict``.
        """
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        pairs = list(zip(saved_ids, params))
        if len(saved_ids) == len(params):
            for saved_id, p in pairs:
                for k, v in saved_state.get(saved_id, {}).items():
                    if k != "step" and isinstance(v, Tensor) and v.shape != p.shape:
                        raise ValueError(
                            f"{self._name}.load_state_dict: state {k!r} of saved param "
                            f"{saved_id} has shape {tuple(v.shape)} but the param it loads "
                            f"into has shape {tuple(p.shape)}")
        super().load_state_dict(state_dict)  # checks group sizes, loads param groups
        for saved_id, p in pairs:
            saved = saved_state.get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for k, v in saved.items():
                if k == "step":
                    state[k] = torch.as_tensor(v, dtype=STATE_DTYPE).to(
                        p.device, copy=True).reshape(())
                elif isinstance(v, Tensor) and v.is_floating_point():
                    state[k] = v.to(device=p.device, dtype=STATE_DTYPE,
                                    memory_format=torch.contiguous_format, copy=True)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for k, v in self._backfill.items():
            self.defaults.setdefault(k, v)
            for group in self.param_groups:
                group.setdefault(k, v)


def _centralized(grads: List[Tensor]) -> List[Tensor]:
    """Centralized copies of the 2+ dim grads (one fused call), others as they are."""
    idx = [i for i, g in enumerate(grads) if g.dim() > 1]
    if not idx:
        return grads
    # One multi-tensor copy (x * 1.0 is exact, NaN and -0 included), not one clone per
    # tensor: under torch.compile the graph then stays one op whatever the tensor count.
    copies = torch._foreach_mul([grads[i] for i in idx], 1.0)
    centralize_gradients_(copies)
    out = list(grads)
    for i, c in zip(idx, copies):
        out[i] = c
    return out

