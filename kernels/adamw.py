"""Multi-tensor AdamW in one Triton launch (``torch.optim.AdamW``'s update).

One program per chunk of ``CHUNK`` elements of one tensor; every tensor of the call
is addressed from its role's base pointer plus an element offset read from a cached
int64 table (see ``_multi_tensor``). The step count and (optionally) the learning rate
are read on device, so a step never syncs with the host.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._math import bias_correction, f64, lerp, load_lr, max_nan
from ._multi_tensor import NUMEL, ROLE0, check_device, chunk_table, device_guard, split_f64

# Tile of 1024 elements: 8 fp32 per thread at 4 warps, i.e. two 16-byte accesses per
# tensor per thread. 4 tiles per program amortize the table reads and the fp64 scalar
# math; a 4096-element chunk keeps the table at 16 bytes per 16 KiB of fp32 params.
# Chosen by analogy with torch's multi_tensor_apply (ILP 4), not measured here.
BLOCK = 1024
TILES = 4
CHUNK = BLOCK * TILES
NUM_WARPS = 4

# Table rows of each role's element offsets, in the order of ``_roles``.
_P = tl.constexpr(ROLE0 + 0)
_G = tl.constexpr(ROLE0 + 1)
_M = tl.constexpr(ROLE0 + 2)
_V = tl.constexpr(ROLE0 + 3)
_STEP = tl.constexpr(ROLE0 + 4)
_VMAX = tl.constexpr(ROLE0 + 5)


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
@triton.jit
def _adamw_param(p, m, vv, wd_scale, step_size, bc2_sqrt, eps):
    """``p*(1 - lr*wd) - (lr/bc1) * m / (sqrt(vv)/sqrt(bc2) + eps)`` in fp32, in the
    reference's order of operations, IEEE-rounded division and square root."""
    p = p * wd_scale
    denom = tl.div_rn(tl.sqrt_rn(vv), bc2_sqrt) + eps
    return p - tl.div_rn(step_size * m, denom)


@triton.jit
def _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, o, mask, w1, beta2, w2, eps, wd_scale,
                step_size, bc2_sqrt, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                LERP_FROM_END: tl.constexpr):
    """One tile at element offsets ``o`` from the chunk's pointers: load, update,
    store. ``mask`` is None on full tiles (unmasked accesses vectorize).
    Params/grads are upcast to fp32 on load; states are fp32."""
    p_ptr += o
    m_ptr += o
    v_ptr += o
    p = tl.load(p_ptr, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32)
    m = tl.load(m_ptr, mask=mask)
    v = tl.load(v_ptr, mask=mask)
    if MAXIMIZE:
        g = -g
    m = lerp(m, g, w1, LERP_FROM_END)
    # v*b2 + ((1-b2)*g)*g: torch's mul_ then addcmul_ (value * t1 * t2) order.
    v = v * beta2 + w2 * g * g
    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)
    vv = v
    if AMSGRAD:
        vv = max_nan(tl.load(vmax_ptr + o, mask=mask), v)
        tl.store(vmax_ptr + o, vv, mask=mask)
    p = _adamw_param(p, m, vv, wd_scale, step_size, bc2_sqrt, eps)
    # One rounding to the param dtype, round-to-nearest-even (Triton's default
    # fp32 -> bf16/fp16 cast, cvt.rn on NVIDIA; the CPU interpreter truncates bf16);
    # a no-op for fp32 params.
    tl.store(p_ptr, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.heuristics({
    "HAS_LR_T": lambda a: a["lr_ptr"] is not None,
    "AMSGRAD": lambda a: a["vmax_base"] is not None,
})
@triton.jit(do_not_specialize=["n_tensors"])
def _adamw_kernel(p_base, g_base, m_base, v_base, vmax_base, step_base, lr_ptr,
                  chunks, meta, n_tensors,
                  lr_hi, lr_lo, wd_hi, wd_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo,
                  w1, w2, eps,
                  HAS_LR_T: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                  LERP_FROM_END: tl.constexpr, ALIGNED: tl.constexpr, P_VEC: tl.constexpr,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on: offsets may exceed 2**31
    nt = n_tensors.to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), CHUNK)
    numel = tl.load(meta + NUMEL * nt + t)
    p_off = tl.load(meta + _P * nt + t)
    g_off = tl.load(meta + _G * nt + t)
    m_off = tl.load(meta + _M * nt + t)
    v_off = tl.load(meta + _V * nt + t)
    if ALIGNED:
        # Every tensor starts on 16 bytes (checked on the host): tell the compiler,
        # so full tiles use 16-byte accesses.
        p_off = tl.multiple_of(p_off, P_VEC)
        g_off = tl.multiple_of(g_off, P_VEC)
        m_off = tl.multiple_of(m_off, 4)
        v_off = tl.multiple_of(v_off, 4)
    p_ptr = p_base + p_off + start
    g_ptr = g_base + g_off + start
    m_ptr = m_base + m_off + start
    v_ptr = v_base + v_off + start
    vmax_ptr = vmax_base
    if AMSGRAD:
        vmax_off = tl.load(meta + _VMAX * nt + t)
        if ALIGNED:
            vmax_off = tl.multiple_of(vmax_off, 4)
        vmax_ptr = vmax_base + vmax_off + start

    # Per-tensor scalars, in fp64 like the reference, each rounded once to fp32.
    step = tl.load(step_base + tl.load(meta + _STEP * nt + t)).to(tl.float64)
    lr = load_lr(lr_ptr, lr_hi, lr_lo, HAS_LR_T)
    step_size = (lr / bias_correction(beta1_hi, beta1_lo, step)).to(tl.float32)
    bc2_sqrt = tl.sqrt(bias_correction(beta2_hi, beta2_lo, step)).to(tl.float32)
    wd_scale = (1.0 - lr * f64(wd_hi, wd_lo)).to(tl.float32)
    # Element-wise hyperparameters are fp32, as torch's fp32 tensor ops use them.
    w1 = tl.cast(w1, tl.float32)
    w2 = tl.cast(w2, tl.float32)
    beta2 = tl.cast(beta2_hi, tl.float32)
    eps = tl.cast(eps, tl.float32)

    offs = tl.arange(0, BLOCK)
    if start + CHUNK <= numel:
        for i in tl.range(0, CHUNK // BLOCK):
            o = i * BLOCK + offs
            _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, o, None, w1, beta2, w2, eps,
                        wd_scale, step_size, bc2_sqrt, AMSGRAD, MAXIMIZE, LERP_FROM_END)
    else:
        # The tensor's last chunk: masked tiles, only as many as it has.
        rem = numel - start
        for i in tl.range(0, tl.cdiv(rem, BLOCK).to(tl.int32)):  # <= TILES
            o = i * BLOCK + offs
            _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, o, o < rem, w1, beta2, w2, eps,
                        wd_scale, step_size, bc2_sqrt, AMSGRAD, MAXIMIZE, LERP_FROM_END)


# ----------------------------------------------------------------------------------
# Launcher.
# ----------------------------------------------------------------------------------
def _roles(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad):
    roles = [("params", params, True), ("grads", grads, True), ("exp_avgs", exp_avgs, True),
             ("exp_avg_sqs", exp_avg_sqs, True), ("steps", steps, False)]
    if amsgrad:
        roles.append(("max_exp_avg_sqs", max_exp_avg_sqs, True))
    return roles


def _launch_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp) -> None:
    device = params[0].device
    check_device(device, "adamw_")
    amsgrad = bool(hp.amsgrad)
    table = chunk_table(
        _roles(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad), CHUNK)
    if table is None:  # only empty tensors
        return
    b = table.base
    w1 = 1.0 - hp.beta1  # in double, like torch's python-side `1 - beta1`
    with device_guard(device):
        _adamw_kernel[(table.n_chunks,)](
            params[b], grads[b], exp_avgs[b], exp_avg_sqs[b],
            max_exp_avg_sqs[b] if amsgrad else None, steps[b], hp.lr_t,
            table.chunks, table.meta, table.n_tensors,
            *split_f64(hp.lr), *split_f64(hp.weight_decay), *split_f64(hp.beta1),
            *split_f64(hp.beta2), w1, 1.0 - hp.beta2, hp.eps,
            MAXIMIZE=bool(hp.maximize), LERP_FROM_END=abs(w1) >= 0.5,
            ALIGNED=table.aligned, P_VEC=16 // params[b].element_size(),
            BLOCK=BLOCK, CHUNK=CHUNK, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
           exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
           max_exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
           hp) -> None:
    """One AdamW step over all tensors, in place, in one launch.

    Inputs as validated by ``pyoptk.ops.adamw`` (contiguous, one device, params/grads
    fp32/bf16/fp16, states and steps fp32; ``steps[i]`` already holds this update's
    step). ``hp`` is an ``AdamWHyper``; ``hp.lr_t`` overrides ``hp.lr`` on device.
    ``max_exp_avg_sqs`` is used only when ``hp.amsgrad``.
    """
    if len(params) == 0:
        return
    _launch_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)
