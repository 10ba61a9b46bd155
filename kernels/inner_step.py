"""Differentiable inner steps (SGD, MetaSGD, Adam) in Triton: forward and fused backward.

One launch per op over all tensors of the call, one program per chunk of ``CHUNK``
elements of one tensor, tensors addressed through the cached chunk table of
``_multi_tensor`` (base pointer + element offset per role). The arrays of one call are
all float32 or all float64 (``pyoptk.ops.inner_step`` upcasts bf16/fp16 params first).

Per-call scalars (``lr / (1 - b1^t)``, ``sqrt(1 - b2^t)``, ...) are computed by the
launcher into one small device tensor of the compute dtype with torch ops (a tensor lr
stays on device: no host sync), so fp64 runs keep full precision (Triton passes Python
floats as fp32). The element math follows ``pyoptk.ops.inner_step``'s reference
operation by operation (see ``csrc/include/pyoptk/inner_step_math.h``); fp32 divisions
and square roots are IEEE-rounded (``div_rn`` / ``sqrt_rn``, as torch's kernels).
The backward's sums (``d_lr``) are one fp32 (fp64) partial per program, added by the
launcher in program order.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._multi_tensor import NUMEL, ROLE0, check_device, chunk_table, device_guard

# 1024-element tiles, 4 per program (as the AdamW kernel; not tuned for this op).
BLOCK = 1024
TILES = 4
CHUNK = BLOCK * TILES
NUM_WARPS = 4

# Slots of the scalars tensor (constexpr: jitted code may read only constexpr globals).
(_S_LR, _S_C, _S_BC2, _S_LERP, _S_W1, _S_B1, _S_B2, _S_OMB2, _S_TWO_OMB2,
 _S_EPS) = (tl.constexpr(i) for i in range(10))


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
@triton.jit
def _div(a, b, F64: tl.constexpr):
    if F64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    if F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _n_tiles(rem, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Tiles this program covers: TILES, fewer in a tensor's last chunk."""
    return tl.minimum(tl.cdiv(rem, BLOCK), TILES).to(tl.int32)


@triton.jit
def _chunk(chunks, meta, n_tensors):
    """``(pid, nt, t, start, rem)`` of this program's chunk: its index, the tensor count,
    the tensor ``t`` the chunk lies in, its first element and the elements left from
    there to the tensor's end. All int64: tensors may exceed 2**31 elements."""
    pid = tl.program_id(0).to(tl.int64)
    nt = n_tensors.to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    return pid, nt, t, start, tl.load(meta + NUMEL * nt + t) - start


@triton.jit
def _ptr(base, meta, row, nt, t, start):
    return base + tl.load(meta + row * nt + t) + start


@triton.jit
def _moments(g, m, v, lerp_coef, beta2, omb2, FROM_END: tl.constexpr):
    """m' = torch.lerp(m, g, 1-b1) (torch's two forms), v' = v*b2 + ((1-b2)*g)*g."""
    if FROM_END:
        m2 = g + lerp_coef * (g - m)  # lerp_coef = w - 1
    else:
        m2 = m + lerp_coef * (g - m)  # lerp_coef = w
    v2 = v * beta2 + omb2 * g * g
    return m2, v2


@triton.jit
def _safe_sqrt(x, F64: tl.constexpr):
    """sqrt(x), 0 at x == 0 (derivative 0 there, see _safe_sqrt_grad)."""
    zero = x == 0.0
    return tl.where(zero, 0.0, _sqrt(tl.where(zero, 1.0, x), F64))


@triton.heuristics({"PER_ELEMENT": lambda a: a["a_base"] is not None})
@triton.jit(do_not_specialize=["n_tensors"])
def _sgd_kernel(p_base, g_base, a_base, o_base, scal, chunks, meta, n_tensors,
                PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    pid, nt, t, start, rem = _chunk(chunks, meta, n_tensors)
    p_ptr = _ptr(p_base, meta, ROLE0 + 0, nt, t, start)
    g_ptr = _ptr(g_base, meta, ROLE0 + 1, nt, t, start)
    o_ptr = _ptr(o_base, meta, ROLE0 + 2, nt, t, start)
    lr = tl.load(scal + _S_LR)
    if PER_ELEMENT:
        a_ptr = _ptr(a_base, meta, ROLE0 + 3, nt, t, start)
    offs = tl.arange(0, BLOCK)
    for i in tl.range(0, _n_tiles(rem, BLOCK, TILES)):
        o = i * BLOCK + offs
        mask = o < rem
        p = tl.load(p_ptr + o, mask=mask)
        g = tl.load(g_ptr + o, mask=mask)
        if PER_ELEMENT:
            a = tl.load(a_ptr + o, mask=mask)
            tl.store(o_ptr + o, p - a * g, mask=mask)
        else:
            tl.store(o_ptr + o, p - lr * g, mask=mask)


@triton.heuristics({"PER_ELEMENT": lambda a: a["a_base"] is not None,
                    "WANT_SUM": lambda a: a["part"] is not None})
@triton.jit(do_not_specialize=["n_tensors"])
def _sgd_backward_kernel(g_base, dp_base, dg_base, a_base, da_base, scal, part, chunks, meta,
                         n_tensors, PER_ELEMENT: tl.constexpr, WANT_SUM: tl.constexpr,
                         BLOCK: tl.constexpr, TILES: tl.constexpr):
    pid, nt, t, start, rem = _chunk(chunks, meta, n_tensors)
    g_ptr = _ptr(g_base, meta, ROLE0 + 0, nt, t, start)
    dp_ptr = _ptr(dp_base, meta, ROLE0 + 1, nt, t, start)
    dg_ptr = _ptr(dg_base, meta, ROLE0 + 2, nt, t, start)
    if PER_ELEMENT:
        a_ptr = _ptr(a_base, meta, ROLE0 + 3, nt, t, start)
        da_ptr = _ptr(da_base, meta, ROLE0 + 4, nt, t, start)
    lr = tl.load(scal + _S_LR)
    acc = tl.zeros([BLOCK], dtype=lr.dtype)  # fp32 (fp64) accumulation
    offs = tl.arange(0, BLOCK)
    for i in tl.range(0, _n_tiles(rem, BLOCK, TILES)):
        o = i * BLOCK + offs
        mask = o < rem
        g = tl.load(g_ptr + o, mask=mask)
        dp = tl.load(dp_ptr + o, mask=mask)
        if PER_ELEMENT:
            a = tl.load(a_ptr + o, mask=mask)
            tl.store(dg_ptr + o, (-a) * dp, mask=mask)
            tl.store(da_ptr + o, (-g) * dp, mask=mask)
        else:
            tl.store(dg_ptr + o, (-lr) * dp, mask=mask)
            if WANT_SUM:
                acc += tl.where(mask, dp * g, 0.0)
    if WANT_SUM:
        tl.store(part + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["n_tensors"])
def _adam_kernel(p_base, g_base, m_base, v_base, po_base, mo_base, vo_base, scal, chunks, meta,
                 n_tensors, FROM_END: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
                 TILES: tl.constexpr):
    pid, nt, t, start, rem = _chunk(chunks, meta, n_tensors)
    p_ptr = _ptr(p_base, meta, ROLE0 + 0, nt, t, start)
    g_ptr = _ptr(g_base, meta, ROLE0 + 1, nt, t, start)
    m_ptr = _ptr(m_base, meta, ROLE0 + 2, nt, t, start)
    v_ptr = _ptr(v_base, meta, ROLE0 + 3, nt, t, start)
    po_ptr = _ptr(po_base, meta, ROLE0 + 4, nt, t, start)
    mo_ptr = _ptr(mo_base, meta, ROLE0 + 5, nt, t, start)
    vo_ptr = _ptr(vo_base, meta, ROLE0 + 6, nt, t, start)
    c = tl.load(scal + _S_C)
    bc2 = tl.load(scal + _S_BC2)
    lerp_coef = tl.load(scal + _S_LERP)
    beta2 = tl.load(scal + _S_B2)
    omb2 = tl.load(scal + _S_OMB2)
    eps = tl.load(scal + _S_EPS)
    offs = tl.arange(0, BLOCK)
    for i in tl.range(0, _n_tiles(rem, BLOCK, TILES)):
        o = i * BLOCK + offs
        mask = o < rem
        p = tl.load(p_ptr + o, mask=mask)
        g = tl.load(g_ptr + o, mask=mask)
        m = tl.load(m_ptr + o, mask=mask)
        v = tl.load(v_ptr + o, mask=mask)
        m2, v2 = _moments(g, m, v, lerp_coef, beta2, omb2, FROM_END)
        d = _div(_safe_sqrt(v2, F64), bc2, F64) + eps
        tl.store(po_ptr + o, p - _div(c * m2, d, F64), mask=mask)
        tl.store(mo_ptr + o, m2, mask=mask)
        tl.store(vo_ptr + o, v2, mask=mask)


@triton.heuristics({"WANT_SUM": lambda a: a["part"] is not None})
@triton.jit(do_not_specialize=["n_tensors"])
def _adam_backward_kernel(g_base, m_base, v_base, dp_base, dm_base, dv_base, dgo_base,
                          dmo_base, dvo_base, scal, part, chunks, meta, n_tensors,
                          FROM_END: tl.constexpr, F64: tl.constexpr, WANT_SUM: tl.constexpr,
                          HAS_DM: tl.constexpr, HAS_DV: tl.constexpr,
                          BLOCK: tl.constexpr, TILES: tl.constexpr):
    """HAS_DM / HAS_DV false: d_m' / d_v' are zero (their role rows then hold the grads'
    offsets, never read)."""
    pid, nt, t, start, rem = _chunk(chunks, meta, n_tensors)
    g_ptr = _ptr(g_base, meta, ROLE0 + 0, nt, t, start)
    m_ptr = _ptr(m_base, meta, ROLE0 + 1, nt, t, start)
    v_ptr = _ptr(v_base, meta, ROLE0 + 2, nt, t, start)
    dp_ptr = _ptr(dp_base, meta, ROLE0 + 3, nt, t, start)
    dm_ptr = _ptr(dm_base, meta, ROLE0 + 4, nt, t, start)
    dv_ptr = _ptr(dv_base, meta, ROLE0 + 5, nt, t, start)
    dgo_ptr = _ptr(dgo_base, meta, ROLE0 + 6, nt, t, start)
    dmo_ptr = _ptr(dmo_base, meta, ROLE0 + 7, nt, t, start)
    dvo_ptr = _ptr(dvo_base, meta, ROLE0 + 8, nt, t, start)
    c = tl.load(scal + _S_C)
    bc2 = tl.load(scal + _S_BC2)
    lerp_coef = tl.load(scal + _S_LERP)
    w1 = tl.load(scal + _S_W1)
    beta1 = tl.load(scal + _S_B1)
    beta2 = tl.load(scal + _S_B2)
    omb2 = tl.load(scal + _S_OMB2)
    two_omb2 = tl.load(scal + _S_TWO_OMB2)
    eps = tl.load(scal + _S_EPS)
    acc = tl.zeros([BLOCK], dtype=c.dtype)
    offs = tl.arange(0, BLOCK)
    for i in tl.range(0, _n_tiles(rem, BLOCK, TILES)):
        o = i * BLOCK + offs
        mask = o < rem
        g = tl.load(g_ptr + o, mask=mask)
        m = tl.load(m_ptr + o, mask=mask)
        v = tl.load(v_ptr + o, mask=mask)
        dp = tl.load(dp_ptr + o, mask=mask)
        if HAS_DM:
            dm = tl.load(dm_ptr + o, mask=mask)
        else:
            dm = tl.zeros_like(g)
        if HAS_DV:
            dv = tl.load(dv_ptr + o, mask=mask)
        else:
            dv = tl.zeros_like(g)
        m2, v2 = _moments(g, m, v, lerp_coef, beta2, omb2, FROM_END)
        zero = v2 == 0.0
        r = tl.where(zero, 0.0, _sqrt(tl.where(zero, 1.0, v2), F64))
        # safe sqrt: derivative 0 (not +inf) at v' == 0
        dr = tl.where(zero, 0.0, _div(tl.zeros_like(r) + 0.5, tl.where(zero, 1.0, r), F64))
        d = _div(r, bc2, F64) + eps
        cdp = c * dp
        M = dm - _div(cdp, d, F64)
        V = dv + _div(_div(cdp * m2, d * d, F64) * dr, bc2, F64)
        tl.store(dgo_ptr + o, (two_omb2 * g) * V + w1 * M, mask=mask)
        tl.store(dmo_ptr + o, beta1 * M, mask=mask)
        tl.store(dvo_ptr + o, beta2 * V, mask=mask)
        if WANT_SUM:
            acc += tl.where(mask, dp * _div(m2, d, F64), 0.0)
    if WANT_SUM:
        tl.store(part + pid, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------
def _scalars(dtype, device, lr: float, lr_t: Optional[torch.Tensor], step: int = 1,
             beta1: float = 0.9, beta2: float = 0.999, eps: float = 0.0) -> torch.Tensor:
    """The scalars tensor (dtype, on device). lr_t stays on device (no host sync)."""
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    w = 1.0 - beta1
    lerp_coef = w if abs(w) < 0.5 else w - 1.0
    host = torch.tensor([lr, lr / bc1, bc2_sqrt, lerp_coef, w, beta1, beta2, 1.0 - beta2,
                         (1.0 - beta2) * 2.0, eps], dtype=dtype)
    scal = host.to(device, non_blocking=True)
    if lr_t is not None:
        lt = lr_t.reshape(1).to(dtype)
        # c = lr_t / bc1 in the compute dtype, as the reference's tensor division.
        scal = torch.cat([lt, lt / bc1, scal[2:]])
    return scal


def sgd(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
        lrs: Optional[Sequence[torch.Tensor]], lr: float,
        lr_t: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """SGD (``lrs`` None) or MetaSGD forward: new tensors ``p - lr*g`` / ``p - a*g``."""
    out = [torch.empty_like(p) for p in params]
    roles = [("params", params, True), ("grads", grads, True), ("out", out, True)]
    if lrs is not None:
        roles.append(("lrs", lrs, True))
    device = params[0].device
    check_device(device, "inner_sgd")
    table = chunk_table(roles, CHUNK)
    if table is None:
        return out
    b = table.base
    scal = _scalars(params[0].dtype, device, lr, lr_t)
    with device_guard(device):
        _sgd_kernel[(table.n_chunks,)](
            params[b], grads[b], lrs[b] if lrs is not None else None, out[b], scal,
            table.chunks, table.meta, table.n_tensors, BLOCK=BLOCK, TILES=TILES,
            num_warps=NUM_WARPS)
    return out


def sgd_backward(grads, lrs, d_params, lr: float, lr_t: Optional[torch.Tensor]
                 ) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]],
                            Optional[torch.Tensor]]:
    """``(d_grads, d_lrs or None, sum(d_p*g) or None)``: MetaSGD when ``lrs`` is given,
    else SGD (the sum only with a tensor lr)."""
    d_g = [torch.empty_like(g) for g in grads]
    d_a = [torch.empty_like(a) for a in lrs] if lrs is not None else None
    roles = [("grads", grads, True), ("d_params", d_params, True), ("d_grads", d_g, True)]
    if lrs is not None:
        roles += [("lrs", lrs, True), ("d_lrs", d_a, True)]
    device = grads[0].device
    check_device(device, "inner_sgd_backward")
    table = chunk_table(roles, CHUNK)
    want_sum = lrs is None and lr_t is not None
    if table is None:
        return d_g, d_a, (torch.zeros((), dtype=grads[0].dtype, device=device)
                          if want_sum else None)
    b = table.base
    scal = _scalars(grads[0].dtype, device, lr, lr_t)
    part = torch.empty(table.n_chunks, dtype=grads[0].dtype, device=device) if want_sum else None
    with device_guard(device):
        _sgd_backward_kernel[(table.n_chunks,)](
            grads[b], d_params[b], d_g[b], lrs[b] if lrs is not None else None,
            d_a[b] if d_a is not None else None, scal, part, table.chunks, table.meta,
            table.n_tensors, BLOCK=BLOCK, TILES=TILES, num_warps=NUM_WARPS)
    return d_g, d_a, (part.sum() if part is not None else None)


def adam(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float,
         lr_t: Optional[torch.Tensor], beta1: float, beta2: float, eps: float):
    """Adam forward: new lists ``(params, exp_avgs, exp_avg_sqs)``."""
    po = [torch.empty_like(p) for p in params]
    mo = [torch.empty_like(m) for m in exp_avgs]
    vo = [torch.empty_like(v) for v in exp_avg_sqs]
    roles = [("params", params, True), ("grads", grads, True), ("exp_avgs", exp_avgs, True),
             ("exp_avg_sqs", exp_avg_sqs, True), ("params_out", po, True),
             ("exp_avgs_out", mo, True), ("exp_avg_sqs_out", vo, True)]
    device = params[0].device
    check_device(device, "inner_adam")
    table = chunk_table(roles, CHUNK)
    if table is None:
        return po, mo, vo
    b = table.base
    dt = params[0].dtype
    scal = _scalars(dt, device, lr, lr_t, step, beta1, beta2, eps)
    with device_guard(device):
        _adam_kernel[(table.n_chunks,)](
            params[b], grads[b], exp_avgs[b], exp_avg_sqs[b], po[b], mo[b], vo[b], scal,
            table.chunks, table.meta, table.n_tensors, FROM_END=abs(1.0 - beta1) >= 0.5,
            F64=dt == torch.float64, BLOCK=BLOCK, TILES=TILES, num_warps=NUM_WARPS)
    return po, mo, vo


def adam_backward(grads, exp_avgs, exp_avg_sqs, d_params, d_exp_avgs, d_exp_avg_sqs,
                  step: int, lr: float, lr_t: Optional[torch.Tensor], beta1: float,
                  beta2: float, eps: float):
    """``(d_grads, d_exp_avgs, d_exp_avg_sqs, sum(d_p * m'/d) or None)``; the sum only
    with a tensor lr (``d_lr = -sum / (1 - b1^t)``). Empty ``d_exp_avgs`` /
    ``d_exp_avg_sqs``: zero cotangents."""
    has_dm, has_dv = len(d_exp_avgs) > 0, len(d_exp_avg_sqs) > 0
    d_exp_avgs = d_exp_avgs if has_dm else grads  # placeholder role, not read
    d_exp_avg_sqs = d_exp_avg_sqs if has_dv else grads
    dgo = [torch.empty_like(g) for g in grads]
    dmo = [torch.empty_like(m) for m in exp_avgs]
    dvo = [torch.empty_like(v) for v in exp_avg_sqs]
    roles = [("grads", grads, True), ("exp_avgs", exp_avgs, True),
             ("exp_avg_sqs", exp_avg_sqs, True), ("d_params", d_params, True),
             ("d_exp_avgs", d_exp_avgs, True), ("d_exp_avg_sqs", d_exp_avg_sqs, True),
             ("d_grads_out", dgo, True), ("d_exp_avgs_out", dmo, True),
             ("d_exp_avg_sqs_out", dvo, True)]
    device = grads[0].device
    check_device(device, "inner_adam_backward")
    dt = grads[0].dtype
    table = chunk_table(roles, CHUNK)
    want_sum = lr_t is not None
    if table is None:
        return dgo, dmo, dvo, (torch.zeros((), dtype=dt, device=device) if want_sum else None)
    b = table.base
    scal = _scalars(dt, device, lr, lr_t, step, beta1, beta2, eps)
    part = torch.empty(table.n_chunks, dtype=dt, device=device) if want_sum else None
    with device_guard(device):
        _adam_backward_kernel[(table.n_chunks,)](
            grads[b], exp_avgs[b], exp_avg_sqs[b], d_params[b], d_exp_avgs[b],
            d_exp_avg_sqs[b], dgo[b], dmo[b], dvo[b], scal, part, table.chunks, table.meta,
            table.n_tensors, FROM_END=abs(1.0 - beta1) >= 0.5, F64=dt == torch.float64,
            HAS_DM=has_dm, HAS_DV=has_dv, BLOCK=BLOCK, TILES=TILES, num_warps=NUM_WARPS)
    return dgo, dmo, dvo, (part.sum() if part is not None else None)
