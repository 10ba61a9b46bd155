"""``MLPOptimizer``: the per-parameter MLP learned optimizer as a ``torch.optim`` class.

A thin stateful wrapper over the pure rule of :mod:`pyoptk.learned.mlp`: ``step()``
only gathers lists per (param group, device, dtype) and makes one call of the fused
in-place op :func:`pyoptk.ops.mlp_update.mlp_update_` per bucket.

.. math::
    p \\leftarrow p - \\mathrm{lr}\\cdot\\beta\\,\\big(d\\,e^{\\alpha a} + \\lambda p\\big),
    \\qquad (d, a) = \\mathrm{MLP}(\\text{features}(p, g, \\text{state}, t))

See ``docs/learned.md`` for the features, constants and memory cost.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from pyoptk._nvtx import nvtx_range
from pyoptk.learned import mlp as rule
from pyoptk.learned.mlp import MLPConfig
from pyoptk.ops.mlp_update import mlp_update_
from pyoptk.optim._fused import contiguous, split_by_device_dtype
from pyoptk.optim.learned import LearnedOptimizer

__all__ = ["MLPOptimizer"]


def _check_scalar(name: str, value, allow_tensor: bool = False) -> None:
    if allow_tensor and isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element")
        if not value.is_floating_point():
            raise TypeError(f"a tensor {name} must be floating point, got {value.dtype}")
        value = float(value.detach().reshape(()).cpu())  # once, at construction
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= 0.0:
        raise ValueError(f"Invalid {name} value: {value}")


class MLPOptimizer(LearnedOptimizer):
    """Learned optimizer applying a small MLP to each parameter element's features.

    Args:
        params: iterable of parameters or param-group dicts.
        meta_params (mapping name → tensor, or an ``MLPRule``; default None): the rule's
            meta-parameters (``w0, b0, …``). None: a fresh, *untrained* rule from
            :func:`pyoptk.learned.init_meta_params` with ``seed`` — its steps are tiny
            and not a good optimizer; load trained ones with :meth:`from_pretrained`.
        config (MLPConfig, default MLPConfig()): features (39 by default), MLP widths
            (32, 32) and output constants α = β = 1e-3.
        lr_mult (float or one-element tensor, default 1.0): scales every step. Stored as
            each group's ``"lr"``, so ``torch.optim.lr_scheduler`` schedules it.
        weight_decay (float, default 0.0): decoupled weight decay λ, applied as
            ``p -= lr·β·λ·p`` (β = ``config.step_mult``).
        seed (int, default 0): seed of the fresh meta-parameters when none are given.

    State per parameter (float32): ``step`` (0-dim), ``mom`` (K, *shape), ``rms``
    (R, *shape), ``fac_row``/``fac_col`` (see docs/learned.md): 24 B/element for
    matrices, 36 B/element for vectors with the default config.

    Parameters without ``.grad`` are skipped. A tensor whose gradient has a NaN/Inf is
    skipped for that step (param, state and step count unchanged). ``step()`` needs no
    loss; a closure, if given, is evaluated with grad enabled and its value returned.
    """

    rule_name = rule.RULE_NAME
    rule_version = rule.RULE_VERSION
    config_class = MLPConfig

    def __init__(self, params, meta_params: Optional[Mapping[str, Tensor]] = None,
                 config: Optional[MLPConfig] = None, lr_mult: Union[float, Tensor] = 1.0,
                 weight_decay: float = 0.0, *, seed: int = 0) -> None:
        config = MLPConfig() if config is None else config
        _check_scalar("lr_mult", lr_mult, allow_tensor=True)
        _check_scalar("weight_decay", weight_decay)
        if meta_params is None:
            if not isinstance(config, MLPConfig):
                raise TypeError(f"MLPOptimizer: config must be an MLPConfig, got "
                                f"{type(config).__name__}")
            meta_params = self.default_meta_params(config, seed)
        defaults = dict(lr=lr_mult, weight_decay=weight_decay)
        super().__init__(params, defaults, meta_params, config)

    @classmethod
    def _check_meta_params(cls, meta_params, config) -> None:
        rule.check_meta_params(meta_params, config)

    @classmethod
    def default_meta_params(cls, config: MLPConfig, seed: int = 0) -> "OrderedDict[str, Tensor]":
        return rule.init_meta_params(config, seed)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # back-fill options added later
            group.setdefault("lr", 1.0)
            group.setdefault("weight_decay", 0.0)

    def _build_device_meta(self, device: torch.device) -> Tuple[List[Tensor], Tensor]:
        with torch.no_grad():
            weights = [w.to(device=device, dtype=torch.float32).contiguous()
                       for w in rule.meta_weights(self._meta_params, self.config)]
            decays = rule.decays_tensor(self.config, self._meta_params, device=device,
                                        dtype=torch.float32).contiguous()
        return weights, decays

    def _init_group(self, group, params: List[Tensor], grads: List[Tensor],
                    moms: List[Tensor], rmss: List[Tensor], fac_rows: List[Tensor],
                    fac_cols: List[Tensor], steps: List[Tensor]) -> None:
        """Append the group's parameters that have a gradient, their gradients and their
        state (created lazily) to the lists passed in. torch.optim's convention — flat
        lists of tensors filled in place, nothing returned — which torch.compile relies
        on: dynamo runs an optimizer's ``_init_group`` eagerly and maps only the tensors
        it appends to such lists."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MLPOptimizer does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state.update(rule.init_tensor_state(p, self.config, dtype=torch.float32))
            params.append(p)
            grads.append(p.grad)
            moms.append(state["mom"])
            rmss.append(state["rms"])
            fac_rows.append(state["fac_row"])
            fac_cols.append(state["fac_col"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step over every parameter with a gradient. Returns the closure's loss
        (None without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with nvtx_range("MLPOptimizer.step"):
            for group in self.param_groups:
                lists: Tuple[List[Tensor], ...] = ([], [], [], [], [], [], [])
                self._init_group(group, *lists)
                # one op call per (device, dtype) bucket
                for params, grads, moms, rmss, fac_rows, fac_cols, steps in \
                        split_by_device_dtype(*lists):
                    device = params[0].device
                    grads = contiguous(grads)
                    weights, decays = self._meta_on(device, self._build_device_meta)
                    lr = group["lr"]
                    if isinstance(lr, Tensor):
                        lr = lr.to(device=device, dtype=torch.float32).reshape(1)
                    hp = self.config.op_hyper(lr, group["weight_decay"])
                    mlp_update_(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights,
                                decays, hp)
        return loss
