"""Checks on the tensor lists that multi-tensor ops take, run before any pointer
reaches a kernel. Errors name the argument and what was expected."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32


def check_tensor_lists(
    op: str,
    lists: Dict[str, Sequence[torch.Tensor]],
    *,
    param_key: str = "params",
    same_dtype: Sequence[str] = (),
    state_keys: Sequence[str] = (),
) -> None:
    """Validate parallel tensor lists for a multi-tensor op.

    All lists must have ``len(lists[param_key])`` tensors on one device, each
    contiguous, dense, with the shape of the matching param. Lists in ``same_dtype``
    must have the param's dtype (fp32, bf16 or fp16, one dtype per call); lists in
    ``state_keys`` must be float32.
    """
    params = lists[param_key]
    for name, tensors in lists.items():
        if not isinstance(tensors, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, got {type(tensors).__name__}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if len(tensors) != len(params):
            raise ValueError(
                f"{op}: {name} has {len(tensors)} tensors but {param_key} has {len(params)}")
    if not params:
        return
    device = params[0].device
    dtype = params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"{op}: {param_key} must be float32, bfloat16 or float16, got {dtype}")
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            where = f"{op}: {name}[{i}]"
            if t.layout != torch.strided:
                raise ValueError(f"{where} is {t.layout}; sparse tensors are not supported")
            if t.device != device:
                raise ValueError(
                    f"{where} is on {t.device} but {param_key}[0] is on {device}; "
                    "all tensors of one call must be on one device")
            if t.shape != params[i].shape:
                raise ValueError(
                    f"{where} has shape {tuple(t.shape)}, expected {tuple(params[i].shape)}")
            if not t.is_contiguous():
                raise ValueError(
                    f"{where} is not contiguous; fused kernels need contiguous tensors "
                    "(call .contiguous() on the parameter, or use backend 'torch')")
            if name in same_dtype and t.dtype != dtype:
                raise TypeError(
                    f"{where} has dtype {t.dtype} but {param_key}[0] has {dtype}; "
                    "one call takes one parameter dtype (split groups by dtype)")
            if name in state_keys and t.dtype != STATE_DTYPE:
                raise TypeError(f"{where} must be float32 (optimizer state), got {t.dtype}")


def check_steps(op: str, steps: Sequence[torch.Tensor], n: int, device: torch.device) -> None:
    """``steps`` holds one float32 scalar tensor per param, on the params' device."""
    if not isinstance(steps, (list, tuple)):
        raise TypeError(f"{op}: steps must be a list of tensors, got {type(steps).__name__}")
    if len(steps) != n:
        raise ValueError(f"{op}: steps has {len(steps)} tensors but params has {n}")
    for i, s in enumerate(steps):
        if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32:
            raise TypeError(f"{op}: steps[{i}] must be a float32 tensor with one element")
        if s.device != device:
            raise ValueError(f"{op}: steps[{i}] is on {s.device}, expected {device}")


def check_lr(op: str, lr, device: torch.device) -> tuple:
    """Split ``lr`` (float or one-element float32 tensor) into (float, tensor or None)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype != torch.float32:
            raise TypeError(f"{op}: lr tensor must be float32 with one element, got "
                            f"{lr.dtype} with {lr.numel()} elements")
        if lr.device != device:
            raise ValueError(f"{op}: lr tensor is on {lr.device}, expected {device}")
        return 0.0, lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{op}: lr must be a float or a float32 tensor, got {type(lr).__name__}")
    if not lr >= 0.0:
        raise ValueError(f"{op}: Invalid learning rate: {lr}")
    return float(lr), None


def check_betas(op: str, beta1: float, beta2: float) -> None:
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{op}: Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{op}: Invalid beta parameter at index 1: {beta2}")


def check_nonneg(op: str, **values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
        if not v >= 0.0:
            raise ValueError(f"{op}: Invalid {name} value: {v}")


def device_type(tensors: List[torch.Tensor]) -> str:
    return tensors[0].device.type if tensors else "cpu"


def optional_lr(lr_t: Optional[torch.Tensor]) -> int:
    return 0 if lr_t is None else lr_t.data_ptr()
