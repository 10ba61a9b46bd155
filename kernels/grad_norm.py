"""Multi-tensor gradient norm (2-norm or max-norm) and clipping, no host sync.

``grad_norm``: two launches — per-chunk partials (sum of squares, or max |g|, in fp32)
into a workspace, then one program reducing them in a fixed order (deterministic) and
writing the total to a 0-dim fp32 tensor. ``clip_grad_norm_`` adds a third launch that
reads the total from device memory and scales every gradient by
``min(max_norm / (total + 1e-6), 1)``, as ``torch.nn.utils.clip_grad_norm_`` (always,
even when the factor is 1). NaN/Inf propagate as in torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._math import max_nan
from ._multi_tensor import NUMEL, ROLE0, check_device, chunk_table, device_guard

# Same tiling as the optimizers: 1024-element tiles, 4 per program, 4 warps (not
# measured here). A 1e9-element model gives ~250k partials; the single reducing
# program reads them 2048 at a time.
BLOCK = 1024
TILES = 4
CHUNK = BLOCK * TILES
NUM_WARPS = 4
RBLOCK = 2048
RBLOCK_WARPS = 8


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
@triton.jit
def _accumulate(acc, g, NORM_INF: tl.constexpr):
    """Per-lane fp32 accumulation: g**2 (2-norm) or max |g| propagating NaN."""
    if NORM_INF:
        return max_nan(acc, tl.abs(g))
    else:
        return acc + g * g


@triton.jit
def _accumulate_partial(acc, x, NORM_INF: tl.constexpr):
    """Per-lane combination of partials: sum or NaN-propagating max."""
    if NORM_INF:
        return max_nan(acc, x)
    else:
        return acc + x


@triton.jit
def _finish(acc, NORM_INF: tl.constexpr):
    """Tree reduction of the lanes (sum, or NaN-propagating max)."""
    if NORM_INF:
        return tl.reduce(acc, 0, max_nan)
    else:
        return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["n_tensors"])
def _norm_partials_kernel(g_base, chunks, meta, n_tensors, partials, ALIGNED: tl.constexpr,
                          G_VEC: tl.constexpr, NORM_INF: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets throughout
    nt = n_tensors.to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), CHUNK)
    numel = tl.load(meta + NUMEL * nt + t)
    off = tl.load(meta + ROLE0 * nt + t)
    if ALIGNED:
        off = tl.multiple_of(off, G_VEC)  # 16-byte aligned tensors (checked on the host)
    g_ptr = g_base + off + start
    offs = tl.arange(0, BLOCK)
    # Squares/abs of bf16/fp16 grads are taken after the upcast; fp32 accumulation.
    acc = tl.zeros((BLOCK,), tl.float32)
    if start + CHUNK <= numel:
        for i in tl.range(0, CHUNK // BLOCK):
            acc = _accumulate(acc, tl.load(g_ptr + i * BLOCK + offs).to(tl.float32), NORM_INF)
    else:
        rem = numel - start
        for i in tl.range(0, tl.cdiv(rem, BLOCK).to(tl.int32)):  # <= TILES
            o = i * BLOCK + offs
            # other=0: contributes nothing to a sum of squares or a max of |g|.
            g = tl.load(g_ptr + o, mask=o < rem, other=0.0).to(tl.float32)
            acc = _accumulate(acc, g, NORM_INF)
    tl.store(partials + pid, _finish(acc, NORM_INF))


@triton.jit(do_not_specialize=["n_chunks"])
def _norm_total_kernel(partials, n_chunks, out, NORM_INF: tl.constexpr, RBLOCK: tl.constexpr):
    """One program: the partials in a fixed order; sqrt for the 2-norm. No chunks
    (every gradient empty) gives 0, as torch."""
    offs = tl.arange(0, RBLOCK)
    acc = tl.zeros((RBLOCK,), tl.float32)
    for i in tl.range(0, tl.cdiv(n_chunks, RBLOCK)):
        o = i * RBLOCK + offs
        acc = _accumulate_partial(acc, tl.load(partials + o, mask=o < n_chunks, other=0.0),
                                  NORM_INF)
    total = _finish(acc, NORM_INF)
    if not NORM_INF:
        total = tl.sqrt_rn(total)  # IEEE sqrt, as torch
    tl.store(out, total)


@triton.jit(do_not_specialize=["n_tensors"])
def _clip_kernel(g_base, chunks, meta, n_tensors, total_ptr, max_norm, ALIGNED: tl.constexpr,
                 G_VEC: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nt = n_tensors.to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), CHUNK)
    numel = tl.load(meta + NUMEL * nt + t)
    off = tl.load(meta + ROLE0 * nt + t)
    if ALIGNED:
        off = tl.multiple_of(off, G_VEC)
    g_ptr = g_base + off + start
    # torch: clamp(max_norm / (total + 1e-6), max=1), where `float / tensor` is
    # reciprocal(tensor) * float; all fp32, IEEE reciprocal. NaN total -> NaN coef.
    total = tl.load(total_ptr)
    coef = tl.div_rn(1.0, total + 1e-6) * tl.cast(max_norm, tl.float32)
    coef = tl.where(coef > 1.0, 1.0, coef)
    offs = tl.arange(0, BLOCK)
    if start + CHUNK <= numel:
        for i in tl.range(0, CHUNK // BLOCK):
            o = i * BLOCK + offs
            g = tl.load(g_ptr + o).to(tl.float32) * coef
            tl.store(g_ptr + o, g.to(g_ptr.dtype.element_ty))  # fp32 product, RTNE store
    else:
        rem = numel - start
        for i in tl.range(0, tl.cdiv(rem, BLOCK).to(tl.int32)):  # <= TILES
            o = i * BLOCK + offs
            mask = o < rem
            g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * coef
            tl.store(g_ptr + o, g.to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------
def _check_norm_type(norm_type: float) -> bool:
    """True for the max-norm."""
    norm_type = float(norm_type)
    if norm_type == 2.0:
        return False
    if norm_type == math.inf:
        return True
    raise ValueError(f"pyoptk.kernels.grad_norm: norm_type must be 2.0 or inf, got {norm_type}")


def _launch_norm(grads, norm_inf: bool, what: str):
    """(total, table); total a 0-dim fp32 tensor on the grads' device."""
    device = grads[0].device
    check_device(device, what)
    out = torch.empty((), dtype=torch.float32, device=device)
    table = chunk_table([("grads", grads, True)], CHUNK)
    nc = 0 if table is None else table.n_chunks
    partials = torch.empty(max(nc, 1), dtype=torch.float32, device=device)
    with device_guard(device):
        if table is not None:
            b = table.base
            _norm_partials_kernel[(nc,)](
                grads[b], table.chunks, table.meta, table.n_tensors, partials,
                ALIGNED=table.aligned, G_VEC=16 // grads[b].element_size(), NORM_INF=norm_inf,
                BLOCK=BLOCK, CHUNK=CHUNK, num_warps=NUM_WARPS)
        _norm_total_kernel[(1,)](partials, nc, out, NORM_INF=norm_inf, RBLOCK=RBLOCK,
                                 num_warps=RBLOCK_WARPS)
    return out, table


def _launch_clip(grads, table, total, max_norm: float) -> None:
    b = table.base
    with device_guard(grads[0].device):
        _clip_kernel[(table.n_chunks,)](
            grads[b], table.chunks, table.meta, table.n_tensors, total, float(max_norm),
            ALIGNED=table.aligned, G_VEC=16 // grads[b].element_size(), BLOCK=BLOCK,
            CHUNK=CHUNK, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------
def grad_norm(grads: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Norm of all ``grads`` together (``norm_type`` 2.0 or inf) as a 0-dim float32
    tensor on their device; two launches, no host sync. Inputs as validated by
    ``pyoptk.ops.grad_norm`` (non-empty list, contiguous, one device and dtype)."""
    norm_inf = _check_norm_type(norm_type)
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float32)
    total, _ = _launch_norm(grads, norm_inf, "grad_norm")
    return total


def clip_grad_norm_(grads: Sequence[torch.Tensor], max_norm: float,
                    norm_type: float) -> torch.Tensor:
    """Scale ``grads`` in place by ``min(max_norm / (total + 1e-6), 1)`` and return the
    total norm (0-dim float32 on their device); three launches, no host sync."""
    norm_inf = _check_norm_type(norm_type)
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float32)
    total, table = _launch_norm(grads, norm_inf, "clip_grad_norm_")
    if table is not None:
        _launch_clip(grads, table, total, max_norm)
    return total
