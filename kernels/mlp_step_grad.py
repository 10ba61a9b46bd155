"""Fused backward of the differentiable learned-MLP step (``torch.ops.pyoptk.mlp_step``)
in a few Triton launches over all tensors at once: no per-tensor Python loop, no host
sync, no stored activations (the forward is recomputed per tile), deterministic
reductions (per-tile or per-slot partials in a workspace, summed in a fixed order; no
atomics).

The specification is autograd through ``pyoptk.ops.mlp_update.mlp_update_one``; the
math is the native CPU backward's (``csrc/cpu/mlp_step_grad.cpp``, terms derived in
docs/learned.md), on the tiles of the Triton forward (``kernels/mlp_update.py``, whose
statistics and finalize kernels run unchanged as the first two launches). Notation,
per tensor of n elements: planes ``P_i`` (N = 2+K+R+K·R+R) with scales ``s_i``,
features ``x``, the MLP ``x → z0 → h0 → z1 → h1 → (d, a)``, output cotangents ``Gp,
Gm, Gv, Gfr, Gfc``. Launches:

1. ``_mlp_stats_kernel`` (the forward's source): per-tile sums of ``P_i²``, of the full
   factored accumulators, row / column sums of ``g² + fac_eps``, the non-finite flag.
2. ``_mlp_finalize_kernel`` (the forward's source) on *copies* of fac_rows, fac_cols and
   steps (it updates them in place; the inputs must stay untouched): scales, new
   ``r_f``, ``c_f``, ``vbar_f``, the first-layer bias with the time features folded in,
   the finite flag.
3. ``_bwd_tiles_kernel`` (B1), one program per *slot* of consecutive tiles: per tile the
   recomputed features and MLP, the backward through the MLP with ``tl.dot`` (weight
   gradients accumulated in registers over the slot's tiles, written once per slot), the
   local part of every input gradient (written to the outputs), and the partials of
   the reductions the rest needs: ``A_i = Σ ∂x_i·P_i`` (normalization), row / column sums
   of ``∂v̂·c``, ``∂row``, ``∂v̂·r``, ``∂col`` (factored statistics), ``Σ ∂u·…``
   (0/1-dim ``vbar``), decay and lr cotangents.
4. ``_bwd_finalize_kernel`` (one program per tensor): ``κ_i = −s_i³ A_i / n``, the row /
   column gradients ``∂r_f``, ``∂c_f`` (so ``∂fac_row``, ``∂fac_col`` and the factored
   decays), and the per-row / per-column coefficients ``Σ_f (1−γ_f) ∂r_f / cols`` that
   bring them back to ``g``.
5. ``_bwd_reduced_kernel`` (B2), one program per tile: the terms through the per-tensor
   reductions (``κ_i P_i`` through the planes and the momentum / RMS EMAs, ``2g·coef``
   of the factored statistics), added to the outputs.
6. ``_sum_rows_kernel`` twice: the slots' weight-gradient partials and the decay / lr
   partials, each summed in row order.

A tensor whose gradient has a NaN/Inf was skipped by the forward: its cotangents pass
straight through (identity for the parameter and its state, zero for its gradient) and
it contributes nothing to the weights, decays or lr. Supported: what the Triton forward
supports (``check_supported``); anything else raises ``NotImplementedError`` before any
launch.

Besides the launches: one ``torch.cat`` for the copies, the outputs' allocations and,
for bf16/fp16 params, the casts of the fp32 p / g gradients. Workspace (fp32): the
forward's (n/TC + n/TR floats for a matrix of n elements), the backward's row / column
partials (2F floats per (column tile, row) and per (row tile, column): 2F·n·(1/TC +
1/TR), F·n/2 with the default 8 × 8 tiles), O(N + F + K + R) floats per tile, and the
slots' weight gradients (≤ ``MAX_SLOTS`` × the rule's parameter count) — nothing of
size features × n. Compiled for sm_90 (ptxas only; never run on a GPU yet) the B1
kernel spills at the default rule (255 registers + ~1.1 KB of stack per thread; ~55 KB
with 128-wide layers): untuned.
"""

from __future__ import annotations

import math
import threading
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._math import load_lr
from ._multi_tensor import LRUCache, check_device, device_guard, split_f64
from .mlp_update import (
    I_COLP, I_COLS, I_FAC, I_FC, I_FR, I_NCT, I_NRT, I_NUMEL, I_ROWP, I_ROWS, I_STEP, N_INFO,
    DOT_WARPS, NUM_WARPS, RBLOCK, _build_table, _dot, _ema, _f32,
    _mlp_finalize_kernel, _mlp_stats_kernel, _pow2, _put, _state_ptrs, _tanh64, _tensor_tiles,
    _tile_setup, _timescales, launch_options)
from .mlp_update import check_supported as _check_forward_supported

__all__ = ["mlp_step_backward", "check_supported", "TILE_ROWS", "TILE_COLS", "MAX_SLOTS"]

# Tile of one program (the M dimension of the backward's dots, as the forward's). 8 x 8
# keeps the row and column partials of a matrix at n/8 floats each per quantity.
TILE_ROWS = 8
TILE_COLS = 8
# B1 programs: consecutive tiles share one program ("slot") and its weight-gradient
# accumulators. Fixed by the tile count alone, so the summation order (and the bits)
# do not depend on the device.
MAX_SLOTS = 256
# Columns of the final row sums per program.
SUM_COLS = 128
SUM_ROWS = 16

# Info rows after the forward's 17 (int64 [N_ROWS, n_tensors]): element offsets of the
# cotangent roles and of the gradient outputs (from each role's base tensor, as the
# forward's roles), of the fac_rows / fac_cols / steps copies in the copy buffer, and
# workspace offsets of the backward's row / column partials and coefficients.
_GP, _GM, _GV, _GFR, _GFC = range(N_INFO, N_INFO + 5)
_ODP, _ODG, _ODM, _ODV, _ODFR, _ODFC = range(N_INFO + 5, N_INFO + 11)
_FRC, _FCC, _STC = range(N_INFO + 11, N_INFO + 14)
_ROWQ, _COLQ, _COEFR, _COEFC = range(N_INFO + 14, N_INFO + 18)
N_ROWS = N_INFO + 18
I_GP = tl.constexpr(_GP)
I_GM = tl.constexpr(_GM)
I_GV = tl.constexpr(_GV)
I_GFR = tl.constexpr(_GFR)
I_GFC = tl.constexpr(_GFC)
I_ODP = tl.constexpr(_ODP)
I_ODG = tl.constexpr(_ODG)
I_ODM = tl.constexpr(_ODM)
I_ODV = tl.constexpr(_ODV)
I_ODFR = tl.constexpr(_ODFR)
I_ODFC = tl.constexpr(_ODFC)
I_FRC = tl.constexpr(_FRC)
I_FCC = tl.constexpr(_FCC)
I_ROWQ = tl.constexpr(_ROWQ)
I_COLQ = tl.constexpr(_COLQ)
I_COEFR = tl.constexpr(_COEFR)
I_COEFC = tl.constexpr(_COEFC)


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
# Counts that may be 1 (one tensor, one tile, one slot) are not specialized: Triton
# would pass an int argument equal to 1 as a constexpr, on which ``.to(tl.int64)``
# fails to compile (the forward's kernels, reused here, do the same).
_COUNTS = ["nt", "n_tiles", "n_slots", "n_rows", "n_cols"]


@triton.jit
def _cotangent_out_ptrs(dp_base, dg_base, dm_base, dv_base, dfr_base, info, nt, t):
    """Tensor ``t``'s output pointers for the cotangents of its param, grad, moments and
    row factors (the two per-tile kernels write them)."""
    return (dp_base + tl.load(info + I_ODP * nt + t), dg_base + tl.load(info + I_ODG * nt + t),
            dm_base + tl.load(info + I_ODM * nt + t), dv_base + tl.load(info + I_ODV * nt + t),
            dfr_base + tl.load(info + I_ODFR * nt + t))


@triton.jit
def _col(X, j: tl.constexpr, DP: tl.constexpr):
    """Column j of a [BLOCK, DP] tile (the inverse of the forward's ``_put``)."""
    return tl.sum(tl.where(tl.arange(0, DP)[None, :] == j, X, 0.0), axis=1)


@triton.jit
def _scalar(fin, i, okf, dead):
    """A per-tensor finalize value; ``dead`` for skipped tensors (whose statistics may
    be NaN: nothing of them may reach a sum)."""
    return tl.where(okf != 0, tl.load(fin + i), dead)


@triton.jit
def _rsqrt_vjp(y, dy):
    """y = rsqrt(x): dx = dy · (−y³/2)."""
    return dy * (-0.5 * y * y * y)


@triton.jit
def _moment(ptr, i, numel, idx, mask, x, decays, d_off):
    """Plane i of an accumulator (momenta: ``x`` = g, ``d_off`` = 0; second moments:
    ``x`` = g², ``d_off`` = K) for a lane block: (old, new = its EMA toward x, decay)."""
    old = tl.load(ptr + i * numel + idx, mask=mask, other=0.0)
    d = tl.load(decays + d_off + i)
    return old, _ema(old, x, d), d


@triton.jit
def _factored_inputs(fr_ptr, frc_ptr, fcc_ptr, numel, rows, cols, r, c, idx, vm, is_fac, g2,
                     vbar, gam, eps, fac_eps, f: tl.constexpr):
    """The forward's factored quantities of one lane block for decay f (as the apply
    kernel): the row accumulator ``a`` (2+ dims: the new r_f[row]; 0/1 dims: the new full
    accumulator u_f), the column accumulator ``b`` (2+ dims), the old u_f (0/1 dims),
    ``rowf``, ``colf`` and ``ivh = rsqrt(v̂ + eps)``."""
    a_fac = tl.load(frc_ptr + f * rows + r, mask=vm & is_fac, other=1.0)
    u0 = tl.load(fr_ptr + f * numel + idx, mask=vm & ~is_fac, other=1.0)
    u = _ema(u0, g2 + fac_eps, gam)
    a = tl.where(is_fac, a_fac, u)
    b = tl.load(fcc_ptr + f * cols + c, mask=vm & is_fac, other=1.0)
    vhat = tl.where(is_fac, tl.div_rn(a * b, vbar), u)
    rowf = tl.rsqrt(tl.div_rn(a, vbar) + 0.0078125)
    colf = tl.where(is_fac, tl.rsqrt(tl.div_rn(b, vbar) + 0.0078125), rowf)
    ivh = tl.rsqrt(vhat + eps)
    return a, b, u0, rowf, colf, ivh


@triton.heuristics({"HAS_LR_T": lambda a: a["lr_ptr"] is not None})
@triton.jit(do_not_specialize=_COUNTS[:3])
def _bwd_tiles_kernel(p_base, g_base, m_base, v_base, fr_base, step_base, gp_base, gm_base,
                      gv_base, gfr_base, cp, dp_base, dg_base, dm_base, dv_base,
                      dfr_base, lr_ptr, tiles, info, nt, n_tiles, n_slots,
                      ws, fin_off, q1_off, dec_off, slot_off, decays, timescales,
                      w0, w1, b1, w2, b2, lr_hi, lr_lo, step_mult, exp_mult, wd, eps, fac_eps,
                      log_sign_k, ls_thr, ls_scale,
                      K: tl.constexpr, R: tl.constexpr, F: tl.constexpr, FMI: tl.constexpr,
                      FMF: tl.constexpr, NE: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
                      DP: tl.constexpr, H0: tl.constexpr, H0P: tl.constexpr, H1: tl.constexpr,
                      H1P: tl.constexpr, FS: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
                      PRECISION: tl.constexpr, HAS_LR_T: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    nt = nt.to(tl.int64)
    nti = n_tiles.to(tl.int64)
    BLOCK: tl.constexpr = TR * TC
    NN: tl.constexpr = 2 + K + R + K * R + R
    KRF: tl.constexpr = K + R + F
    Q2: tl.constexpr = 2 * F
    eps = tl.cast(eps, tl.float32)
    fac_eps = tl.cast(fac_eps, tl.float32)
    lr32 = load_lr(lr_ptr, lr_hi, lr_lo, HAS_LR_T).to(tl.float32)
    sm32 = tl.cast(step_mult, tl.float32)
    coef = lr32 * sm32  # the reference's fp32 lr * step_mult
    am32 = tl.cast(exp_mult, tl.float32)
    wd32 = tl.cast(wd, tl.float32)
    k_ls = tl.cast(log_sign_k, tl.float32)
    thr = tl.cast(ls_thr, tl.float32)
    ek = tl.cast(ls_scale, tl.float32)
    dd_ = tl.arange(0, DP)
    h0 = tl.arange(0, H0P)
    h1 = tl.arange(0, H1P)
    ti = tl.arange(0, TP)
    tm = ti < T
    tau = tl.load(timescales + ti, mask=tm, other=1.0)
    # Weight-gradient accumulators of the slot (fp32), over all its tiles.
    dW0 = tl.zeros((DP, H0P), tl.float32)
    dW0t = tl.zeros((TP, H0P), tl.float32)  # the time rows of w0
    db0 = tl.zeros((H0P,), tl.float32)
    dW1 = tl.zeros((H0P, H1P), tl.float32)
    db1 = tl.zeros((H1P,), tl.float32)
    dW2d = tl.zeros((H1P,), tl.float32)
    dW2a = tl.zeros((H1P,), tl.float32)
    db2d = tl.sum(tl.zeros((H1P,), tl.float32), axis=0)
    db2a = tl.sum(tl.zeros((H1P,), tl.float32), axis=0)
    t_begin = slot * nti // n_slots
    t_end = (slot + 1) * nti // n_slots
    for pid in tl.range(t_begin, t_end):
        t, numel, rows, cols, fac, rt, ct, r, c, idx, mask = _tile_setup(tiles, info, nt, pid,
                                                                         TR, TC)
        fin = ws + fin_off + t * FS
        okf = tl.load(fin + FS - 1)
        ok = (okf + idx * 0) != 0  # per lane (the interpreter rejects block & scalar masks)
        vm = mask & ok  # lanes whose math runs; a skipped tensor passes cotangents through
        is_fac = (idx * 0 + fac) != 0
        p_ptr, g_ptr, m_ptr, v_ptr, fr_ptr = _state_ptrs(
            p_base, g_base, m_base, v_base, fr_base, info, nt, t)
        gp_ptr = gp_base + tl.load(info + I_GP * nt + t)
        gm_ptr = gm_base + tl.load(info + I_GM * nt + t)
        gv_ptr = gv_base + tl.load(info + I_GV * nt + t)
        gfr_ptr = gfr_base + tl.load(info + I_GFR * nt + t)
        frc_ptr = cp + tl.load(info + I_FRC * nt + t)
        fcc_ptr = cp + tl.load(info + I_FCC * nt + t)
        dp_ptr, dg_ptr, dm_ptr, dv_ptr, dfr_ptr = _cotangent_out_ptrs(
            dp_base, dg_base, dm_base, dv_base, dfr_base, info, nt, t)
        rowq = ws + tl.load(info + I_ROWQ * nt + t)
        colq = ws + tl.load(info + I_COLQ * nt + t)
        q1 = ws + q1_off + pid
        decr = ws + dec_off + pid * (KRF + 1)

        # ---- the recomputed forward (the apply kernel's features; zero where unused) ----
        g = tl.load(g_ptr + idx, mask=vm, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        gp = tl.load(gp_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g2 = g * g
        X = tl.zeros((BLOCK, DP), tl.float32)
        g_hat = g * _scalar(fin, 0, okf, 0.0)
        X = _put(X, g_hat, 0, DP)
        X = _put(X, p * _scalar(fin, 1, okf, 0.0), 1, DP)
        m_fac = tl.zeros((BLOCK,), tl.float32)
        for k in tl.static_range(K):
            _, m, _ = _moment(m_ptr, k, numel, idx, mask, g, decays, 0)
            if k == FMI:
                m_fac = m
            X = _put(X, m * _scalar(fin, 2 + k, okf, 0.0), 2 + k, DP)
            for j in tl.static_range(R):
                _, v, _ = _moment(v_ptr, j, numel, idx, mask, g2, decays, K)
                X = _put(X, m * tl.rsqrt(v + eps) * _scalar(fin, 2 + K + R + k * R + j, okf, 0.0),
                         2 + K + R + k * R + j, DP)
        for j in tl.static_range(R):
            _, v, _ = _moment(v_ptr, j, numel, idx, mask, g2, decays, K)
            X = _put(X, v * _scalar(fin, 2 + K + j, okf, 0.0), 2 + K + j, DP)
            X = _put(X, tl.rsqrt(v + eps) * _scalar(fin, 2 + K + R + K * R + j, okf, 0.0),
                     2 + K + R + K * R + j, DP)
        a_g = tl.abs(g_hat)
        big = a_g >= thr
        ls_log = tl.where(big, tl.div_rn(tl.log(tl.maximum(a_g, thr)), k_ls), -1.0)
        sgn = tl.where(g_hat > 0, 1.0, tl.where(g_hat < 0, -1.0, 0.0))
        X = _put(X, ls_log, NN, DP)
        X = _put(X, tl.where(big, sgn, g_hat * ek), NN + 1, DP)
        for f in tl.static_range(F):
            a, b, u0, rowf, colf, ivh = _factored_inputs(
                fr_ptr, frc_ptr, fcc_ptr, numel, rows, cols, r, c, idx, vm, is_fac, g2,
                _scalar(fin, NN + f, okf, 1.0), tl.load(decays + K + R + f), eps, fac_eps, f)
            X = _put(X, g * ivh, NN + 2 + f, DP)
            if FMI >= 0:
                X = _put(X, m_fac * ivh, NN + 2 + F + f, DP)
            X = _put(X, rowf, NN + 2 + F + FMF + f, DP)
            X = _put(X, colf, NN + 2 + 2 * F + FMF + f, DP)
        X = tl.where(vm[:, None], X, 0.0)  # padding lanes / skipped tensors: zero features

        # ---- the MLP and the step's cotangents on (d, a) ----
        W0 = tl.load(w0 + dd_[:, None] * H0 + h0[None, :],
                     mask=(dd_ < NE)[:, None] & (h0 < H0)[None, :], other=0.0)
        B0 = tl.load(fin + NN + F + h0)  # b0 with the time features folded in (0-padded)
        a0 = tl.maximum(_dot(X, W0, PRECISION) + B0[None, :], 0.0)
        W1 = tl.load(w1 + h0[:, None] * H1 + h1[None, :],
                     mask=(h0 < H0)[:, None] & (h1 < H1)[None, :], other=0.0)
        B1 = tl.load(b1 + h1, mask=h1 < H1, other=0.0)
        a1 = tl.maximum(_dot(a0, W1, PRECISION) + B1[None, :], 0.0)
        w2d = tl.load(w2 + h1 * 2, mask=h1 < H1, other=0.0)
        w2a = tl.load(w2 + h1 * 2 + 1, mask=h1 < H1, other=0.0)
        direction = tl.sum(a1 * w2d[None, :], axis=1) + tl.load(b2)
        magnitude = tl.where(vm, tl.sum(a1 * w2a[None, :], axis=1) + tl.load(b2 + 1), 0.0)
        ex = tl.exp(am32 * magnitude)
        gpv = tl.where(vm, gp, 0.0)
        dd = -coef * gpv * ex
        da = -coef * gpv * direction * am32 * ex
        tl.store(decr + KRF, tl.sum(tl.where(vm, -sm32 * gpv * (direction * ex + wd32 * p), 0.0),
                                    axis=0))

        # ---- backward through the MLP: weight gradients and the features' cotangents ----
        dW2d += tl.sum(a1 * dd[:, None], axis=0)
        dW2a += tl.sum(a1 * da[:, None], axis=0)
        db2d += tl.sum(dd, axis=0)
        db2a += tl.sum(da, axis=0)
        dz1 = tl.where(a1 > 0, dd[:, None] * w2d[None, :] + da[:, None] * w2a[None, :], 0.0)
        dW1 += _dot(tl.trans(a0), dz1, PRECISION)
        db1 += tl.sum(dz1, axis=0)
        dz0 = tl.where(a0 > 0, _dot(dz1, tl.trans(W1), PRECISION), 0.0)
        dW0 += _dot(tl.trans(X), dz0, PRECISION)
        sz0 = tl.sum(dz0, axis=0)
        db0 += sz0
        # time features tanh(t/τ − 1) as the forward's finalize (they are w0's last rows)
        step = tl.load(step_base + tl.load(info + I_STEP * nt + t))
        tf = tl.where(tm, _tanh64((tl.div_rn(step + 1.0, tau) - 1.0).to(tl.float64)).to(tl.float32),
                      0.0)
        dW0t += tf[:, None] * sz0[None, :]
        dX = _dot(dz0, tl.trans(W0), PRECISION)

        # ---- factored features: local terms, row / column and vbar partials ----
        dg = tl.zeros((BLOCK,), tl.float32)
        dmf = tl.zeros((BLOCK,), tl.float32)  # onto m[FMI] through fac_m
        fq = vm & is_fac
        uq = vm & ~is_fac
        rr = rt * TR + tl.arange(0, TR)
        cc = ct * TC + tl.arange(0, TC)
        rmask = (rr < rows) & ((rr * 0 + fac) != 0)
        cmask = (cc < cols) & ((cc * 0 + fac) != 0)
        for f in tl.static_range(F):
            vbar = _scalar(fin, NN + f, okf, 1.0)
            gam = tl.load(decays + K + R + f)
            a, b, u0, rowf, colf, ivh = _factored_inputs(
                fr_ptr, frc_ptr, fcc_ptr, numel, rows, cols, r, c, idx, vm, is_fac, g2, vbar,
                gam, eps, fac_eps, f)
            dfg = _col(dX, NN + 2 + f, DP)
            drow = _col(dX, NN + 2 + F + FMF + f, DP)
            dcol = _col(dX, NN + 2 + 2 * F + FMF + f, DP)
            divh = dfg * g
            dg += dfg * ivh
            if FMI >= 0:
                dfm = _col(dX, NN + 2 + F + f, DP)
                divh += dfm * m_fac
                dmf += dfm * ivh
            dvh = _rsqrt_vjp(ivh, divh)
            # 2+ dims: v̂ = r·c/vbar, rowf(r/vbar), colf(c/vbar); summed per row over the
            # tile's columns and per column over its rows (each (column tile, row) and
            # (row tile, column) slot has one writer: no atomics).
            q_rc = tl.reshape(tl.where(fq, dvh * b, 0.0), (TR, TC))
            tl.store(rowq + (ct * Q2 + 2 * f) * rows + rr, tl.sum(q_rc, axis=1), mask=rmask)
            q_rc = tl.reshape(tl.where(fq, drow, 0.0), (TR, TC))
            tl.store(rowq + (ct * Q2 + 2 * f + 1) * rows + rr, tl.sum(q_rc, axis=1), mask=rmask)
            q_rc = tl.reshape(tl.where(fq, dvh * a, 0.0), (TR, TC))
            tl.store(colq + (rt * Q2 + 2 * f) * cols + cc, tl.sum(q_rc, axis=0), mask=cmask)
            q_rc = tl.reshape(tl.where(fq, dcol, 0.0), (TR, TC))
            tl.store(colq + (rt * Q2 + 2 * f + 1) * cols + cc, tl.sum(q_rc, axis=0), mask=cmask)
            # 0/1 dims: v̂ = u and rowf = colf = rsqrt(u/vbar + φ): everything onto u
            rf3 = rowf * rowf * rowf
            dsum = drow + dcol
            gfr = tl.load(gfr_ptr + f * numel + idx, mask=mask & ~is_fac, other=0.0)
            du = dvh + dsum * (-0.5 * rf3 / vbar) + gfr
            tl.store(q1 + (NN + f) * nti,
                     tl.sum(tl.where(uq, dsum * (0.5 * rf3 * a / (vbar * vbar)), 0.0), axis=0))
            tl.store(dfr_ptr + f * numel + idx, tl.where(ok, gam * du, gfr), mask=mask & ~is_fac)
            dg += tl.where(uq, 2.0 * g * ((1.0 - gam) * du), 0.0)
            tl.store(decr + K + R + f,
                     tl.sum(tl.where(uq, du * (u0 - (g2 + fac_eps)), 0.0), axis=0))

        # ---- normalized planes: local terms (s_i ∂x_i) and A_i = Σ ∂x_i P_i ----
        dn = _col(dX, 0, DP)
        # log-sign of ĝ: 1/(k ĝ) on the log part where |ĝ| >= e^-k, e^k on the linear part
        dn += tl.where(big, _col(dX, NN, DP) / (k_ls * tl.where(big, g_hat, 1.0)),
                       _col(dX, NN + 1, DP) * ek)
        tl.store(q1, tl.sum(tl.where(vm, dn * g, 0.0), axis=0))
        dg += _scalar(fin, 0, okf, 0.0) * dn
        dn = _col(dX, 1, DP)
        tl.store(q1 + nti, tl.sum(tl.where(vm, dn * p, 0.0), axis=0))
        dp = gp - gp * (coef * wd32) + _scalar(fin, 1, okf, 0.0) * dn
        for k in tl.static_range(K):
            m0, m, bk = _moment(m_ptr, k, numel, idx, mask, g, decays, 0)
            dn = _col(dX, 2 + k, DP)
            tl.store(q1 + (2 + k) * nti, tl.sum(tl.where(vm, dn * m, 0.0), axis=0))
            gm = tl.load(gm_ptr + k * numel + idx, mask=mask, other=0.0)
            dm = gm + _scalar(fin, 2 + k, okf, 0.0) * dn
            if k == FMI:
                dm += dmf
            for j in tl.static_range(R):
                _, v, _ = _moment(v_ptr, j, numel, idx, mask, g2, decays, K)
                isv = tl.rsqrt(v + eps)
                o = 2 + K + R + k * R + j
                dn = _col(dX, o, DP)
                tl.store(q1 + o * nti, tl.sum(tl.where(vm, dn * (m * isv), 0.0), axis=0))
                dm += _scalar(fin, o, okf, 0.0) * dn * isv
            tl.store(dm_ptr + k * numel + idx, tl.where(ok, bk * dm, gm), mask=mask)
            dg += (1.0 - bk) * dm
            tl.store(decr + k, tl.sum(tl.where(vm, dm * (m0 - g), 0.0), axis=0))
        for j in tl.static_range(R):
            v0, v, rho = _moment(v_ptr, j, numel, idx, mask, g2, decays, K)
            isv = tl.rsqrt(v + eps)
            dn = _col(dX, 2 + K + j, DP)
            tl.store(q1 + (2 + K + j) * nti, tl.sum(tl.where(vm, dn * v, 0.0), axis=0))
            o_i = 2 + K + R + K * R + j
            dni = _col(dX, o_i, DP)
            tl.store(q1 + o_i * nti, tl.sum(tl.where(vm, dni * isv, 0.0), axis=0))
            disv = _scalar(fin, o_i, okf, 0.0) * dni
            for k in tl.static_range(K):
                _, m, _ = _moment(m_ptr, k, numel, idx, mask, g, decays, 0)
                o = 2 + K + R + k * R + j
                disv += _scalar(fin, o, okf, 0.0) * _col(dX, o, DP) * m
            gv = tl.load(gv_ptr + j * numel + idx, mask=mask, other=0.0)
            dv = gv + _scalar(fin, 2 + K + j, okf, 0.0) * dn + _rsqrt_vjp(isv, disv)
            tl.store(dv_ptr + j * numel + idx, tl.where(ok, rho * dv, gv), mask=mask)
            dg += 2.0 * g * ((1.0 - rho) * dv)
            tl.store(decr + K + j, tl.sum(tl.where(vm, dv * (v0 - g2), 0.0), axis=0))
        tl.store(dg_ptr + idx, tl.where(ok, dg, 0.0), mask=mask)
        tl.store(dp_ptr + idx, tl.where(ok, dp, gp), mask=mask)

    # ---- the slot's weight gradients: [w0 (rows < NE, then the time rows), b0, w1, b1,
    # w2, b2] flattened in order ----
    D: tl.constexpr = NE + T
    o_b0: tl.constexpr = D * H0
    o_w1: tl.constexpr = o_b0 + H0
    o_b1: tl.constexpr = o_w1 + H0 * H1
    o_w2: tl.constexpr = o_b1 + H1
    o_b2: tl.constexpr = o_w2 + 2 * H1
    N_W: tl.constexpr = o_b2 + 2
    dst = ws + slot_off + slot * N_W
    hm0 = (h0 < H0)[None, :]
    tl.store(dst + dd_[:, None] * H0 + h0[None, :], dW0, mask=(dd_ < NE)[:, None] & hm0)
    tl.store(dst + (NE + ti[:, None]) * H0 + h0[None, :], dW0t, mask=tm[:, None] & hm0)
    tl.store(dst + o_b0 + h0, db0, mask=h0 < H0)
    tl.store(dst + o_w1 + h0[:, None] * H1 + h1[None, :], dW1,
             mask=(h0 < H0)[:, None] & (h1 < H1)[None, :])
    tl.store(dst + o_b1 + h1, db1, mask=h1 < H1)
    tl.store(dst + o_w2 + h1 * 2, dW2d, mask=h1 < H1)
    tl.store(dst + o_w2 + h1 * 2 + 1, dW2a, mask=h1 < H1)
    tl.store(dst + o_b2, db2d)
    tl.store(dst + o_b2 + 1, db2a)


@triton.jit
def _line_sums(q, n_parts, lines, ll, fi, m2, Q2: tl.constexpr, QO: tl.constexpr,
               RB: tl.constexpr, FP: tl.constexpr):
    """Σ over the ``n_parts`` partial slots of quantity ``2f + QO`` of lines ``ll`` (rows or
    columns), slot order: ``q`` is [n_parts, Q2, lines]."""
    acc = tl.zeros((RB, FP), tl.float32)
    for k in tl.range(0, n_parts):
        acc += tl.load(q + (k * Q2 + 2 * fi[None, :] + QO) * lines + ll[:, None], mask=m2,
                       other=0.0)
    return acc


@triton.jit
def _g2_means(part, n_parts, lines, ll, lm, other_f):
    """The forward's mean of g² + fac_eps per line (its finalize's sum, same order)."""
    acc = tl.zeros(ll.shape, tl.float32)
    for k in tl.range(0, n_parts):
        acc += tl.load(part + k * lines + ll, mask=lm, other=0.0)
    return tl.div_rn(acc, other_f)


@triton.jit
def _line_grads(i, q, n_parts, lines, new, ct, old, d_old, coefs, g2_part, other_f, vb, gam,
                dvbar_line, fi, m2_cols, RB: tl.constexpr, FP: tl.constexpr, Q2: tl.constexpr):
    """Block i of the lines (rows, or columns) of a factored tensor, decay f across:
    ``∂x = Gx + S1/vbar − f³/2·S2/vbar + dvbar_line`` (x the new accumulator, f its
    factor feature, S1 / S2 the line sums of B1), written as ``∂old = γ∂x``; the line's
    coefficient ``Σ_f (1−γ_f) ∂x / other`` (other: the line length the mean of g² +
    fac_eps ran over) for B2. Returns the block's ``Σ ∂x·(old − mean(g² + fac_eps))``
    per decay (the factored decays' cotangent)."""
    ll = i * RB + tl.arange(0, RB)
    lm = ll < lines
    m2 = lm[:, None] & m2_cols[None, :]
    s1 = _line_sums(q, n_parts, lines, ll, fi, m2, Q2, 0, RB, FP)
    s2 = _line_sums(q, n_parts, lines, ll, fi, m2, Q2, 1, RB, FP)
    addr = fi[None, :] * lines + ll[:, None]
    xf = tl.rsqrt(tl.div_rn(tl.load(new + addr, mask=m2, other=1.0), vb[None, :]) + 0.0078125)
    dx = tl.load(ct + addr, mask=m2, other=0.0) + s1 / vb[None, :] \
        - 0.5 * xf * xf * xf * s2 / vb[None, :] + dvbar_line[None, :]
    tl.store(d_old + addr, gam[None, :] * dx, mask=m2)
    mean = _g2_means(g2_part, n_parts, lines, ll, lm, other_f)
    tl.store(coefs + ll, tl.sum(tl.where(m2, (1.0 - gam)[None, :] * dx / other_f, 0.0), axis=1),
             mask=lm)
    return tl.sum(tl.where(m2, dx * (tl.load(old + addr, mask=m2, other=0.0) - mean[:, None]),
                           0.0), axis=0)


@triton.jit(do_not_specialize=_COUNTS[:2])
def _bwd_finalize_kernel(fr_base, fc_base, gfr_base, gfc_base, cp, dfr_base, dfc_base, info,
                         nt, n_tiles, ws, fin_off, q1_off, dec_off, fin2_off, decays,
                         K: tl.constexpr, R: tl.constexpr, F: tl.constexpr, FS: tl.constexpr,
                         NQ_P: tl.constexpr, FP: tl.constexpr, KRF_P: tl.constexpr,
                         RB: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    nt = nt.to(tl.int64)
    nti = n_tiles.to(tl.int64)
    NN: tl.constexpr = 2 + K + R + K * R + R
    NQ1: tl.constexpr = NN + F
    KR: tl.constexpr = K + R
    KRF: tl.constexpr = K + R + F
    Q2: tl.constexpr = 2 * F
    numel, first, count, rows, cols, fac = _tensor_tiles(info, nt, t)
    fin = ws + fin_off + t * FS
    ok = tl.load(fin + FS - 1) != 0  # finite and not empty
    nf = tl.maximum(numel, 1).to(tl.float32)

    # ---- κ_i = −s_i³ A_i / n and the 0/1-dim vbar term Σ(...)/n, tiles summed in order ----
    s = tl.arange(0, NQ_P)
    o = tl.arange(0, RB)
    acc = tl.zeros((NQ_P, RB), tl.float32)
    for i in tl.range(0, tl.cdiv(count, RB)):
        oo = i * RB + o
        acc += tl.load(ws + q1_off + s[:, None] * nti + first + oo[None, :],
                       mask=(s < NQ1)[:, None] & (oo < count)[None, :], other=0.0)
    tot = tl.sum(acc, axis=1)
    sc = tl.load(fin + s, mask=s < NN, other=0.0)
    val = tl.where(s < NN, -(sc * sc * sc) * tot / nf, tot / nf)
    tl.store(ws + fin2_off + t * NQ1 + s, tl.where(ok, val, 0.0), mask=s < NQ1)

    # ---- factored statistics: ∂r_f, ∂c_f, ∂vbar_f ----
    fi = tl.arange(0, FP)
    fm = fi < F
    gam = tl.load(decays + KR + fi, mask=fm, other=0.0)
    vb = tl.load(fin + NN + fi, mask=fm & ((fi * 0 + ok.to(tl.int32)) != 0), other=1.0)
    fr0 = fr_base + tl.load(info + I_FR * nt + t)
    fc0 = fc_base + tl.load(info + I_FC * nt + t)
    gfr = gfr_base + tl.load(info + I_GFR * nt + t)
    gfc = gfc_base + tl.load(info + I_GFC * nt + t)
    frc = cp + tl.load(info + I_FRC * nt + t)
    fcc = cp + tl.load(info + I_FCC * nt + t)
    dfr = dfr_base + tl.load(info + I_ODFR * nt + t)
    dfc = dfc_base + tl.load(info + I_ODFC * nt + t)
    rowq = ws + tl.load(info + I_ROWQ * nt + t)
    colq = ws + tl.load(info + I_COLQ * nt + t)
    rowp = ws + tl.load(info + I_ROWP * nt + t)
    colp = ws + tl.load(info + I_COLP * nt + t)
    coef_r = ws + tl.load(info + I_COEFR * nt + t)
    coef_c = ws + tl.load(info + I_COEFC * nt + t)
    n_ct = tl.load(info + I_NCT * nt + t)
    n_rt = tl.load(info + I_NRT * nt + t)
    run = (fac != 0) & ok & (F > 0)
    passthrough = (fac != 0) & ~ok & (F > 0)  # skipped or empty: identity
    rows_f = tl.maximum(rows, 1).to(tl.float32)
    cols_f = tl.maximum(cols, 1).to(tl.float32)
    n_rb = tl.cdiv(rows, RB)
    n_cb = tl.cdiv(cols, RB)
    # sweep 1: ∂vbar = Σ_r (−SR1 + SR2·rf³/2)·r/vbar² + Σ_c SC2·cf³/2·c/vbar²
    dvbar = tl.zeros((FP,), tl.float32)
    for i in tl.range(0, tl.where(run, n_rb, 0)):
        rr = i * RB + o
        m2 = (rr < rows)[:, None] & fm[None, :]
        sr1 = _line_sums(rowq, n_ct, rows, rr, fi, m2, Q2, 0, RB, FP)
        sr2 = _line_sums(rowq, n_ct, rows, rr, fi, m2, Q2, 1, RB, FP)
        rv = tl.load(frc + fi[None, :] * rows + rr[:, None], mask=m2, other=1.0)
        rf = tl.rsqrt(tl.div_rn(rv, vb[None, :]) + 0.0078125)
        dvbar += tl.sum(tl.where(m2, (sr2 * 0.5 * rf * rf * rf - sr1) * rv
                                 / (vb * vb)[None, :], 0.0), axis=0)
    for i in tl.range(0, tl.where(run, n_cb, 0)):
        cc = i * RB + o
        m2 = (cc < cols)[:, None] & fm[None, :]
        sc2 = _line_sums(colq, n_rt, cols, cc, fi, m2, Q2, 1, RB, FP)
        cv = tl.load(fcc + fi[None, :] * cols + cc[:, None], mask=m2, other=1.0)
        cf = tl.rsqrt(tl.div_rn(cv, vb[None, :]) + 0.0078125)
        dvbar += tl.sum(tl.where(m2, sc2 * 0.5 * cf * cf * cf * cv / (vb * vb)[None, :], 0.0),
                        axis=0)
    # sweep 2: the row and column gradients (the vbar term goes to the rows only)
    dgam = tl.zeros((FP,), tl.float32)
    for i in tl.range(0, tl.where(run, n_rb, 0)):
        dgam += _line_grads(i, rowq, n_ct, rows, frc, gfr, fr0, dfr, coef_r, rowp, cols_f, vb,
                            gam, dvbar / rows_f, fi, m2_cols=fm, RB=RB, FP=FP, Q2=Q2)
    for i in tl.range(0, tl.where(run, n_cb, 0)):
        dgam += _line_grads(i, colq, n_rt, cols, fcc, gfc, fc0, dfc, coef_c, colp, rows_f, vb,
                            gam, dvbar * 0.0, fi, m2_cols=fm, RB=RB, FP=FP, Q2=Q2)
    # skipped / empty matrices: the row and column cotangents pass through
    for i in tl.range(0, tl.where(passthrough, n_rb, 0)):
        rr = i * RB + o
        m2 = (rr < rows)[:, None] & fm[None, :]
        addr = fi[None, :] * rows + rr[:, None]
        tl.store(dfr + addr, tl.load(gfr + addr, mask=m2, other=0.0), mask=m2)
    for i in tl.range(0, tl.where(passthrough, n_cb, 0)):
        cc = i * RB + o
        m2 = (cc < cols)[:, None] & fm[None, :]
        addr = fi[None, :] * cols + cc[:, None]
        tl.store(dfc + addr, tl.load(gfc + addr, mask=m2, other=0.0), mask=m2)
    # this tensor's row of the decay / lr partials (factored decays only)
    kk = tl.arange(0, KRF_P)
    row = tl.sum(tl.where(kk[:, None] == KR + fi[None, :], dgam[None, :], 0.0), axis=1)
    tl.store(ws + dec_off + (nti + t) * (KRF + 1) + kk, row, mask=kk < KRF + 1)


@triton.jit(do_not_specialize=_COUNTS[:2])
def _bwd_reduced_kernel(p_base, g_base, m_base, v_base, fr_base, dp_base, dg_base, dm_base,
                        dv_base, dfr_base, tiles, info, nt, n_tiles, ws,
                        fin_off, dec_off, fin2_off, decays, eps, fac_eps,
                        K: tl.constexpr, R: tl.constexpr, F: tl.constexpr, FS: tl.constexpr,
                        TR: tl.constexpr, TC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nt = nt.to(tl.int64)
    nti = n_tiles.to(tl.int64)
    NN: tl.constexpr = 2 + K + R + K * R + R
    NQ1: tl.constexpr = NN + F
    KRF: tl.constexpr = K + R + F
    t, numel, rows, cols, fac, rt, ct, r, c, idx, mask = _tile_setup(tiles, info, nt, pid, TR, TC)
    okf = tl.load(ws + fin_off + t * FS + FS - 1)
    vm = mask & ((okf + idx * 0) != 0)
    is_fac = (idx * 0 + fac) != 0
    kap = ws + fin2_off + t * NQ1  # κ_i (N), then the 0/1-dim vbar terms (F)
    p_ptr, g_ptr, m_ptr, v_ptr, fr_ptr = _state_ptrs(
        p_base, g_base, m_base, v_base, fr_base, info, nt, t)
    dp_ptr, dg_ptr, dm_ptr, dv_ptr, dfr_ptr = _cotangent_out_ptrs(
        dp_base, dg_base, dm_base, dv_base, dfr_base, info, nt, t)
    decr = ws + dec_off + (nti + nt + pid) * (KRF + 1)
    eps = tl.cast(eps, tl.float32)
    fac_eps = tl.cast(fac_eps, tl.float32)

    g = tl.load(g_ptr + idx, mask=vm, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + idx, mask=vm, other=0.0).to(tl.float32)
    g2 = g * g
    # ∂P_i = κ_i P_i, through the planes and the EMAs as in B1 (no output cotangents)
    dg = tl.load(kap) * g
    tl.store(dp_ptr + idx, tl.load(dp_ptr + idx, mask=vm, other=0.0) + tl.load(kap + 1) * p,
             mask=vm)
    for k in tl.static_range(K):
        m0, m, bk = _moment(m_ptr, k, numel, idx, mask, g, decays, 0)
        dm = tl.load(kap + 2 + k) * m
        for j in tl.static_range(R):
            _, v, _ = _moment(v_ptr, j, numel, idx, mask, g2, decays, K)
            isv = tl.rsqrt(v + eps)
            dm += tl.load(kap + 2 + K + R + k * R + j) * (m * isv) * isv
        tl.store(dm_ptr + k * numel + idx,
                 tl.load(dm_ptr + k * numel + idx, mask=vm, other=0.0) + bk * dm, mask=vm)
        dg += (1.0 - bk) * dm
        tl.store(decr + k, tl.sum(tl.where(vm, dm * (m0 - g), 0.0), axis=0))
    for j in tl.static_range(R):
        v0, v, rho = _moment(v_ptr, j, numel, idx, mask, g2, decays, K)
        isv = tl.rsqrt(v + eps)
        disv = tl.load(kap + 2 + K + R + K * R + j) * isv
        for k in tl.static_range(K):
            _, m, _ = _moment(m_ptr, k, numel, idx, mask, g, decays, 0)
            disv += tl.load(kap + 2 + K + R + k * R + j) * (m * isv) * m
        dv = tl.load(kap + 2 + K + j) * v + _rsqrt_vjp(isv, disv)
        tl.store(dv_ptr + j * numel + idx,
                 tl.load(dv_ptr + j * numel + idx, mask=vm, other=0.0) + rho * dv, mask=vm)
        dg += 2.0 * g * ((1.0 - rho) * dv)
        tl.store(decr + K + j, tl.sum(tl.where(vm, dv * (v0 - g2), 0.0), axis=0))
    # factored statistics: g² + fac_eps feeds the row / column means (2+ dims) or u (0/1)
    if F > 0:
        fq = vm & is_fac
        coef = tl.load(ws + tl.load(info + I_COEFR * nt + t) + r, mask=fq, other=0.0) \
            + tl.load(ws + tl.load(info + I_COEFC * nt + t) + c, mask=fq, other=0.0)
        dg += 2.0 * g * coef
    uq = vm & ~is_fac
    for f in tl.static_range(F):
        gam = tl.load(decays + K + R + f)
        cu = tl.load(kap + NN + f)
        u0 = tl.load(fr_ptr + f * numel + idx, mask=uq, other=0.0)
        tl.store(dfr_ptr + f * numel + idx,
                 tl.load(dfr_ptr + f * numel + idx, mask=uq, other=0.0) + gam * cu, mask=uq)
        dg += tl.where(uq, 2.0 * g * ((1.0 - gam) * cu), 0.0)
        tl.store(decr + K + R + f, tl.sum(tl.where(uq, cu * (u0 - (g2 + fac_eps)), 0.0), axis=0))
    tl.store(decr + KRF, 0.0)
    tl.store(dg_ptr + idx, tl.load(dg_ptr + idx, mask=vm, other=0.0) + dg, mask=vm)


@triton.jit(do_not_specialize=_COUNTS[3:])
def _sum_rows_kernel(src, n_rows, n_cols, dst, RB: tl.constexpr, CB: tl.constexpr):
    """``dst[c] = Σ_r src[r, c]`` over a row-major [n_rows, n_cols] block, rows in a fixed
    order (blocks of RB, then the block's tree)."""
    pid = tl.program_id(0).to(tl.int64)
    n_cols = n_cols.to(tl.int64)
    cc = pid * CB + tl.arange(0, CB)
    cm = cc < n_cols
    rr = tl.arange(0, RB)
    acc = tl.zeros((RB, CB), tl.float32)
    for i in tl.range(0, tl.cdiv(n_rows, RB)):
        r = (i * RB + rr).to(tl.int64)
        acc += tl.load(src + r[:, None] * n_cols + cc[None, :],
                       mask=(r < n_rows)[:, None] & cm[None, :], other=0.0)
    tl.store(dst + cc, tl.sum(acc, axis=0), mask=cm)


# ----------------------------------------------------------------------------------
# Host side: the (cached) table and workspace layout.
# ----------------------------------------------------------------------------------
def check_supported(weights: Sequence[torch.Tensor], hp, dtype: Optional[torch.dtype] = None
                    ) -> None:
    """The Triton forward's envelope (``kernels.mlp_update.check_supported``: two hidden
    layers <= 128 wide, <= 128 per-element features, fp32/bf16/fp16 params, fp32
    weights): ``NotImplementedError`` naming the field otherwise."""
    try:
        _check_forward_supported(weights, hp, dtype)
    except NotImplementedError as exc:
        raise NotImplementedError(str(exc).replace("mlp_update_", "mlp_step_backward")) from None


class _Table(NamedTuple):
    tiles: torch.Tensor     # int64 [n_tiles * 2], as the forward's
    info: torch.Tensor      # int64 [N_ROWS * n_tensors]
    info_fin: torch.Tensor  # info with fac_rows / fac_cols / steps pointing into the copies
    n_tensors: int
    n_tiles: int
    n_slots: int
    fin_off: int            # workspace offsets (fp32 elements) of each region
    q1_off: int
    dec_off: int
    fin2_off: int
    slot_off: int
    ws_numel: int
    bases: Tuple[int, ...]  # base tensor index of each pointer role


_tables = LRUCache()
_zeros: dict = {}
_lock = threading.Lock()  # guards _zeros


def _prefix(sizes: Sequence[int]) -> List[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def _build(roles, shapes, dims, tr, tc, device) -> _Table:
    """The forward's tile table over ``roles`` (the pointer roles), extended with the
    copy offsets and the backward's workspace regions (see the module docstring)."""
    K, R, F, NS, FS, NQ1, n_w = dims
    base = _build_table(roles, shapes, tr, tc, NS, FS, torch.device("cpu"))
    nt, nti = base.n_tensors, base.n_tiles
    info = base.info.view(-1, nt)
    numels, rows, cols, facs, n_ct, n_rt = (info[k].tolist() for k in (
        I_NUMEL.value, I_ROWS.value, I_COLS.value, I_FAC.value, I_NCT.value, I_NRT.value))
    fr_n = [t.numel() for t in roles[4][1]]
    fc_n = [t.numel() for t in roles[5][1]]
    frc = _prefix(fr_n)
    fcc = [sum(fr_n) + o for o in _prefix(fc_n)]
    stc = [sum(fr_n) + sum(fc_n) + i for i in range(nt)]
    n_slots = min(nti, MAX_SLOTS)
    off = base.ws_numel
    q1_off = off
    off += NQ1 * nti
    dec_off = off
    off += (2 * nti + nt) * (K + R + F + 1)
    rowq, colq, coef_r, coef_c = [], [], [], []
    for i in range(nt):
        if facs[i] and numels[i] and F:
            rowq.append(off)
            off += 2 * F * n_ct[i] * rows[i]
            colq.append(off)
            off += 2 * F * n_rt[i] * cols[i]
            coef_r.append(off)
            off += rows[i]
            coef_c.append(off)
            off += cols[i]
        else:  # never addressed
            rowq.append(0)
            colq.append(0)
            coef_r.append(0)
            coef_c.append(0)
    fin2_off = off
    off += nt * NQ1
    slot_off = off
    off += n_slots * n_w
    extra = torch.tensor([frc, fcc, stc, rowq, colq, coef_r, coef_c], dtype=torch.int64)
    full = torch.cat([info, extra])
    fin = full.clone()
    fin[I_FR.value] = full[_FRC]
    fin[I_FC.value] = full[_FCC]
    fin[I_STEP.value] = full[_STC]
    data = torch.cat([base.tiles, full.reshape(-1), fin.reshape(-1)]).to(device)
    n_info = N_ROWS * nt
    return _Table(tiles=data[: 2 * nti], info=data[2 * nti: 2 * nti + n_info],
                  info_fin=data[2 * nti + n_info:], n_tensors=nt, n_tiles=nti, n_slots=n_slots,
                  fin_off=base.fin_off, q1_off=q1_off, dec_off=dec_off, fin2_off=fin2_off,
                  slot_off=slot_off, ws_numel=max(off, 1), bases=base.bases)


def _table(roles, dims, tr, tc) -> _Table:
    shapes = tuple(tuple(t.shape) for t in roles[0][1])
    device = roles[0][1][0].device
    ptrs = tuple(tuple(t.data_ptr() for t in ts) for _, ts in roles)
    dtypes = tuple(ts[0].dtype for _, ts in roles)
    key = (device, shapes, dtypes, ptrs, dims, tr, tc, MAX_SLOTS)
    return _tables.get(key, lambda: _build(roles, shapes, dims, tr, tc, device))


def _zero_like(t: torch.Tensor) -> torch.Tensor:
    """A read-only zero cotangent shaped like ``t``: a view of one cached buffer per
    (device, dtype), so that missing cotangents keep the table's cache key stable."""
    key = (t.device, t.dtype)
    with _lock:
        buf = _zeros.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = torch.zeros(max(t.numel(), 1024), dtype=t.dtype, device=t.device)
            _zeros[key] = buf
    return buf[: t.numel()].view(t.shape)


def clear_cache() -> None:
    _tables.clear()
    with _lock:
        _zeros.clear()


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def mlp_step_backward(inputs: Sequence[Sequence[torch.Tensor]],
                      cotangents: Sequence[Sequence[Optional[torch.Tensor]]],
                      weights: Sequence[torch.Tensor], decays: torch.Tensor, hp, *,
                      precision: Optional[str] = None,
                      tile: Tuple[int, int] = (TILE_ROWS, TILE_COLS)):
    """Input gradients of one ``mlp_step`` from its output cotangents, recomputing the
    forward: seven launches over all tensors, no host sync (beyond building the cached
    table on its first use).

    ``inputs``: the step's seven lists (params, grads, moms, rmss, fac_rows, fac_cols,
    steps), validated by ``pyoptk.ops.mlp_step`` (contiguous, one device, params/grads
    fp32/bf16/fp16, the rest fp32, ``None``-free). ``cotangents``: five lists (params,
    moms, rmss, fac_rows, fac_cols), same shapes as those outputs; an entry may be None
    (a zero cotangent). ``weights`` = [w0, b0, w1, b1, w2, b2] fp32 contiguous (in, out),
    ``decays`` fp32 (K+R+F,), ``hp`` the step's ``MLPUpdateHyper``. ``precision`` of the
    MLP's dots: one of ``PRECISIONS`` (default :func:`default_precision`); ``tile``:
    (rows, cols) of a program's tile, powers of two with rows·cols >= 16.

    Returns ``(d_inputs, d_weights, d_decays, d_lr)``: ``d_inputs`` six lists (params
    and grads in the param dtype, the state fp32), ``d_weights`` a list like
    ``weights``, ``d_decays`` (K+R+F,), ``d_lr`` shaped like ``hp.lr_t`` (None without
    it). Raises ``NotImplementedError`` (nothing launched) for what the Triton forward
    does not support.
    """
    params, grads, moms, rmss, fac_rows, fac_cols, steps = (list(x) for x in inputs)
    check_supported(weights, hp, params[0].dtype if params else None)
    if not params:
        return ([],) * 6, [torch.zeros_like(w) for w in weights], torch.zeros_like(decays), \
            None if hp.lr_t is None else torch.zeros_like(hp.lr_t)
    device = params[0].device
    check_device(device, "mlp_step_backward")
    precision, tr, tc = launch_options("mlp_step_backward", device, precision, tile)
    pdtype = params[0].dtype
    # Cotangents: None -> a cached zero view; the param's in its dtype, the state's fp32.
    cts = []
    for lst, refs, dtype in zip(cotangents, (params, moms, rmss, fac_rows, fac_cols),
                                (pdtype,) + (torch.float32,) * 4):
        cts.append([_zero_like(ref) if c is None else c.to(dtype).contiguous()
                    for c, ref in zip(lst, refs)])
    f32 = dict(dtype=torch.float32)
    outs = [[torch.empty(t.shape, device=device, **f32) for t in lst]
            for lst in (params, grads, moms, rmss, fac_rows, fac_cols)]

    K, R, F = hp.n_mom, hp.n_rms, hp.n_fac
    NN = 2 + K + R + K * R + R
    NE, T = hp.n_element, hp.n_time
    w0, b0, w1, b1, w2, b2 = [w.contiguous() for w in weights]
    H0, H1 = int(w0.shape[1]), int(w1.shape[1])
    H0P, H1P, DP = _pow2(H0, 16), _pow2(H1, 16), _pow2(NE, 16)
    NS = NN + F + 1
    FS = NN + F + H0P + 1  # the forward's finalize block: scales, vbar, b0', finite flag
    NQ1 = NN + F
    n_w = sum(w.numel() for w in weights)
    dims = (K, R, F, NS, FS, NQ1, n_w)
    names = ("params", "grads", "moms", "rmss", "fac_rows", "fac_cols", "steps", "d_params",
             "d_moms", "d_rmss", "d_fac_rows", "d_fac_cols", "o_params", "o_grads", "o_moms",
             "o_rmss", "o_fac_rows", "o_fac_cols")
    lists = (params, grads, moms, rmss, fac_rows, fac_cols, steps, *cts, *outs)
    table = _table(list(zip(names, lists)), dims, tr, tc)
    nt, nti = table.n_tensors, table.n_tiles
    bp, bg, bm, bv, bfr, bfc, bst, cgp, cgm, cgv, cgfr, cgfc, op, og, om, ov, ofr, ofc = \
        table.bases
    ws = torch.empty(table.ws_numel, device=device, **f32)
    # The forward's finalize updates fac_rows / fac_cols / steps in place: on copies.
    cp = torch.cat([t.reshape(-1) for t in (*fac_rows, *fac_cols, *steps)])
    d_w = torch.empty(n_w, device=device, **f32)
    d_dec = torch.empty(K + R + F + 1, device=device, **f32)  # decays, then lr
    ts = _timescales(tuple(hp.timescales), device)
    decays = decays.contiguous()
    eps, fac_eps, k_ls = float(hp.eps), float(hp.fac_eps), float(hp.log_sign_k)
    consts = dict(K=K, R=R, F=F, num_warps=NUM_WARPS)
    tile_consts = {**consts, "num_warps": DOT_WARPS}
    with device_guard(device):
        if nti:
            _mlp_stats_kernel[(nti,)](
                params[bp], grads[bg], moms[bm], rmss[bv], fac_rows[bfr], table.tiles,
                table.info, nt, nti, ws, decays, eps, fac_eps, TR=tr, TC=tc, **consts)
        _mlp_finalize_kernel[(nt,)](
            cp, cp, cp, table.tiles, table.info_fin, nt, nti, ws, table.fin_off, decays, ts,
            w0, b0, float(hp.norm_eps), T=T, NE=NE, H0=H0, H0P=H0P, NS_P=_pow2(NS),
            FP=_pow2(F), TP=_pow2(T), FS=FS, RBLOCK=RBLOCK, **consts)
        if nti:
            _bwd_tiles_kernel[(table.n_slots,)](
                params[bp], grads[bg], moms[bm], rmss[bv], fac_rows[bfr], steps[bst],
                cts[0][cgp], cts[1][cgm], cts[2][cgv], cts[3][cgfr], cp, outs[0][op],
                outs[1][og], outs[2][om], outs[3][ov], outs[4][ofr], hp.lr_t, table.tiles,
                table.info, nt, nti, table.n_slots, ws, table.fin_off, table.q1_off,
                table.dec_off, table.slot_off, decays, ts, w0, w1, b1, w2, b2,
                *split_f64(hp.lr), float(hp.step_mult), float(hp.exp_mult),
                float(hp.weight_decay), eps, fac_eps, k_ls, _f32(math.exp(-k_ls)),
                _f32(math.exp(k_ls)), FMI=int(hp.fac_mom_index),
                FMF=F if hp.fac_mom_index >= 0 else 0, NE=NE, T=T, TP=_pow2(T), DP=DP,
                H0=H0, H0P=H0P, H1=H1, H1P=H1P, FS=FS, TR=tr, TC=tc, PRECISION=precision,
                **tile_consts)
        _bwd_finalize_kernel[(nt,)](
            fac_rows[bfr], fac_cols[bfc], cts[3][cgfr], cts[4][cgfc], cp, outs[4][ofr],
            outs[5][ofc], table.info, nt, nti, ws, table.fin_off, table.q1_off, table.dec_off,
            table.fin2_off, decays, FS=FS, NQ_P=_pow2(NQ1), FP=_pow2(F),
            KRF_P=_pow2(K + R + F + 1), RB=RBLOCK, **consts)
        if nti:
            _bwd_reduced_kernel[(nti,)](
                params[bp], grads[bg], moms[bm], rmss[bv], fac_rows[bfr], outs[0][op],
                outs[1][og], outs[2][om], outs[3][ov], outs[4][ofr], table.tiles, table.info,
                nt, nti, ws, table.fin_off, table.dec_off, table.fin2_off, decays, eps,
                fac_eps, FS=FS, TR=tr, TC=tc, **consts)
        _sum_rows_kernel[(triton.cdiv(n_w, SUM_COLS),)](
            ws[table.slot_off:], table.n_slots, n_w, d_w, RB=SUM_ROWS, CB=SUM_COLS,
            num_warps=NUM_WARPS)
        _sum_rows_kernel[(triton.cdiv(K + R + F + 1, SUM_COLS),)](
            ws[table.dec_off:], 2 * nti + nt, K + R + F + 1, d_dec, RB=SUM_ROWS, CB=SUM_COLS,
            num_warps=NUM_WARPS)
    if pdtype != torch.float32:
        outs[0] = [o.to(pdtype) for o in outs[0]]
        outs[1] = [o.to(pdtype) for o in outs[1]]
    # Separate tensors (a custom op's outputs may not alias each other); a few KB.
    d_weights = [x.view(w.shape).clone()
                 for x, w in zip(torch.split(d_w, [w.numel() for w in weights]), weights)]
    d_lr = None
    if hp.lr_t is not None:
        d_lr = d_dec[K + R + F].reshape(hp.lr_t.shape).to(hp.lr_t.dtype, copy=True)
    return tuple(outs), d_weights, d_dec[:K + R + F].clone(), d_lr
