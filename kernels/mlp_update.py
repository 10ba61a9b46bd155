"""Fused learned-MLP optimizer step (``mlp_update_``) in three Triton launches, no host
sync, no per-tensor Python loop.

The specification is ``pyoptk.ops.mlp_update.mlp_update_reference`` (see
docs/learned.md, "For kernel authors"). Every tensor is walked in 2-D tiles of
``[TR, TC]`` elements of its ``(rows, cols)`` view (2+ dim tensors: ``(prod(shape[:-1]),
shape[-1])``; 0/1-dim tensors: a virtual ``(cdiv(n, TC), TC)`` view of the flat data),
one program per tile, all tensors in one launch:

1. ``_mlp_stats_kernel`` (pass 1, reads p, g, m, v, u; writes only the workspace): per
   tile, the partial sums of the squares of the ``N = 2+K+R+K·R+R`` normalized feature
   planes (computed from the *new* accumulators in registers), the partial sums of the
   new full factored accumulators ``u_f`` (0/1-dim tensors), a non-finite flag of g, and
   for 2+ dim tensors the per-row sums of ``g²+fac_eps`` over the tile's columns and the
   per-column sums over the tile's rows (each row/column of a tile written once: no
   atomics, fixed reduction order, deterministic).
2. ``_mlp_finalize_kernel`` (one program per tensor, O(tiles + rows + cols)): reduces
   the partials in a fixed order, writes the new row/column accumulators ``r_f``,
   ``c_f`` (if the gradient is finite), and into the workspace the per-plane scales
   ``rsqrt(Σf²/n + norm_eps)``, ``vbar_f``, the first-layer bias with the time
   features folded in ``b0' = b0 + tanh(t/τ−1)·w0[time rows]``, the finite flag; and
   increments ``steps[i]`` (unless skipped; empty tensors always count the step).
3. ``_mlp_apply_kernel`` (pass 2): per tile, recomputes the features, builds the
   ``[TR·TC, D_PAD]`` feature tile in registers, runs the MLP with ``tl.dot``
   (``precision``: "tf32" by default on GPUs, i.e. tensor cores with fp32
   accumulation; "ieee" under the interpreter), then writes p (rounded once to its
   dtype), m, v and u. Tensors with a non-finite gradient write nothing.

Supported: parameters fp32/bf16/fp16 (state fp32), any K/R/F/timescales/fac_mom_index,
any (learned or fixed) decays tensor, exactly two hidden layers (weights = [w0, b0,
w1, b1, w2, b2]) of width <= 128 each, <= 128 per-element features. Anything else
raises ``NotImplementedError`` naming the unsupported field (see ``check_supported``)
before touching any tensor, so the op layer can fall back to the reference.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._math import load_lr
from ._multi_tensor import INTERPRETED, LRUCache, check_device, device_guard, split_f64

__all__ = ["mlp_update_", "check_supported", "default_precision", "PRECISIONS",
           "TILE_ROWS", "TILE_COLS"]

# Tile of one program: TILE_ROWS x TILE_COLS elements of the (rows, cols) view; the
# tile is the M dimension of pass 2's dots (64 = one Hopper wgmma M). Compiled for
# sm_90 (ptxas, no GPU run yet) with 4 warps the apply kernel spills at this size
# (~0.9 KB of stack per thread; ~6 KB at 8 x 32): the where-built feature tile. With
# DOT_WARPS it does not.
TILE_ROWS = 4
TILE_COLS = 16
NUM_WARPS = 4
# Warps of the two kernels that build a tile's feature matrix and run the MLP's dots on it
# (pass 2 here, the backward's per-tile kernel): two warpgroups spread the [64, DP] tile
# over 256 threads. ptxas for sm_90 (no GPU run yet): pass 2 spills 0 B per thread at 8
# warps against 1,304 B at 4, the backward's 3,500 B against 5,248 B, both at ~255
# registers and still on wgmma; warps per SM are the same (one 8-warp CTA or two 4-warp
# ones fit its register file).
DOT_WARPS = 8
# Partials / rows / columns reduced per loop iteration of the finalize kernel.
RBLOCK = 256
MAX_WIDTH = 128  # largest padded feature count / hidden width kept in registers

# "ieee": fp32 FMA dots (exact fp32, the interpreter's only mode). "tf32": tensor cores,
# fp32 inputs rounded to tf32 (10-bit mantissa), fp32 accumulation. "tf32x3": 3 tf32
# dots emulating fp32 (~fp32 accuracy, 3x the MMA work). "bf16": operands cast to
# bf16 (8-bit mantissa), fp32 accumulation.
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")

# Workspace-side layout of the per-tile partials: N plane sums, F sums of u_f, then the
# non-finite flag. Info-table rows (int64 [N_INFO, n_tensors]):
_NUMEL, _FIRST, _COUNT, _ROWS, _COLS, _FAC, _NCT, _NRT, _ROWP, _COLP = range(10)
_P, _G, _M, _V, _FR, _FC, _STEP = range(10, 17)
N_INFO = 17
I_NUMEL = tl.constexpr(_NUMEL)
I_FIRST = tl.constexpr(_FIRST)
I_COUNT = tl.constexpr(_COUNT)
I_ROWS = tl.constexpr(_ROWS)
I_COLS = tl.constexpr(_COLS)
I_FAC = tl.constexpr(_FAC)
I_NCT = tl.constexpr(_NCT)
I_NRT = tl.constexpr(_NRT)
I_ROWP = tl.constexpr(_ROWP)
I_COLP = tl.constexpr(_COLP)
I_P = tl.constexpr(_P)
I_G = tl.constexpr(_G)
I_M = tl.constexpr(_M)
I_V = tl.constexpr(_V)
I_FR = tl.constexpr(_FR)
I_FC = tl.constexpr(_FC)
I_STEP = tl.constexpr(_STEP)


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
@triton.jit
def _ema(acc, x, d):
    """``d·acc + (1−d)·x`` as the reference's ``ema`` (fp32, 1−d rounded first)."""
    return d * acc + (1.0 - d) * x


@triton.jit
def _tensor_tiles(info, nt, t):
    """Tensor ``t``'s numel, first tile, tile count, rows, cols and factored flag."""
    return (tl.load(info + I_NUMEL * nt + t), tl.load(info + I_FIRST * nt + t),
            tl.load(info + I_COUNT * nt + t), tl.load(info + I_ROWS * nt + t),
            tl.load(info + I_COLS * nt + t), tl.load(info + I_FAC * nt + t))


@triton.jit
def _state_ptrs(p_base, g_base, m_base, v_base, fr_base, info, nt, t):
    """Tensor ``t``'s parameter, gradient, moments and row-factor pointers."""
    return (p_base + tl.load(info + I_P * nt + t), g_base + tl.load(info + I_G * nt + t),
            m_base + tl.load(info + I_M * nt + t), v_base + tl.load(info + I_V * nt + t),
            fr_base + tl.load(info + I_FR * nt + t))


@triton.jit
def _tile_setup(tiles, info, nt, pid, TR: tl.constexpr, TC: tl.constexpr):
    """A program's tensor, its numel/rows/cols/factored flag, and the row, column and
    flat element index of each of its ``TR·TC`` lanes (1-D, row-major in the tile)."""
    t = tl.load(tiles + 2 * pid)
    local = tl.load(tiles + 2 * pid + 1)
    numel = tl.load(info + I_NUMEL * nt + t)
    rows = tl.load(info + I_ROWS * nt + t)
    cols = tl.load(info + I_COLS * nt + t)
    fac = tl.load(info + I_FAC * nt + t)
    n_ct = tl.load(info + I_NCT * nt + t)
    rt = local // n_ct
    ct = local - rt * n_ct
    e = tl.arange(0, TR * TC)
    r = rt * TR + e // TC
    c = ct * TC + e % TC
    idx = r * cols + c
    mask = (r < rows) & (c < cols) & (idx < numel)
    return t, numel, rows, cols, fac, rt, ct, r, c, idx, mask


# Counts that may be 1 (one tensor, one tile) are not specialized: Triton passes an int
# argument equal to 1 as a constexpr, on which ``.to(tl.int64)`` does not compile.
@triton.jit(do_not_specialize=["nt", "n_tiles"])
def _mlp_stats_kernel(p_base, g_base, m_base, v_base, fr_base, tiles, info, nt, n_tiles, ws,
                      decays, eps, fac_eps,
                      K: tl.constexpr, R: tl.constexpr, F: tl.constexpr, TR: tl.constexpr,
                      TC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets throughout
    nt = nt.to(tl.int64)
    nti = n_tiles.to(tl.int64)
    t, numel, rows, cols, fac, rt, ct, r, c, idx, mask = _tile_setup(tiles, info, nt, pid, TR, TC)
    p_ptr, g_ptr, m_ptr, v_ptr, fr_ptr = _state_ptrs(
        p_base, g_base, m_base, v_base, fr_base, info, nt, t)
    eps = tl.cast(eps, tl.float32)
    fac_eps = tl.cast(fac_eps, tl.float32)

    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    # Non-finite flag (NaN and ±inf fail |g| < inf); the sums below may then be NaN,
    # which is harmless: a flagged tensor writes nothing.
    bad = tl.max(tl.where(mask & ~(tl.abs(g) < float("inf")), 1.0, 0.0), axis=0)
    out = ws + pid
    NN: tl.constexpr = 2 + K + R + K * R + R
    tl.store(out + (NN + F) * nti, bad)
    # Masked lanes load 0 for every input, so their planes contribute 0 except 1/sqrt(v)
    # (and u, which has + fac_eps): those are masked explicitly.
    tl.store(out + 0 * nti, tl.sum(g * g, axis=0))
    tl.store(out + 1 * nti, tl.sum(p * p, axis=0))
    g2 = g * g
    for k in tl.static_range(K):
        m = _ema(tl.load(m_ptr + k * numel + idx, mask=mask, other=0.0), g, tl.load(decays + k))
        tl.store(out + (2 + k) * nti, tl.sum(m * m, axis=0))
        for j in tl.static_range(R):
            v = _ema(tl.load(v_ptr + j * numel + idx, mask=mask, other=0.0), g2,
                     tl.load(decays + K + j))
            q = m * tl.rsqrt(v + eps)
            tl.store(out + (2 + K + R + k * R + j) * nti, tl.sum(q * q, axis=0))
    for j in tl.static_range(R):
        v = _ema(tl.load(v_ptr + j * numel + idx, mask=mask, other=0.0), g2,
                 tl.load(decays + K + j))
        tl.store(out + (2 + K + j) * nti, tl.sum(v * v, axis=0))
        iv = tl.where(mask, tl.rsqrt(v + eps), 0.0)
        tl.store(out + (2 + K + R + K * R + j) * nti, tl.sum(iv * iv, axis=0))
    # g² + fac_eps, zero on masked lanes.
    q = tl.where(mask, g2 + fac_eps, 0.0)
    # (per-lane form of the scalar flag: the interpreter rejects block & scalar masks)
    umask = mask & ((idx * 0 + fac) == 0)
    for f in tl.static_range(F):
        # 0/1-dim tensors: the full accumulator u_f (fac_row holds (F, n)); 0 otherwise.
        u = _ema(tl.load(fr_ptr + f * numel + idx, mask=umask, other=0.0), q,
                 tl.load(decays + K + R + f))
        tl.store(out + (NN + f) * nti, tl.sum(tl.where(umask, u, 0.0), axis=0))
    if F > 0:
        # 2+ dim tensors: row sums over this tile's columns, column sums over its rows.
        rowp = ws + tl.load(info + I_ROWP * nt + t)
        colp = ws + tl.load(info + I_COLP * nt + t)
        q2 = tl.reshape(q, (TR, TC))
        rr = rt * TR + tl.arange(0, TR)
        cc = ct * TC + tl.arange(0, TC)
        tl.store(rowp + ct * rows + rr, tl.sum(q2, axis=1), mask=(rr < rows) & ((rr * 0 + fac) != 0))
        tl.store(colp + rt * cols + cc, tl.sum(q2, axis=0), mask=(cc < cols) & ((cc * 0 + fac) != 0))


@triton.jit
def _tanh64(x):
    """tanh in fp64 from exp (no interpreter-side libdevice tanh): 1 − 2/(e^{2x}+1);
    e^{2x} = inf gives 1, 0 gives −1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit(do_not_specialize=["nt", "n_tiles"])
def _mlp_finalize_kernel(fr_base, fc_base, step_base, tiles, info, nt, n_tiles, ws, fin_off,
                         decays, timescales, w0, b0, norm_eps,
                         K: tl.constexpr, R: tl.constexpr, F: tl.constexpr, T: tl.constexpr,
                         NE: tl.constexpr, H0: tl.constexpr, H0P: tl.constexpr,
                         NS_P: tl.constexpr, FP: tl.constexpr, TP: tl.constexpr,
                         FS: tl.constexpr, RBLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    nt = nt.to(tl.int64)
    nti = n_tiles.to(tl.int64)
    NN: tl.constexpr = 2 + K + R + K * R + R
    NS: tl.constexpr = NN + F + 1
    numel, first, count, rows, cols, fac = _tensor_tiles(info, nt, t)
    fin = ws + fin_off + t * FS

    # ---- per-tile partials, summed in a fixed order (deterministic) ----
    s = tl.arange(0, NS_P)
    sm = s < NS
    o = tl.arange(0, RBLOCK)
    acc = tl.zeros((NS_P, RBLOCK), tl.float32)
    for i in tl.range(0, tl.cdiv(count, RBLOCK)):
        oo = i * RBLOCK + o
        acc += tl.load(ws + s[:, None] * nti + first + oo[None, :],
                       mask=sm[:, None] & (oo < count)[None, :], other=0.0)
    tot = tl.sum(acc, axis=1)  # [NS_P]
    bad = tl.sum(tl.where(s == NN + F, tot, 0.0), axis=0)
    ok = (bad == 0.0) & (numel > 0)
    nf = tl.maximum(numel, 1).to(tl.float32)  # empty tensors: no 0/0 (unused anyway)
    norm_eps = tl.cast(norm_eps, tl.float32)
    # scale = rsqrt(mean(f²) + norm_eps), IEEE division / sqrt like torch.
    scale = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tot, nf) + norm_eps))
    tl.store(fin + s, scale, mask=s < NN)

    # ---- factored accumulators: new r_f (and vbar_f = mean r_f), new c_f ----
    fi = tl.arange(0, FP)
    fm = fi < F
    gam = tl.load(decays + K + R + fi, mask=fm, other=0.0)
    fr_ptr = fr_base + tl.load(info + I_FR * nt + t)
    fc_ptr = fc_base + tl.load(info + I_FC * nt + t)
    rowp = ws + tl.load(info + I_ROWP * nt + t)
    colp = ws + tl.load(info + I_COLP * nt + t)
    n_ct = tl.load(info + I_NCT * nt + t)
    n_rt = tl.load(info + I_NRT * nt + t)
    is_fac = (fac != 0) & (F > 0) & (numel > 0)
    rows_f = tl.maximum(rows, 1).to(tl.float32)
    cols_f = tl.maximum(cols, 1).to(tl.float32)
    vsum = tl.zeros((FP,), tl.float32)
    okv = (tl.zeros((RBLOCK,), tl.int32) + ok.to(tl.int32)) != 0  # per lane, for masks
    for i in tl.range(0, tl.where(is_fac, tl.cdiv(rows, RBLOCK), 0)):
        rr = i * RBLOCK + o
        rm = rr < rows
        acc_r = tl.zeros((RBLOCK,), tl.float32)
        for k in tl.range(0, n_ct):
            acc_r += tl.load(rowp + k * rows + rr, mask=rm, other=0.0)
        mean_c = tl.div_rn(acc_r, cols_f)  # mean over the columns of g² + fac_eps
        m2 = rm[:, None] & fm[None, :]
        sm2 = (rm & okv)[:, None] & fm[None, :]
        addr = fr_ptr + fi[None, :] * rows + rr[:, None]
        new = _ema(tl.load(addr, mask=m2, other=0.0), mean_c[:, None], gam[None, :])
        tl.store(addr, new, mask=sm2)
        vsum += tl.sum(tl.where(m2, new, 0.0), axis=0)
    for i in tl.range(0, tl.where(is_fac, tl.cdiv(cols, RBLOCK), 0)):
        cc = i * RBLOCK + o
        cm = cc < cols
        acc_c = tl.zeros((RBLOCK,), tl.float32)
        for k in tl.range(0, n_rt):
            acc_c += tl.load(colp + k * cols + cc, mask=cm, other=0.0)
        mean_r = tl.div_rn(acc_c, rows_f)
        m2 = cm[:, None] & fm[None, :]
        sm2 = (cm & okv)[:, None] & fm[None, :]
        addr = fc_ptr + fi[None, :] * cols + cc[:, None]
        new = _ema(tl.load(addr, mask=m2, other=0.0), mean_r[:, None], gam[None, :])
        tl.store(addr, new, mask=sm2)
    usum = tl.sum(tl.where(s[None, :] == NN + fi[:, None], tot[None, :], 0.0), axis=1)  # [FP]
    vbar = tl.where(is_fac, tl.div_rn(vsum, rows_f), tl.div_rn(usum, nf))
    tl.store(fin + NN + fi, vbar, mask=fm)

    # ---- time features folded into the first-layer bias ----
    step_ptr = step_base + tl.load(info + I_STEP * nt + t)
    step = tl.load(step_ptr)
    ti = tl.arange(0, TP)
    tm = ti < T
    tau = tl.load(timescales + ti, mask=tm, other=1.0)
    x = tl.div_rn(step + 1.0, tau) - 1.0  # t / τ − 1 in fp32, as the reference
    tf = tl.where(tm, _tanh64(x.to(tl.float64)).to(tl.float32), 0.0)
    hh = tl.arange(0, H0P)
    hm = hh < H0
    w = tl.load(w0 + (NE + ti[:, None]) * H0 + hh[None, :], mask=tm[:, None] & hm[None, :],
                other=0.0)
    b = tl.load(b0 + hh, mask=hm, other=0.0) + tl.sum(tf[:, None] * w, axis=0)
    tl.store(fin + NN + F + hh, b)
    tl.store(fin + FS - 1, tl.where(ok, 1.0, 0.0))
    # Steps: +1 unless skipped for a non-finite gradient; empty tensors always count.
    tl.store(step_ptr, step + tl.where(ok | (numel == 0), 1.0, 0.0))


@triton.jit
def _put(X, f, j: tl.constexpr, DP: tl.constexpr):
    """Column j of the [BLOCK, DP] feature tile := f."""
    return tl.where(tl.arange(0, DP)[None, :] == j, f[:, None], X)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32 x fp32 -> fp32 dot at the chosen input precision; accumulation is fp32 in
    every mode."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)


@triton.heuristics({"HAS_LR_T": lambda a: a["lr_ptr"] is not None})
@triton.jit(do_not_specialize=["nt"])
def _mlp_apply_kernel(p_base, g_base, m_base, v_base, fr_base, fc_base, lr_ptr, tiles, info,
                      nt, ws, fin_off, decays, w0, w1, b1, w2, b2,
                      lr_hi, lr_lo, step_mult, exp_mult, wd, eps, fac_eps, log_sign_k,
                      ls_thr, ls_scale,
                      K: tl.constexpr, R: tl.constexpr, F: tl.constexpr, FMI: tl.constexpr,
                      FMF: tl.constexpr, NE: tl.constexpr, DP: tl.constexpr, H0: tl.constexpr,
                      H0P: tl.constexpr, H1: tl.constexpr, H1P: tl.constexpr,
                      FS: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
                      PRECISION: tl.constexpr, HAS_LR_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nt = nt.to(tl.int64)
    BLOCK: tl.constexpr = TR * TC
    NN: tl.constexpr = 2 + K + R + K * R + R
    t, numel, rows, cols, fac, rt, ct, r, c, idx, mask = _tile_setup(tiles, info, nt, pid, TR, TC)
    fin = ws + fin_off + t * FS
    ok = (tl.load(fin + FS - 1) + idx * 0) != 0  # per lane (see the stats kernel)
    smask = mask & ok  # a tensor with a non-finite gradient writes nothing
    p_ptr, g_ptr, m_ptr, v_ptr, fr_ptr = _state_ptrs(
        p_base, g_base, m_base, v_base, fr_base, info, nt, t)
    fc_ptr = fc_base + tl.load(info + I_FC * nt + t)
    eps = tl.cast(eps, tl.float32)
    fac_eps = tl.cast(fac_eps, tl.float32)

    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g2 = g * g
    X = tl.zeros((BLOCK, DP), tl.float32)
    # ---- normalized features (scale_i from the finalize kernel) ----
    sg = tl.load(fin + 0)
    g_hat = g * sg
    X = _put(X, g_hat, 0, DP)
    X = _put(X, p * tl.load(fin + 1), 1, DP)
    m_fac = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(K):
        m = _ema(tl.load(m_ptr + k * numel + idx, mask=mask, other=0.0), g, tl.load(decays + k))
        tl.store(m_ptr + k * numel + idx, m, mask=smask)
        if k == FMI:
            m_fac = m
        X = _put(X, m * tl.load(fin + 2 + k), 2 + k, DP)
        for j in tl.static_range(R):
            v = _ema(tl.load(v_ptr + j * numel + idx, mask=mask, other=0.0), g2,
                     tl.load(decays + K + j))
            X = _put(X, m * tl.rsqrt(v + eps) * tl.load(fin + 2 + K + R + k * R + j),
                     2 + K + R + k * R + j, DP)
    for j in tl.static_range(R):
        v = _ema(tl.load(v_ptr + j * numel + idx, mask=mask, other=0.0), g2,
                 tl.load(decays + K + j))
        tl.store(v_ptr + j * numel + idx, v, mask=smask)
        X = _put(X, v * tl.load(fin + 2 + K + j), 2 + K + j, DP)
        X = _put(X, tl.rsqrt(v + eps) * tl.load(fin + 2 + K + R + K * R + j),
                 2 + K + R + K * R + j, DP)
    # ---- scale-free features ----
    # log-sign of the normalized gradient (thresholds rounded to fp32 as the reference's
    # tensor-scalar ops do).
    k_ls = tl.cast(log_sign_k, tl.float32)
    thr = tl.cast(ls_thr, tl.float32)
    a_g = tl.abs(g_hat)
    big = a_g >= thr
    ls_log = tl.where(big, tl.div_rn(tl.log(tl.maximum(a_g, thr)), k_ls), -1.0)
    sgn = tl.where(g_hat > 0, 1.0, tl.where(g_hat < 0, -1.0, 0.0))
    ls_sign = tl.where(big, sgn, g_hat * tl.cast(ls_scale, tl.float32))
    X = _put(X, ls_log, NN, DP)
    X = _put(X, ls_sign, NN + 1, DP)
    is_fac = (idx * 0 + fac) != 0
    # 2+ dim: fac_row holds r_f (F, rows) already updated by finalize; 0/1-dim: the full
    # old accumulator u_f (F, n), updated here.
    fr_len = tl.where(is_fac, rows, numel)
    fr_idx = tl.where(is_fac, r, idx)
    for f in tl.static_range(F):
        vbar = tl.load(fin + NN + f)
        a = tl.load(fr_ptr + f * fr_len + fr_idx, mask=mask, other=1.0)
        u = _ema(a, g2 + fac_eps, tl.load(decays + K + R + f))
        tl.store(fr_ptr + f * fr_len + fr_idx, u, mask=smask & ~is_fac)
        b = tl.load(fc_ptr + f * cols + c, mask=mask & is_fac, other=1.0)
        vhat = tl.where(is_fac, tl.div_rn(a * b, vbar), u)
        # rsqrt(r/vbar + 2^-7): the floor bounds the feature (see factor_feature in
        # csrc/include/pyoptk/mlp_update_math.h)
        rowf = tl.rsqrt(tl.div_rn(tl.where(is_fac, a, u), vbar) + 0.0078125)
        colf = tl.where(is_fac, tl.rsqrt(tl.div_rn(b, vbar) + 0.0078125), rowf)
        ivh = tl.rsqrt(vhat + eps)
        X = _put(X, g * ivh, NN + 2 + f, DP)
        if FMI >= 0:
            X = _put(X, m_fac * ivh, NN + 2 + F + f, DP)
        X = _put(X, rowf, NN + 2 + F + FMF + f, DP)  # FMF = F if FMI >= 0 else 0
        X = _put(X, colf, NN + 2 + 2 * F + FMF + f, DP)

    # ---- the MLP: two tensor-core dots (fp32 accumulation), fp32 output layer ----
    dd = tl.arange(0, DP)
    h0 = tl.arange(0, H0P)
    h1 = tl.arange(0, H1P)
    W0 = tl.load(w0 + dd[:, None] * H0 + h0[None, :], mask=(dd < NE)[:, None] & (h0 < H0)[None, :],
                 other=0.0)
    B0 = tl.load(fin + NN + F + h0)  # b0 with the time features folded in (0-padded)
    h = tl.maximum(_dot(X, W0, PRECISION) + B0[None, :], 0.0)
    W1 = tl.load(w1 + h0[:, None] * H1 + h1[None, :], mask=(h0 < H0)[:, None] & (h1 < H1)[None, :],
                 other=0.0)
    B1 = tl.load(b1 + h1, mask=h1 < H1, other=0.0)
    h = tl.maximum(_dot(h, W1, PRECISION) + B1[None, :], 0.0)
    # 2 outputs: too narrow for an MMA; fp32 FMAs + a row reduction.
    w2d = tl.load(w2 + h1 * 2, mask=h1 < H1, other=0.0)
    w2a = tl.load(w2 + h1 * 2 + 1, mask=h1 < H1, other=0.0)
    direction = tl.sum(h * w2d[None, :], axis=1) + tl.load(b2)
    magnitude = tl.sum(h * w2a[None, :], axis=1) + tl.load(b2 + 1)
    # Lanes past the end see v = 0 features (1/sqrt(eps) = 1e8): keep their exp finite.
    magnitude = tl.where(mask, magnitude, 0.0)

    # ---- the step: p − lr·β·(d·exp(α·a) + λ·p), rounded once to the param dtype ----
    lr32 = load_lr(lr_ptr, lr_hi, lr_lo, HAS_LR_T).to(tl.float32)
    coef = lr32 * tl.cast(step_mult, tl.float32)  # the reference's fp32 lr * step_mult
    upd = direction * tl.exp(tl.cast(exp_mult, tl.float32) * magnitude) \
        + tl.cast(wd, tl.float32) * p
    new_p = p - coef * upd
    tl.store(p_ptr + idx, new_p.to(p_ptr.dtype.element_ty), mask=smask)


# ----------------------------------------------------------------------------------
# Host side: the (cached) tile table.
# ----------------------------------------------------------------------------------
class _Table(NamedTuple):
    tiles: torch.Tensor  # int64 [n_tiles * 2]: (tensor, tile index in the tensor)
    info: torch.Tensor   # int64 [N_INFO * n_tensors]
    n_tensors: int
    n_tiles: int
    ws_numel: int        # fp32 workspace floats (partials, row/col partials, finalize)
    fin_off: int         # start of the finalize block in the workspace
    bases: Tuple[int, ...]  # base tensor index of each role


_tables = LRUCache()
_timescale_tensors = LRUCache()


def _build_table(roles, shapes, tr, tc, ns, fs, device) -> _Table:
    n = len(shapes)
    numels = [math.prod(s) for s in shapes]
    rows, cols, facs = [], [], []
    for s, k in zip(shapes, numels):
        if len(s) >= 2:
            rows.append(math.prod(s[:-1]))
            cols.append(s[-1])
            facs.append(1)
        else:  # virtual (cdiv(n, TC), TC) view of the flat data
            rows.append(-(-k // tc))
            cols.append(tc)
            facs.append(0)
    n_rt = [-(-r_ // tr) if k else 0 for r_, k in zip(rows, numels)]
    n_ct = [max(1, -(-c_ // tc)) for c_ in cols]
    counts = [a * b if k else 0 for a, b, k in zip(n_rt, n_ct, numels)]
    firsts, total = [], 0
    for cnt in counts:
        firsts.append(total)
        total += cnt
    # Workspace: [ns, n_tiles] partials, then per factored tensor [n_ct, rows] row
    # partials and [n_rt, cols] column partials, then [n, fs] finalize outputs.
    rowp, colp, off = [], [], ns * total
    for i in range(n):
        if facs[i] and numels[i]:
            rowp.append(off)
            off += n_ct[i] * rows[i]
            colp.append(off)
            off += n_rt[i] * cols[i]
        else:
            rowp.append(0)
            colp.append(0)
    fin_off = off
    ws_numel = off + n * fs
    # Element offsets of each role from its base tensor (the first with elements).
    bases, offset_rows = [], []
    for name, ts in roles:
        base = next((i for i, t in enumerate(ts) if t.numel() > 0), 0)
        bases.append(base)
        esize = ts[base].element_size()
        bp = ts[base].data_ptr()
        row = []
        for i, t in enumerate(ts):
            if t.numel() == 0:
                row.append(0)
                continue
            diff = t.data_ptr() - bp
            if diff % esize:
                raise ValueError(
                    f"pyoptk.kernels.mlp_update_: {name}[{i}] starts {diff} bytes from "
                    f"{name}[{base}], not a multiple of its element size {esize}")
            row.append(diff // esize)
        offset_rows.append(row)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    tidx = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts_t)
    local = torch.arange(total, dtype=torch.int64) - torch.tensor(firsts, dtype=torch.int64)[tidx]
    tiles = torch.stack([tidx, local], dim=1).reshape(-1)
    info = torch.tensor([numels, firsts, counts, rows, cols, facs, n_ct, n_rt, rowp, colp]
                        + offset_rows, dtype=torch.int64)
    data = torch.cat([tiles, info.reshape(-1)]).to(device)
    return _Table(tiles=data[: 2 * total], info=data[2 * total:], n_tensors=n, n_tiles=total,
                  ws_numel=ws_numel, fin_off=fin_off, bases=tuple(bases))


def _table(roles, tr, tc, ns, fs) -> _Table:
    shapes = tuple(tuple(t.shape) for t in roles[0][1])
    device = roles[0][1][0].device
    ptrs = tuple(tuple(t.data_ptr() for t in ts) for _, ts in roles)
    dtypes = tuple(ts[0].dtype for _, ts in roles)
    key = (device, shapes, dtypes, ptrs, tr, tc, ns, fs)
    return _tables.get(key, lambda: _build_table(roles, shapes, tr, tc, ns, fs, device))


def _timescales(ts: Tuple[float, ...], device) -> torch.Tensor:
    # fp32 like the reference's torch.tensor(hp.timescales, dtype=float32); at least one
    # element so the pointer is valid when T = 0.
    return _timescale_tensors.get(
        (ts, device), lambda: torch.tensor(ts or (1.0,), dtype=torch.float32).to(device))


def clear_cache() -> None:
    _tables.clear()
    _timescale_tensors.clear()


def _f32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:
        return math.copysign(float("inf"), x)


# ----------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------
def default_precision(device: torch.device) -> str:
    """"tf32" for compiled GPU kernels (tensor cores, fp32 accumulation), "ieee" under
    the interpreter / on CPU (where it is the only mode)."""
    return "ieee" if (INTERPRETED or device.type != "cuda") else "tf32"


def launch_options(op: str, device: torch.device, precision: Optional[str],
                   tile: Tuple[int, int]) -> Tuple[str, int, int]:
    """``(precision, tile_rows, tile_cols)`` of a call of ``op`` (this kernel or the
    backward that reuses it): ``precision`` defaulted and checked against
    ``PRECISIONS``, ``tile`` checked to be powers of two with rows·cols >= 16."""
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"pyoptk.kernels.{op}: precision must be one of {PRECISIONS}, "
                         f"got {precision!r}")
    tr, tc = int(tile[0]), int(tile[1])
    if tr != _pow2(tr) or tc != _pow2(tc) or tr * tc < 16:
        raise ValueError(f"pyoptk.kernels.{op}: tile must be powers of two with "
                         f"rows*cols >= 16, got {tile}")
    return precision, tr, tc


def check_supported(weights: Sequence[torch.Tensor], hp, dtype: Optional[torch.dtype] = None
                    ) -> None:
    """Raise ``NotImplementedError`` naming the field when this kernel cannot run the
    configuration (the op layer then falls back to the reference)."""
    if len(weights) != 6:
        raise NotImplementedError(
            f"pyoptk.kernels.mlp_update_: hidden_sizes must have exactly 2 layers for the "
            f"Triton kernel, got {len(weights) // 2 - 1} (weights has {len(weights)} tensors)")
    h0, h1 = weights[0].shape[1], weights[2].shape[1]
    for name, h in (("hidden_sizes[0]", h0), ("hidden_sizes[1]", h1)):
        if _pow2(h, 16) > MAX_WIDTH:
            raise NotImplementedError(f"pyoptk.kernels.mlp_update_: {name} = {h} > {MAX_WIDTH} "
                                      "is not supported by the Triton kernel")
    if _pow2(hp.n_element, 16) > MAX_WIDTH:
        raise NotImplementedError(
            f"pyoptk.kernels.mlp_update_: n_element (per-element features) = {hp.n_element} "
            f"> {MAX_WIDTH} is not supported by the Triton kernel")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise NotImplementedError(f"pyoptk.kernels.mlp_update_: param dtype {dtype} is not "
                                  "supported by the Triton kernel")
    for i, w in enumerate(weights):
        if w.dtype != torch.float32:
            raise NotImplementedError(f"pyoptk.kernels.mlp_update_: weights[{i}] dtype "
                                      f"{w.dtype} (need float32)")


def mlp_update_(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                moms: Sequence[torch.Tensor], rmss: Sequence[torch.Tensor],
                fac_rows: Sequence[torch.Tensor], fac_cols: Sequence[torch.Tensor],
                steps: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                decays: torch.Tensor, hp, *, precision: Optional[str] = None,
                tile: Tuple[int, int] = (TILE_ROWS, TILE_COLS)) -> None:
    """One learned-MLP step over all tensors, in place: three launches, no host sync.

    Inputs as validated by ``pyoptk.ops.mlp_update`` (contiguous, one device, params
    and grads fp32/bf16/fp16, states/steps/weights/decays fp32). ``steps[i]`` holds the
    updates applied so far and is incremented on device unless tensor i's gradient
    has a non-finite value (then nothing of tensor i is written). ``grads[i] is None``
    leaves tensor i untouched. ``precision`` of the MLP's dots: one of ``PRECISIONS``
    (default :func:`default_precision`). ``tile``: (rows, cols) of a program's tile,
    powers of two with rows·cols >= 16.
    """
    if len(params) == 0:
        return
    check_supported(weights, hp, params[0].dtype)
    device = params[0].device
    check_device(device, "mlp_update_")
    precision, tr, tc = launch_options("mlp_update_", device, precision, tile)
    if any(g is None for g in grads):
        keep = [i for i, g in enumerate(grads) if g is not None]
        if not keep:
            return
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        params, grads, moms, rmss, fac_rows, fac_cols, steps = map(
            pick, (params, grads, moms, rmss, fac_rows, fac_cols, steps))

    K, R, F = hp.n_mom, hp.n_rms, hp.n_fac
    NN = 2 + K + R + K * R + R
    NE = hp.n_element
    T = hp.n_time
    w0, b0, w1, b1, w2, b2 = weights
    H0, H1 = int(w0.shape[1]), int(w1.shape[1])
    H0P, H1P, DP = _pow2(H0, 16), _pow2(H1, 16), _pow2(NE, 16)
    NS = NN + F + 1
    FS = NN + F + H0P + 1  # finalize block per tensor: scales, vbar, b0', finite flag
    table = _table([("params", params), ("grads", grads), ("moms", moms), ("rmss", rmss),
                    ("fac_rows", fac_rows), ("fac_cols", fac_cols), ("steps", steps)],
                   tr, tc, NS, FS)
    if table.n_tiles == 0:  # only empty tensors: they only count the step
        torch._foreach_add_(list(steps), 1.0)
        return
    nt, nti = table.n_tensors, table.n_tiles
    bp, bg, bm, bv, bfr, bfc, bst = table.bases
    ws = torch.empty(table.ws_numel, dtype=torch.float32, device=device)
    ts = _timescales(tuple(hp.timescales), device)
    eps, fac_eps = float(hp.eps), float(hp.fac_eps)
    k_ls = float(hp.log_sign_k)
    with device_guard(device):
        _mlp_stats_kernel[(nti,)](
            params[bp], grads[bg], moms[bm], rmss[bv], fac_rows[bfr], table.tiles, table.info,
            nt, nti, ws, decays, eps, fac_eps, K=K, R=R, F=F, TR=tr, TC=tc,
            num_warps=NUM_WARPS)
        _mlp_finalize_kernel[(nt,)](
            fac_rows[bfr], fac_cols[bfc], steps[bst], table.tiles, table.info, nt, nti, ws,
            table.fin_off, decays, ts, w0, b0, float(hp.norm_eps), K=K, R=R, F=F, T=T, NE=NE,
            H0=H0, H0P=H0P, NS_P=_pow2(NS), FP=_pow2(F), TP=_pow2(T), FS=FS, RBLOCK=RBLOCK,
            num_warps=NUM_WARPS)
        _mlp_apply_kernel[(nti,)](
            params[bp], grads[bg], moms[bm], rmss[bv], fac_rows[bfr], fac_cols[bfc], hp.lr_t,
            table.tiles, table.info, nt, ws, table.fin_off, decays, w0, w1, b1, w2, b2,
            *split_f64(hp.lr), float(hp.step_mult), float(hp.exp_mult),
            float(hp.weight_decay), eps, fac_eps, k_ls, _f32(math.exp(-k_ls)),
            _f32(math.exp(k_ls)), K=K, R=R, F=F, FMI=int(hp.fac_mom_index),
            FMF=F if hp.fac_mom_index >= 0 else 0, NE=NE, DP=DP,
            H0=H0, H0P=H0P, H1=H1, H1P=H1P, FS=FS, TR=tr, TC=tc, PRECISION=precision,
            num_warps=DOT_WARPS)
