"""Fused multi-tensor gradient norm and clipping: ``torch.ops.pyoptk.grad_norm`` and
``torch.ops.pyoptk.clip_grad_norm_``.

Same result as ``torch.nn.utils.clip_grad_norm_``: the norm of all gradients together
(2-norm or max-norm), then every gradient scaled by
``min(max_norm / (total + 1e-6), 1)``. The fused backends compute per-chunk partial
norms and the scale on device, so nothing waits for the host (no ``.item()``), and a
training step that clips stays asynchronous and CUDA-graph capturable. A NaN/Inf
gradient gives a NaN/Inf total and NaN gradients, as in torch, unless
``error_if_nonfinite=True`` (which must sync to check). Unlike torch, an empty
gradient is allowed with the max-norm (it contributes 0).
"""

from __future__ import annotations

import math
from typing import Iterable, List, Union

import torch
from torch import Tensor

from pyoptk._backend import implementation, register_backend
from pyoptk._native import native
from pyoptk._nvtx import annotate
from pyoptk.ops import _native_call as nc
from pyoptk.ops._eager import call_op
from pyoptk.ops._validation import check_tensor_lists

NORM_OP = "grad_norm"
CLIP_OP = "clip_grad_norm_"


# ----------------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------------
def grad_norm_reference(grads: List[Tensor], norm_type: float) -> Tensor:
    """The norm of all ``grads`` together, as a float32 0-dim tensor (fp32 math)."""
    # Empty tensors contribute nothing (vector_norm rejects the inf-norm of one).
    norms = [torch.linalg.vector_norm(g.float(), norm_type) for g in grads if g.numel()]
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=grads[0].device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def clip_grad_norm_reference(grads: List[Tensor], max_norm: float, norm_type: float) -> Tensor:
    total = grad_norm_reference(grads, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.copy_(g.float() * coef)
    return total


register_backend(NORM_OP, "torch")(grad_norm_reference)
register_backend(CLIP_OP, "torch")(clip_grad_norm_reference)


# ----------------------------------------------------------------------------------
# Backend launchers.
# ----------------------------------------------------------------------------------
def _scalar_out(grads: List[Tensor]) -> Tensor:
    return torch.empty((), dtype=torch.float32, device=grads[0].device)


def _workspace(grads: List[Tensor]) -> Tensor:
    n = native().norm_workspace_numel(nc.numels(grads))
    return torch.empty(max(1, n), dtype=torch.float32, device=grads[0].device)


@register_backend(NORM_OP, "cpu")
def _grad_norm_cpu(grads, norm_type):
    out = _scalar_out(grads)
    native().grad_norm_cpu(nc.ptrs(grads), nc.numels(grads), nc.dtype_code(grads[0].dtype),
                           norm_type, out.data_ptr())
    return out


@register_backend(CLIP_OP, "cpu")
def _clip_grad_norm_cpu(grads, max_norm, norm_type):
    out = _scalar_out(grads)
    native().clip_grad_norm_cpu(nc.ptrs(grads), nc.numels(grads),
                                nc.dtype_code(grads[0].dtype), norm_type, max_norm,
                                out.data_ptr())
    return out


@register_backend(NORM_OP, "cuda")
def _grad_norm_cuda(grads, norm_type):
    out, ws = _scalar_out(grads), _workspace(grads)
    native().grad_norm_cuda(nc.ptrs(grads), nc.numels(grads), nc.dtype_code(grads[0].dtype),
                            norm_type, out.data_ptr(), ws.data_ptr(),
                            nc.stream_handle(grads[0].device))
    return out


@register_backend(CLIP_OP, "cuda")
def _clip_grad_norm_cuda(grads, max_norm, norm_type):
    out, ws = _scalar_out(grads), _workspace(grads)
    native().clip_grad_norm_cuda(nc.ptrs(grads), nc.numels(grads),
                                 nc.dtype_code(grads[0].dtype), norm_type, max_norm,
                                 out.data_ptr(), ws.data_ptr(),
                                 nc.stream_handle(grads[0].device))
    return out


@register_backend(NORM_OP, "triton")
def _grad_norm_triton(grads, norm_type):
    from pyoptk.kernels import grad_norm as kernels

    return kernels.grad_norm(grads, norm_type)


@register_backend(CLIP_OP, "triton")
def _clip_grad_norm_triton(grads, max_norm, norm_type):
    from pyoptk.kernels import grad_norm as kernels

    return kernels.clip_grad_norm_(grads, max_norm, norm_type)


# ----------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------
@torch.library.custom_op("pyoptk::grad_norm", mutates_args=())
def _grad_norm_op(grads: List[Tensor], norm_type: float) -> Tensor:
    return grad_norm_reference(grads, norm_type)


@_grad_norm_op.register_kernel(("cpu", "cuda"))
def _grad_norm_dispatch(grads, norm_type):
    return implementation(NORM_OP, grads[0].device.type)(grads, norm_type)


@_grad_norm_op.register_fake
def _(grads, norm_type):
    return grads[0].new_empty((), dtype=torch.float32)


@torch.library.custom_op("pyoptk::clip_grad_norm_", mutates_args=("grads",))
def _clip_op(grads: List[Tensor], max_norm: float, norm_type: float) -> Tensor:
    return clip_grad_norm_reference(grads, max_norm, norm_type)


@_clip_op.register_kernel(("cpu", "cuda"))
def _clip_dispatch(grads, max_norm, norm_type):
    return implementation(CLIP_OP, grads[0].device.type)(grads, max_norm, norm_type)


@_clip_op.register_fake
def _(grads, max_norm, norm_type):
    return grads[0].new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------
def _collect_grads(op: str, parameters) -> List[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    try:
        tensors = list(parameters)
    except TypeError:
        raise TypeError(f"{op}: parameters must be a tensor or an iterable of tensors, "
                        f"got {type(parameters).__name__}") from None
    grads = []
    for i, p in enumerate(tensors):
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: parameters[{i}] must be a tensor, got {type(p).__name__}")
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def _check_norm_type(op: str, norm_type: float) -> float:
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"{op}: norm_type must be 2.0 or inf, got {norm_type}")
    return norm_type


def _by_dtype(grads: List[Tensor]) -> List[List[Tensor]]:
    groups: dict = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    return list(groups.values())


def _norm(grads: List[Tensor], norm_type: float) -> Tensor:
    return call_op(torch.ops.pyoptk.grad_norm, _grad_norm_dispatch, (grads,), (), grads,
                   norm_type)


def _combine(norms: List[Tensor], norm_type: float) -> Tensor:
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), norm_type)


@annotate("grad_norm")
def grad_norm(parameters: Union[Tensor, Iterable[Tensor]], norm_type: float = 2.0) -> Tensor:
    """Norm of the ``.grad`` of ``parameters`` taken together (float32 0-dim tensor on
    their device; 0 when no parameter has a gradient). No host sync."""
    op = "grad_norm"
    norm_type = _check_norm_type(op, norm_type)
    grads = _collect_grads(op, parameters)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    check_tensor_lists(op, {"grads": grads}, param_key="grads", one_dtype=False)
    return _combine([_norm(g, norm_type) for g in _by_dtype(grads)], norm_type)


@annotate("clip_grad_norm_")
def clip_grad_norm_(parameters: Union[Tensor, Iterable[Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` (2-norm or max-norm), fused.

    Scales the ``.grad`` of ``parameters`` in place by
    ``min(max_norm / (total_norm + 1e-6), 1)`` and returns ``total_norm`` (float32
    0-dim tensor on the gradients' device). Gradients must be contiguous and on one
    device; any mix of float32/bfloat16/float16 is allowed. With
    ``error_if_nonfinite=True`` a NaN/Inf total raises RuntimeError before any gradient
    is touched (this one check syncs with the host).
    """
    op = "clip_grad_norm_"
    norm_type = _check_norm_type(op, norm_type)
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"{op}: max_norm must be a non-negative float, got {max_norm!r}")
    grads = _collect_grads(op, parameters)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    check_tensor_lists(op, {"grads": grads}, param_key="grads", one_dtype=False)
    groups = _by_dtype(grads)
    if len(groups) == 1 and not error_if_nonfinite:
        return call_op(torch.ops.pyoptk.clip_grad_norm_, _clip_dispatch, (grads,), (grads,),
                       grads, float(max_norm), norm_type)
    total = _combine([_norm(g, norm_type) for g in groups], norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in groups:
        torch._foreach_mul_(group, coef.to(group[0].dtype))
    return total
