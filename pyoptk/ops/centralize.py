"""Fused gradient centralization: ``torch.ops.pyoptk.centralize_gradients_``.

Gradient centralization (Yong et al., https://arxiv.org/abs/2004.01461) removes from
each weight gradient of 2+ dims its mean over all dims but the first (per output
row/channel): ``g[r] -= mean(g[r])``. Gradients of 0 or 1 dims (biases, norms) are
left alone. Means are accumulated in fp32 (double in the native CPU kernel).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from pyoptk._backend import implementation, register_backend
from pyoptk._native import native
from pyoptk._nvtx import annotate
from pyoptk.ops import _native_call as nc
from pyoptk.ops._eager import call_op
from pyoptk.ops._validation import check_tensor_lists

OP = "centralize_gradients_"


def centralize_reference(grads: List[Tensor]) -> None:
    """Centralize every gradient of 2+ dims in place (fp32 mean)."""
    for g in grads:
        if g.dim() > 1:
            rows = g.view(g.shape[0], -1)
            rows.copy_(rows.float() - rows.float().mean(dim=1, keepdim=True))


register_backend(OP, "torch")(centralize_reference)


def _rows_cols(grads: List[Tensor]):
    return [g.shape[0] for g in grads], [g.numel() // max(1, g.shape[0]) for g in grads]


@register_backend(OP, "cpu")
def _centralize_cpu(grads):
    rows, cols = _rows_cols(grads)
    native().centralize_cpu(nc.ptrs(grads), rows, cols, nc.dtype_code(grads[0].dtype))


@register_backend(OP, "cuda")
def _centralize_cuda(grads):
    rows, cols = _rows_cols(grads)
    native().centralize_cuda(nc.ptrs(grads), rows, cols, nc.dtype_code(grads[0].dtype),
                             nc.stream_handle(grads[0].device))


@register_backend(OP, "triton")
def _centralize_triton(grads):
    from pyoptk.kernels import centralize as kernels

    kernels.centralize_(grads)


@torch.library.custom_op("pyoptk::centralize_gradients_", mutates_args=("grads",))
def _centralize_op(grads: List[Tensor]) -> None:
    centralize_reference(grads)


@_centralize_op.register_kernel(("cpu", "cuda"))
def _centralize_dispatch(grads) -> None:
    matrices = [g for g in grads if g.dim() > 1 and g.numel() > 0]
    if matrices:
        implementation(OP, matrices[0].device.type)(matrices)


@_centralize_op.register_fake
def _(grads) -> None:
    return None


@annotate("centralize_gradients_")
def centralize_gradients_(grads: Sequence[Tensor]) -> None:
    """Gradient centralization in place over a list of gradients (one device, one dtype
    per call; contiguous). Gradients with fewer than 2 dims are not changed."""
    grads = list(grads)
    check_tensor_lists("centralize_gradients_", {"grads": grads}, param_key="grads")
    if grads:
        call_op(torch.ops.pyoptk.centralize_gradients_, _centralize_dispatch, (grads,), (grads,),
                grads)
