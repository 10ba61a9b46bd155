"""Checks on the tensor lists that multi-tensor ops take, run before any pointer
reaches a kernel. Errors name the argument and what was expected."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")


def check_list(op: str, name: str, tensors, n: Optional[int] = None,
               lead: str = "params") -> List[torch.Tensor]:
    """``tensors`` as a list: a list/tuple of tensors (``n`` of them when given)."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if n is not None and len(tensors) != n:
        raise ValueError(f"{op}: {name} has {len(tensors)} tensors but {lead} has {n}")
    return list(tensors)


def check_tensor(op: str, where: str, t: torch.Tensor, device: torch.device, *,
                 shape: Optional[Tuple[int, ...]] = None, dtype: Optional[torch.dtype] = None,
                 lead: str = "params") -> None:
    """One tensor a kernel will read by pointer: strided, on ``device``, contiguous, and
    of ``shape`` / ``dtype`` when given."""
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {where} is {t.layout}; sparse tensors are not supported")
    if t.device != device:
        raise ValueError(f"{op}: {where} is on {t.device} but {lead}[0] is on {device}; "
                         "all tensors of one call must be on one device")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {where} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {where} must be {dtype_name(dtype)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {where} is not contiguous; fused kernels need contiguous "
                         "tensors (call .contiguous() on it, or use backend 'torch')")


def check_tensor_lists(
    op: str,
    lists: Mapping[str, Sequence[torch.Tensor]],
    *,
    param_key: str = "params",
    same_dtype: Sequence[str] = (),
    state_keys: Sequence[str] = (),
    param_dtypes: Sequence[torch.dtype] = PARAM_DTYPES,
    state_dtype: Callable[[torch.dtype], torch.dtype] = lambda dtype: STATE_DTYPE,
    shapes: Optional[Mapping[str, Callable[[Tuple[int, ...]], Tuple[int, ...]]]] = None,
    one_dtype: bool = True,
) -> Dict[str, List[torch.Tensor]]:
    """Validate parallel tensor lists for a multi-tensor op; returns them as lists.

    All lists must have ``len(lists[param_key])`` tensors, all on one device, strided
    and contiguous. The params share one dtype out of ``param_dtypes`` (with
    ``one_dtype=False`` each has one of them, e.g. gradients grouped by dtype); lists in
    ``same_dtype`` have it too, lists in ``state_keys`` have ``state_dtype(it)``
    (float32 by default). Tensor ``i`` of list ``name`` has the shape
    ``shapes[name](params[i].shape)`` (the param's own shape for lists not in
    ``shapes``).
    """
    params = check_list(op, param_key, lists[param_key])
    out = {name: params if name == param_key else
           check_list(op, name, ts, len(params), lead=param_key) for name, ts in lists.items()}
    if not params:
        return out
    device, dtype = params[0].device, params[0].dtype
    for i, p in enumerate(params if not one_dtype else params[:1]):
        if p.dtype not in param_dtypes:
            names = [dtype_name(d) for d in param_dtypes]
            where = param_key if one_dtype else f"{param_key}[{i}]"
            raise TypeError(f"{op}: {where} must be {', '.join(names[:-1])} or {names[-1]}, "
                            f"got {p.dtype}")
    sdt = state_dtype(dtype)
    shapes = shapes or {}
    for name, ts in out.items():
        shape_of = shapes.get(name)
        for i, t in enumerate(ts):
            where = f"{name}[{i}]"
            if ((name == param_key and one_dtype) or name in same_dtype) and t.dtype != dtype:
                raise TypeError(f"{op}: {where} has dtype {t.dtype} but {param_key}[0] has "
                                f"{dtype}; one call takes one parameter dtype (split groups "
                                "by dtype)")
            pshape = tuple(params[i].shape)
            check_tensor(op, where, t, device,
                         shape=shape_of(pshape) if shape_of else pshape,
                         dtype=sdt if name in state_keys else None, lead=param_key)
    return out


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
