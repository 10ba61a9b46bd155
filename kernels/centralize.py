"""Gradient centralization (Yong et al. 2020) in one Triton launch.

Each gradient of 2+ dims is viewed as ``[rows = shape[0], cols = numel / rows]`` and
every row loses its mean: ``g[r, :] -= mean(g[r, :])``. One program per (tensor, row)
of the whole list: it sums its row in ``BLOCK`` pieces (fp32), then subtracts the mean
in a second sweep, so rows of any length work.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._multi_tensor import CHUNK_LEN, ROLE0, check_device, chunk_table, device_guard

# Tile = the next power of two of the longest row, clamped to [128, 1024]: one lane per
# thread at 4 warps for short rows (conv kernels with few columns), 8 per thread for
# long ones. Distinct values compile separately (at most 4).
MIN_BLOCK = 128
MAX_BLOCK = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
@triton.jit
def _row_sum(row_ptr, cols, BLOCK: tl.constexpr):
    """Sum of a row in fp32 whatever the grad dtype: per-lane accumulation over the
    row's tiles, then a tree sum."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.range(0, tl.cdiv(cols, BLOCK)):
        o = i * BLOCK + offs
        acc += tl.load(row_ptr + o, mask=o < cols, other=0.0).to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["n_tensors"])
def _centralize_kernel(g_base, chunks, meta, n_tensors, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets throughout
    nt = n_tensors.to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    row_start = tl.load(chunks + 2 * pid + 1)  # row index * cols
    cols = tl.load(meta + CHUNK_LEN * nt + t)
    row_ptr = g_base + tl.load(meta + ROLE0 * nt + t) + row_start
    # fp32 mean, IEEE division by the column count (as the reference's fp32 mean).
    mean = tl.div_rn(_row_sum(row_ptr, cols, BLOCK), cols.to(tl.float32))
    offs = tl.arange(0, BLOCK)
    for i in tl.range(0, tl.cdiv(cols, BLOCK)):
        o = i * BLOCK + offs
        mask = o < cols
        g = tl.load(row_ptr + o, mask=mask).to(tl.float32) - mean
        tl.store(row_ptr + o, g.to(row_ptr.dtype.element_ty), mask=mask)  # RTNE


# ----------------------------------------------------------------------------------
# Launcher.
# ----------------------------------------------------------------------------------
def _launch_centralize(grads) -> None:
    device = grads[0].device
    check_device(device, "centralize_")
    cols = [g.numel() // g.shape[0] if g.shape[0] > 0 else 1 for g in grads]
    # Rows are the table's chunks: chunk length = cols, chunk count = rows.
    table = chunk_table([("grads", grads, True)], [max(c, 1) for c in cols])
    if table is None:  # only empty gradients
        return
    block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(max(cols))))
    with device_guard(device):
        _centralize_kernel[(table.n_chunks,)](
            grads[table.base], table.chunks, table.meta, table.n_tensors, BLOCK=block,
            num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def centralize_(grads: Sequence[torch.Tensor]) -> None:
    """Subtract from every row of every gradient its mean, in place, in one launch.
    The op passes only gradients of 2+ dims (contiguous, one device and dtype)."""
    if len(grads) == 0:
        return
    for i, g in enumerate(grads):
        if g.dim() < 2:
            raise ValueError(f"pyoptk.kernels.centralize_: grads[{i}] has {g.dim()} dims; "
                             "only gradients of 2+ dims are centralized")
    _launch_centralize(grads)
