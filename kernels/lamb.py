"""Multi-tensor LAMB in three Triton launches, no host sync.

1. ``_lamb_moments_kernel``, one program per chunk: updates m and v, and writes the
   chunk's partial sums of p**2 and u**2 (fp32) to a workspace. (``adam=True``: the
   trust ratio is 1, so this pass also applies the update and is the only launch.)
2. ``_lamb_trust_ratio_kernel``, one program per tensor: sums its chunks' partials in
   a fixed order (deterministic), takes the norms and writes the trust ratio.
3. ``_lamb_apply_kernel``, one program per chunk: recomputes u from (m, v, p) with the
   same code as pass 1 and applies ``p -= lr * ratio * u``.

u is never stored. A separate per-tensor reduction (pass 2) keeps the work linear in
the number of chunks; reducing inside pass 3 would make every chunk of a tensor re-read
all of that tensor's partials (quadratic in chunks per tensor).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._math import bias_correction, lerp, load_lr
from ._multi_tensor import (
    CHUNK_LEN, FIRST_CHUNK, NUMEL, ROLE0, check_device, chunk_table, device_guard, split_f64)

# Same tiling as adamw (see there): 1024-element tiles, 4 per program, 4 warps.
BLOCK = 1024
TILES = 4
CHUNK = BLOCK * TILES
NUM_WARPS = 4
# Partials summed per loop iteration of the trust-ratio pass.
RBLOCK = 1024

# Table rows of each role's element offsets, in the order ``_launch_lamb`` passes them.
_P = tl.constexpr(ROLE0 + 0)
_G = tl.constexpr(ROLE0 + 1)
_M = tl.constexpr(ROLE0 + 2)
_V = tl.constexpr(ROLE0 + 3)
_STEP = tl.constexpr(ROLE0 + 4)


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
@triton.jit
def _lamb_direction(p, m, v, bc1, bc2, eps, wd, BIAS_CORRECTION: tl.constexpr):
    """u = mh / (sqrt(vh) + eps) + wd * p in fp32 (IEEE division and square root),
    mh = m / bc1, vh = v / bc2 with bias correction (bc rounded to fp32 like the
    reference's ``(1 - beta**t).float()``)."""
    if BIAS_CORRECTION:
        m = tl.div_rn(m, bc1)
        v = tl.div_rn(v, bc2)
    return tl.div_rn(m, tl.sqrt_rn(v) + eps) + wd * p


@triton.jit
def _lamb_tile(p_ptr, g_ptr, m_ptr, v_ptr, o, mask, acc_p, acc_u, lr32, w1, beta2, w2,
               bc1, bc2, eps, wd, MASKED: tl.constexpr, ADAM: tl.constexpr,
               BIAS_CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
               LERP_FROM_END: tl.constexpr):
    """Pass-1 tile: moments, u, and either the squared-norm accumulators (LAMB) or
    the update itself (adam mode). fp32 throughout; params/grads upcast on load."""
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + o, mask=mask)
    v = tl.load(v_ptr + o, mask=mask)
    if MAXIMIZE:
        g = -g
    m = lerp(m, g, w1, LERP_FROM_END)
    v = v * beta2 + w2 * g * g
    tl.store(m_ptr + o, m, mask=mask)
    tl.store(v_ptr + o, v, mask=mask)
    u = _lamb_direction(p, m, v, bc1, bc2, eps, wd, BIAS_CORRECTION)
    if ADAM:
        # Trust ratio 1: p - (lr * 1) * u, rounded once (RTNE) to the param dtype.
        tl.store(p_ptr + o, (p - lr32 * u).to(p_ptr.dtype.element_ty), mask=mask)
    else:
        if MASKED:
            # Lanes past the end hold whatever the masked load left: keep them out.
            p = tl.where(mask, p, 0.0)
            u = tl.where(mask, u, 0.0)
        # Per-lane fp32 accumulation across the chunk's tiles, tree-summed at the end.
        acc_p += p * p
        acc_u += u * u
    return acc_p, acc_u


@triton.jit
def _chunk_scalars(chunks, meta, nt, pid, step_base, lr_ptr, lr_hi, lr_lo, beta1_hi,
                   beta1_lo, beta2_hi, beta2_lo, HAS_LR_T: tl.constexpr,
                   BIAS_CORRECTION: tl.constexpr, CHUNK: tl.constexpr):
    """A chunk's tensor, start, numel, and its tensor's lr (fp32) and bias
    corrections: computed in fp64 like the reference, rounded once to fp32."""
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), CHUNK)
    numel = tl.load(meta + NUMEL * nt + t)
    # The reference multiplies by lr.float(): the lr rounded to fp32.
    lr32 = load_lr(lr_ptr, lr_hi, lr_lo, HAS_LR_T).to(tl.float32)
    if BIAS_CORRECTION:
        step = tl.load(step_base + tl.load(meta + _STEP * nt + t)).to(tl.float64)
        bc1 = bias_correction(beta1_hi, beta1_lo, step).to(tl.float32)
        bc2 = bias_correction(beta2_hi, beta2_lo, step).to(tl.float32)
    else:
        bc1 = tl.full((), 1.0, tl.float32)
        bc2 = tl.full((), 1.0, tl.float32)
    return t, start, numel, lr32, bc1, bc2


@triton.jit
def _role_ptr(base, meta, nt, t, row, start, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """Pointer to the chunk of tensor ``t`` of the role in table ``row``: base +
    element offset + start."""
    off = tl.load(meta + row * nt + t)
    if ALIGNED:
        off = tl.multiple_of(off, VEC)  # 16-byte aligned tensors (checked on the host)
    return base + off + start


@triton.heuristics({"HAS_LR_T": lambda a: a["lr_ptr"] is not None})
@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def _lamb_moments_kernel(p_base, g_base, m_base, v_base, step_base, lr_ptr, chunks, meta,
                         n_tensors, partials, n_chunks,
                         lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo, w1, w2, eps,
                         wd, HAS_LR_T: tl.constexpr, ADAM: tl.constexpr,
                         BIAS_CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
                         LERP_FROM_END: tl.constexpr, ALIGNED: tl.constexpr,
                         P_VEC: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets throughout
    nt = n_tensors.to(tl.int64)
    t, start, numel, lr32, bc1, bc2 = _chunk_scalars(
        chunks, meta, nt, pid, step_base, lr_ptr, lr_hi, lr_lo, beta1_hi, beta1_lo,
        beta2_hi, beta2_lo, HAS_LR_T, BIAS_CORRECTION, CHUNK)
    p_ptr = _role_ptr(p_base, meta, nt, t, _P, start, ALIGNED, P_VEC)
    g_ptr = _role_ptr(g_base, meta, nt, t, _G, start, ALIGNED, P_VEC)
    m_ptr = _role_ptr(m_base, meta, nt, t, _M, start, ALIGNED, 4)
    v_ptr = _role_ptr(v_base, meta, nt, t, _V, start, ALIGNED, 4)
    # Element-wise hyperparameters in fp32, as torch's fp32 tensor ops use them.
    w1 = tl.cast(w1, tl.float32)
    w2 = tl.cast(w2, tl.float32)
    beta2 = tl.cast(beta2_hi, tl.float32)
    eps = tl.cast(eps, tl.float32)
    wd = tl.cast(wd, tl.float32)

    offs = tl.arange(0, BLOCK)
    acc_p = tl.zeros((BLOCK,), tl.float32)
    acc_u = tl.zeros((BLOCK,), tl.float32)
    if start + CHUNK <= numel:
        for i in tl.range(0, CHUNK // BLOCK):
            acc_p, acc_u = _lamb_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, i * BLOCK + offs, None, acc_p, acc_u, lr32, w1,
                beta2, w2, bc1, bc2, eps, wd, False, ADAM, BIAS_CORRECTION, MAXIMIZE,
                LERP_FROM_END)
    else:
        rem = numel - start
        for i in tl.range(0, tl.cdiv(rem, BLOCK).to(tl.int32)):  # <= TILES
            o = i * BLOCK + offs
            acc_p, acc_u = _lamb_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, o, o < rem, acc_p, acc_u, lr32, w1, beta2, w2,
                bc1, bc2, eps, wd, True, ADAM, BIAS_CORRECTION, MAXIMIZE, LERP_FROM_END)
    if not ADAM:
        tl.store(partials + pid, tl.sum(acc_p, axis=0))
        tl.store(partials + n_chunks.to(tl.int64) + pid, tl.sum(acc_u, axis=0))


@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def _lamb_trust_ratio_kernel(partials, n_chunks, meta, n_tensors, ratios, clamp_value,
                             RBLOCK: tl.constexpr):
    """One program per tensor: r = min(||p||, clamp) / ||u|| if both are > 0, else 1
    (a NaN norm compares false, so r = 1 and the NaN reaches p through u)."""
    t = tl.program_id(0).to(tl.int64)
    nt = n_tensors.to(tl.int64)
    nc = n_chunks.to(tl.int64)
    numel = tl.load(meta + NUMEL * nt + t)
    first = tl.load(meta + FIRST_CHUNK * nt + t)
    count = tl.cdiv(numel, tl.load(meta + CHUNK_LEN * nt + t))
    offs = tl.arange(0, RBLOCK)
    # fp32 partials summed per lane in a fixed order, then tree-summed: deterministic.
    acc_p = tl.zeros((RBLOCK,), tl.float32)
    acc_u = tl.zeros((RBLOCK,), tl.float32)
    for i in tl.range(0, tl.cdiv(count, RBLOCK)):
        o = i * RBLOCK + offs
        mask = o < count
        acc_p += tl.load(partials + first + o, mask=mask, other=0.0)
        acc_u += tl.load(partials + nc + first + o, mask=mask, other=0.0)
    w = tl.sqrt_rn(tl.sum(acc_p, axis=0))
    un = tl.sqrt_rn(tl.sum(acc_u, axis=0))
    clamp = tl.cast(clamp_value, tl.float32)  # may be +inf (no clamp)
    phi = tl.where(w > clamp, clamp, w)  # NaN w stays NaN, like torch.clamp
    ratio = tl.where((phi > 0) & (un > 0), tl.div_rn(phi, un), 1.0)
    tl.store(ratios + t, ratio)


@triton.heuristics({"HAS_LR_T": lambda a: a["lr_ptr"] is not None})
@triton.jit(do_not_specialize=["n_tensors"])
def _lamb_apply_kernel(p_base, m_base, v_base, step_base, lr_ptr, chunks, meta, n_tensors,
                       ratios, lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo, eps, wd,
                       HAS_LR_T: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                       ALIGNED: tl.constexpr, P_VEC: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nt = n_tensors.to(tl.int64)
    t, start, numel, lr32, bc1, bc2 = _chunk_scalars(
        chunks, meta, nt, pid, step_base, lr_ptr, lr_hi, lr_lo, beta1_hi, beta1_lo,
        beta2_hi, beta2_lo, HAS_LR_T, BIAS_CORRECTION, CHUNK)
    p_ptr = _role_ptr(p_base, meta, nt, t, _P, start, ALIGNED, P_VEC)
    m_ptr = _role_ptr(m_base, meta, nt, t, _M, start, ALIGNED, 4)
    v_ptr = _role_ptr(v_base, meta, nt, t, _V, start, ALIGNED, 4)
    eps = tl.cast(eps, tl.float32)
    wd = tl.cast(wd, tl.float32)
    # The reference's (lr.float() * ratio) * u: the scale is rounded to fp32 first.
    scale = lr32 * tl.load(ratios + t)

    offs = tl.arange(0, BLOCK)
    if start + CHUNK <= numel:
        for i in tl.range(0, CHUNK // BLOCK):
            o = i * BLOCK + offs
            p = tl.load(p_ptr + o).to(tl.float32)
            u = _lamb_direction(p, tl.load(m_ptr + o), tl.load(v_ptr + o), bc1, bc2, eps, wd,
                                BIAS_CORRECTION)
            tl.store(p_ptr + o, (p - scale * u).to(p_ptr.dtype.element_ty))  # RTNE
    else:
        rem = numel - start
        for i in tl.range(0, tl.cdiv(rem, BLOCK).to(tl.int32)):  # <= TILES
            o = i * BLOCK + offs
            mask = o < rem
            p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
            u = _lamb_direction(p, tl.load(m_ptr + o, mask=mask), tl.load(v_ptr + o, mask=mask),
                                bc1, bc2, eps, wd, BIAS_CORRECTION)
            tl.store(p_ptr + o, (p - scale * u).to(p_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------
def _launch_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, hp) -> None:
    device = params[0].device
    check_device(device, "lamb_")
    table = chunk_table([("params", params, True), ("grads", grads, True),
                         ("exp_avgs", exp_avgs, True), ("exp_avg_sqs", exp_avg_sqs, True),
                         ("steps", steps, False)], CHUNK)
    if table is None:  # only empty tensors
        return
    b, nc, nt = table.base, table.n_chunks, table.n_tensors
    adam = bool(hp.adam)
    bc = bool(hp.bias_correction)
    p_vec = 16 // params[b].element_size()
    lr = split_f64(hp.lr)
    betas = (*split_f64(hp.beta1), *split_f64(hp.beta2))
    w1 = 1.0 - hp.beta1  # in double, like torch's python-side `1 - beta1`
    # fp32 workspace: [0, nc) partial sum p**2, [nc, 2nc) partial sum u**2, then one
    # trust ratio per tensor.
    work = None if adam else torch.empty(2 * nc + nt, dtype=torch.float32, device=device)
    with device_guard(device):
        _lamb_moments_kernel[(nc,)](
            params[b], grads[b], exp_avgs[b], exp_avg_sqs[b], steps[b], hp.lr_t,
            table.chunks, table.meta, nt, work, nc, *lr, *betas, w1, 1.0 - hp.beta2,
            hp.eps, hp.weight_decay, ADAM=adam, BIAS_CORRECTION=bc,
            MAXIMIZE=bool(hp.maximize), LERP_FROM_END=abs(w1) >= 0.5,
            ALIGNED=table.aligned, P_VEC=p_vec, BLOCK=BLOCK, CHUNK=CHUNK,
            num_warps=NUM_WARPS)
        if adam:
            return
        ratios = work[2 * nc:]
        _lamb_trust_ratio_kernel[(nt,)](work, nc, table.meta, nt, ratios,
                                        float(hp.clamp_value), RBLOCK=RBLOCK,
                                        num_warps=NUM_WARPS)
        _lamb_apply_kernel[(nc,)](
            params[b], exp_avgs[b], exp_avg_sqs[b], steps[b], hp.lr_t, table.chunks,
            table.meta, nt, ratios, *lr, *betas, hp.eps, hp.weight_decay,
            BIAS_CORRECTION=bc, ALIGNED=table.aligned, P_VEC=p_vec, BLOCK=BLOCK,
            CHUNK=CHUNK, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def lamb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
          exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
          steps: Sequence[torch.Tensor], hp) -> None:
    """One LAMB step over all tensors, in place: three launches (one with
    ``hp.adam``), no host sync.

    Inputs as validated by ``pyoptk.ops.lamb`` (contiguous, one device, params/grads
    fp32/bf16/fp16, states and steps fp32; ``steps[i]`` already holds this update's
    step). ``hp`` is a ``LambHyper``; ``hp.lr_t`` overrides ``hp.lr`` on device.
    """
    if len(params) == 0:
        return
    _launch_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, hp)
