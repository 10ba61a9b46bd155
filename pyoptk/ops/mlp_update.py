"""Fused learned-MLP optimizer step: ``torch.ops.pyoptk.mlp_update_``.

Layout (as every op file): reference → backend launchers → op registration → public
function. The reference here is the specification of the per-parameter MLP rule of
:mod:`pyoptk.learned.mlp` (in the spirit of learned_optimization's ``small_fc_lopt`` /
``AdafacMLPLOpt``, Metz et al. https://arxiv.org/abs/2009.11243). For one tensor
``p`` (``n`` elements) with gradient ``g``, everything in fp32 (fp64 for fp64 tensors):

.. math::
    m_k &\\leftarrow \\beta_k m_k + (1-\\beta_k) g \\quad (k < K) \\\\
    v_j &\\leftarrow \\rho_j v_j + (1-\\rho_j) g^2 \\quad (j < R) \\\\
    r_f &\\leftarrow \\gamma_f r_f + (1-\\gamma_f)\\,\\mathrm{mean}_{c}(g^2+\\epsilon_f),\\;
    c_f \\leftarrow \\gamma_f c_f + (1-\\gamma_f)\\,\\mathrm{mean}_{r}(g^2+\\epsilon_f),\\;
    \\hat v_f = r_f c_f / \\mathrm{mean}(r_f) \\\\
    x &= [\\,\\text{normalized features},\\ \\text{scale-free features},\\ \\text{time}\\,]
    \\in \\mathbb{R}^{D} \\\\
    (d, a) &= \\mathrm{MLP}(x) \\\\
    p &\\leftarrow p - \\mathrm{lr}\\cdot\\beta\\,\\big(d\\, e^{\\alpha a} + \\lambda p\\big)

with ``α = exp_mult``, ``β = step_mult`` and ``λ = weight_decay``. The features and
their order are listed in :func:`feature_names` and ``docs/learned.md``.

**Designed for a 2-pass fused kernel** (no host sync, no per-tensor Python loop):

* pass 1 (statistics), per tensor: ``sum(f²)`` of each of the ``N = 2+K+R+K·R+R``
  *normalized* feature planes (computed from the new accumulators, in registers),
  row sums and column sums of ``g²`` for factored tensors, ``sum`` of the full
  factored accumulators for 0/1-dim tensors, and an all-finite flag of ``g``;
* finalize (``O(rows + cols)`` per tensor, may be fused into pass 2's prologue): new
  row/column accumulators, ``vbar_f = mean(r_f)``, and the time features folded into
  an effective first-layer bias ``b0 + time @ w0[n_elem:]``;
* pass 2 (update), per element: recompute the per-element features, scale the
  normalized ones by ``rsqrt(sum/n + norm_eps)``, run the MLP, write ``p`` and the
  state. The *scale-free* features are deliberately not normalized: their per-tensor
  mean square would need the factored accumulators of this step, i.e. a third pass.

**Non-finite gradients**: a tensor whose gradient has any NaN/Inf element is skipped
for that step — its parameter, all its state and its step count are left unchanged
(decided on device, no host sync); the other tensors update normally.

**Empty tensors** (``numel == 0``) only count the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyoptk._backend import (implementation_for, register_backend, resolve_backend,
                             warn_fallback)
from pyoptk._native import native
from pyoptk._nvtx import annotate
from pyoptk.ops import _native_call as nc
from pyoptk.ops._validation import (PARAM_DTYPES, STATE_DTYPE, check_list, check_lr,
                                    check_steps, check_tensor, check_tensor_lists,
                                    dtype_name)

OP = "mlp_update_"
#: Added to ``r/vbar`` under the rsqrt of the row/column factor features (2^-7: exact in
#: every float type; the kernels use the same constant).
FACTOR_FLOOR = 0.0078125

__all__ = [
    "MLPUpdateHyper", "mlp_update_", "mlp_update_particles_", "mlp_update_reference",
    "mlp_update_functional",
    "mlp_update_one", "ema", "momentum_update", "rms_update", "is_factored",
    "matrix_shape", "factored_state_shapes", "factored_update", "factored_features",
    "log_sign", "time_features", "second_moment_scale", "mlp_forward", "feature_names",
]


@dataclass(frozen=True)
class MLPUpdateHyper:
    """Hyperparameters of one ``mlp_update_`` call (built by
    :meth:`pyoptk.learned.MLPConfig.op_hyper`).

    ``n_mom``/``n_rms``/``n_fac`` are K, R, F (the number of momentum, RMS and factored
    decays; the decays themselves are a tensor argument so that they can be learned).
    ``fac_mom_index`` is the momentum plane used for the factored-momentum features
    (-1: none). ``lr_t`` (a one-element float32 tensor on the params' device) overrides
    ``lr`` when given, so schedules need no host sync.
    """

    n_mom: int
    n_rms: int
    n_fac: int
    fac_mom_index: int
    log_sign_k: float
    timescales: Tuple[float, ...]
    eps: float
    norm_eps: float
    fac_eps: float
    exp_mult: float
    step_mult: float
    lr: float
    lr_t: Optional[Tensor]
    weight_decay: float

    @property
    def n_normalized(self) -> int:
        """Per-element features scaled by their per-tensor RMS: g, p, m (K), v (R),
        m/sqrt(v) (K·R), 1/sqrt(v) (R)."""
        k, r = self.n_mom, self.n_rms
        return 2 + k + r + k * r + r

    @property
    def n_scale_free(self) -> int:
        """Per-element features used as they are: log-sign of the normalized g (2),
        factored g (F), factored momentum (F, if any), row and column factors (2F)."""
        return 2 + self.n_fac * (3 + (1 if self.fac_mom_index >= 0 else 0))

    @property
    def n_element(self) -> int:
        return self.n_normalized + self.n_scale_free

    @property
    def n_time(self) -> int:
        return len(self.timescales)

    @property
    def n_features(self) -> int:
        """Input width of the MLP's first layer."""
        return self.n_element + self.n_time


def feature_names(momentum_decays: Sequence[float], rms_decays: Sequence[float],
                  adafactor_decays: Sequence[float], fac_momentum_decay: Optional[float],
                  timescales: Sequence[float]) -> List[str]:
    """The MLP's input features, in order (rows of the first-layer weight ``w0``)."""
    names = ["g", "p"]
    names += [f"m[{b:g}]" for b in momentum_decays]
    names += [f"v[{b:g}]" for b in rms_decays]
    names += [f"m[{b:g}]/sqrt(v[{r:g}])" for b in momentum_decays for r in rms_decays]
    names += [f"1/sqrt(v[{r:g}])" for r in rms_decays]
    names += ["logsign_log(g_hat)", "logsign_sign(g_hat)"]
    names += [f"fac_g[{f:g}]" for f in adafactor_decays]
    if fac_momentum_decay is not None:
        names += [f"fac_m[{fac_momentum_decay:g}][{f:g}]" for f in adafactor_decays]
    names += [f"row[{f:g}]" for f in adafactor_decays]
    names += [f"col[{f:g}]" for f in adafactor_decays]
    names += [f"time[{t:g}]" for t in timescales]
    return names


# ----------------------------------------------------------------------------------
# Reference building blocks: pure, differentiable, no in-place ops on their inputs.
# Accumulators are (planes, n) tensors: one plane per decay, the tensor flattened.
# ----------------------------------------------------------------------------------
def ema(acc: Tensor, x: Tensor, decays: Tensor) -> Tensor:
    """``decays·acc + (1-decays)·x``, one decay per leading plane of ``acc``
    (``acc``: (P, ...), ``x`` broadcastable to it, ``decays``: (P,))."""
    d = decays.reshape((-1,) + (1,) * (acc.dim() - 1))
    return d * acc + (1 - d) * x


def momentum_update(mom: Tensor, g: Tensor, decays: Tensor) -> Tensor:
    """Momenta at several decays: ``m_k ← β_k m_k + (1-β_k) g`` (``mom``: (K, *g.shape))."""
    return ema(mom, g.unsqueeze(0), decays)


def rms_update(rms: Tensor, g: Tensor, decays: Tensor) -> Tensor:
    """Second-moment accumulators: ``v_j ← ρ_j v_j + (1-ρ_j) g²`` (``rms``: (R, *g.shape))."""
    return ema(rms, (g * g).unsqueeze(0), decays)


def is_factored(shape: Sequence[int]) -> bool:
    """Tensors with 2+ dims get Adafactor-style row/column accumulators."""
    return len(shape) >= 2


def matrix_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """The (rows, cols) view of a 2+ dim tensor: ``(prod(shape[:-1]), shape[-1])``."""
    return math.prod(shape[:-1]), shape[-1]


def factored_state_shapes(shape: Sequence[int], n_fac: int) -> Tuple[tuple, tuple]:
    """Shapes of (fac_row, fac_col): ``(F, rows)``, ``(F, cols)`` for 2+ dim tensors;
    for 0/1-dim tensors ``fac_row`` is the full ``(F, *shape)`` accumulator and
    ``fac_col`` is empty ``(F, 0)``."""
    shape = tuple(shape)
    if is_factored(shape):
        rows, cols = matrix_shape(shape)
        return (n_fac, rows), (n_fac, cols)
    return (n_fac,) + shape, (n_fac, 0)


def factored_update(fac_row: Tensor, fac_col: Tensor, g: Tensor, decays: Tensor,
                    fac_eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Adafactor-style accumulators of ``g² + fac_eps`` at F decays.

    2+ dim ``g`` (viewed (rows, cols)): ``r_f ← γ r_f + (1-γ) mean_cols(g²+ε)``,
    ``c_f ← γ c_f + (1-γ) mean_rows(g²+ε)``. 0/1-dim ``g``: the full accumulator
    ``v_f ← γ v_f + (1-γ)(g²+ε)`` lives in ``fac_row`` and ``fac_col`` is empty.
    Returns the new (fac_row, fac_col) and ``vbar`` (F,): the mean of the new row
    accumulator (of the full one for 0/1-dim tensors).
    """
    n_fac = decays.shape[0]
    g2 = g * g + fac_eps
    if is_factored(g.shape):
        rows, cols = matrix_shape(g.shape)
        g2m = g2.reshape(rows, cols)
        row = ema(fac_row, g2m.mean(dim=1).unsqueeze(0), decays)
        col = ema(fac_col, g2m.mean(dim=0).unsqueeze(0), decays)
        vbar = row.mean(dim=1)
        return row, col, vbar
    n = g.numel()
    full = ema(fac_row.reshape(n_fac, n), g2.reshape(1, n), decays)
    return full.reshape(fac_row.shape), fac_col, full.mean(dim=1)


def factored_features(fac_row: Tensor, fac_col: Tensor, vbar: Tensor,
                      shape: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-element factored quantities, each (F, n):

    * ``vhat = r[row]·c[col]/vbar`` — Adafactor's rank-1 estimate of E[g²] (the full
      accumulator for 0/1-dim tensors);
    * ``row_factor = rsqrt(r[row]/vbar + FACTOR_FLOOR)`` and
      ``col_factor = rsqrt(c[col]/vbar + FACTOR_FLOOR)``, broadcast over the tensor (both
      ``rsqrt(v/vbar + FACTOR_FLOOR)`` for 0/1-dim tensors).

    The floor bounds the factors by ``sqrt(1/FACTOR_FLOOR) ≈ 11.3``: a row (or element)
    whose gradients are ~0 — a dead unit — would otherwise get ``rsqrt(fac_eps/vbar)``
    ~ 1e15, and the MLP's output explodes once its weights move from their init.
    """
    n_fac = vbar.shape[0]
    n = math.prod(shape)
    vb = vbar.reshape(n_fac, 1)
    if is_factored(shape):
        rows, cols = matrix_shape(shape)
        rf = torch.rsqrt(fac_row / vb + FACTOR_FLOOR)
        cf = torch.rsqrt(fac_col / vb + FACTOR_FLOOR)
        vhat = (fac_row.unsqueeze(2) * fac_col.unsqueeze(1) / vb.unsqueeze(2)).reshape(n_fac, n)
        row_f = rf.unsqueeze(2).expand(n_fac, rows, cols).reshape(n_fac, n)
        col_f = cf.unsqueeze(1).expand(n_fac, rows, cols).reshape(n_fac, n)
        return vhat, row_f, col_f
    vhat = fac_row.reshape(n_fac, n)
    rf = torch.rsqrt(vhat / vb + FACTOR_FLOOR)
    return vhat, rf, rf


def log_sign(x: Tensor, k: float) -> Tuple[Tensor, Tensor]:
    """Log-and-sign preprocessing (Andrychowicz et al. 2016, https://arxiv.org/abs/1606.04474):
    ``(log|x|/k, sign x)`` if ``|x| ≥ e^-k`` else ``(-1, e^k x)``. Continuous in x,
    both parts bounded below by -1; the log is clamped so its gradient stays finite."""
    thr = math.exp(-k)
    big = x.abs() >= thr
    log_part = torch.where(big, torch.log(x.abs().clamp(min=thr)) / k, torch.full_like(x, -1.0))
    sign_part = torch.where(big, torch.sign(x), x * math.exp(k))
    return log_part, sign_part


def time_features(t: Tensor, timescales: Tensor) -> Tensor:
    """``tanh(t/τ - 1)`` for each timescale τ (``t`` a 0-dim tensor, the step number of
    this update, 1 on the first). Constant over a tensor: a kernel folds them into the
    first layer's bias."""
    return torch.tanh(t / timescales - 1)


def second_moment_scale(planes: Tensor, eps: float) -> Tensor:
    """Per-plane ``rsqrt(mean(x²) + eps)`` over the last dim (planes: (P, n) → (P,))."""
    return torch.rsqrt((planes * planes).mean(dim=-1) + eps)


def mlp_forward(x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``x @ w0 + b0 → relu → … → @ wL + bL`` (no activation on the output layer).
    ``weights`` = [w0, b0, w1, b1, …] with ``w_i`` of shape (in, out)."""
    h = x
    n_layers = len(weights) // 2
    for i in range(n_layers):
        h = h @ weights[2 * i] + weights[2 * i + 1]
        if i < n_layers - 1:
            h = torch.relu(h)
    return h


def mlp_update_one(p: Tensor, g: Optional[Tensor], mom: Tensor, rms: Tensor, fac_row: Tensor,
                   fac_col: Tensor, step: Tensor, weights: Sequence[Tensor], decays: Tensor,
                   hp: MLPUpdateHyper, timescales: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One tensor's step. Pure and differentiable in every tensor argument.

    Returns ``(p, mom, rms, fac_row, fac_col, step)`` after the update (new tensors;
    inputs are never modified; an unchanged output may be the input itself).
    """
    if g is None:
        return p, mom, rms, fac_row, fac_col, step
    shape = tuple(p.shape)
    n = p.numel()
    if n == 0:
        return p, mom, rms, fac_row, fac_col, step + 1
    K, R, F = hp.n_mom, hp.n_rms, hp.n_fac
    ct = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64 for fp64 runs
    dev = p.device
    x_p = p.to(ct).reshape(n)
    g = g.to(ct).reshape(n)
    finite = torch.isfinite(g).all()
    # Skipped tensors still run the math on a zero gradient, so no NaN reaches autograd.
    g = torch.where(finite, g, torch.zeros((), dtype=ct, device=dev))
    dec = decays.to(ct)
    mom0, rms0 = mom.to(ct).reshape(K, n), rms.to(ct).reshape(R, n)
    fr0, fc0 = fac_row.to(ct), fac_col.to(ct)

    # ---- accumulators (per element; row/col sums for factored tensors) ----
    m = momentum_update(mom0, g, dec[:K])
    v = rms_update(rms0, g, dec[K:K + R])
    fr, fc, vbar = factored_update(fr0, fc0, g.reshape(shape), dec[K + R:K + R + F], hp.fac_eps)
    vhat, row_f, col_f = factored_features(fr, fc, vbar, shape)

    # ---- normalized features: pass 1 reduces mean(f²) per plane ----
    inv_sqrt_v = torch.rsqrt(v + hp.eps)                                    # (R, n)
    m_over_v = (m.unsqueeze(1) * inv_sqrt_v.unsqueeze(0)).reshape(K * R, n)  # k-major
    planes = torch.cat([g.unsqueeze(0), x_p.unsqueeze(0), m, v, m_over_v, inv_sqrt_v], dim=0)
    normed = planes * second_moment_scale(planes, hp.norm_eps).unsqueeze(1)

    # ---- scale-free features (per element, not normalized) ----
    ls_log, ls_sign = log_sign(normed[0], hp.log_sign_k)
    inv_sqrt_vhat = torch.rsqrt(vhat + hp.eps)                              # (F, n)
    free = [ls_log.unsqueeze(0), ls_sign.unsqueeze(0), g.unsqueeze(0) * inv_sqrt_vhat]
    if hp.fac_mom_index >= 0:
        free.append(m[hp.fac_mom_index].unsqueeze(0) * inv_sqrt_vhat)
    free += [row_f, col_f]

    # ---- time features (per tensor) ----
    t = step.to(ct).reshape(()) + 1
    if timescales is None:
        timescales = torch.tensor(hp.timescales, dtype=ct, device=dev)
    tf = time_features(t, timescales.to(ct))
    x = torch.cat([normed] + free + [tf.unsqueeze(1).expand(tf.shape[0], n)], dim=0).t()

    # ---- MLP and the step ----
    out = mlp_forward(x, [w.to(ct) for w in weights])
    direction, magnitude = out[:, 0], out[:, 1]
    lr = (hp.lr_t.to(ct).reshape(()) if hp.lr_t is not None
          else torch.full((), hp.lr, dtype=ct, device=dev))
    coef = lr * hp.step_mult
    new_p = x_p - coef * (direction * torch.exp(hp.exp_mult * magnitude) + hp.weight_decay * x_p)

    # ---- skip tensors with non-finite gradients ----
    new_p = torch.where(finite, new_p, x_p)
    m = torch.where(finite, m, mom0)
    v = torch.where(finite, v, rms0)
    fr = torch.where(finite, fr.reshape(fr0.shape), fr0)
    fc = torch.where(finite, fc, fc0) if fc0.numel() else fac_col
    new_step = step + finite.to(step.dtype)
    return (new_p.reshape(shape).to(p.dtype), m.reshape(mom.shape).to(mom.dtype),
            v.reshape(rms.shape).to(rms.dtype), fr.to(fac_row.dtype),
            fc.to(fac_col.dtype), new_step)


def mlp_update_functional(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                          moms: Sequence[Tensor], rmss: Sequence[Tensor],
                          fac_rows: Sequence[Tensor], fac_cols: Sequence[Tensor],
                          steps: Sequence[Tensor], weights: Sequence[Tensor], decays: Tensor,
                          hp: MLPUpdateHyper) -> Tuple[List[Tensor], ...]:
    """The step over lists, pure and differentiable: returns new lists
    ``(params, moms, rmss, fac_rows, fac_cols, steps)``. ``grads[i] is None`` leaves
    tensor i (and its state) unchanged. Used by meta-training, and by the in-place
    reference below, so the two agree bit for bit."""
    outs: List[List[Tensor]] = [[], [], [], [], [], []]
    ts_cache = {}
    for i, p in enumerate(params):
        ct = torch.promote_types(p.dtype, torch.float32)
        key = (p.device, ct)
        if key not in ts_cache:
            ts_cache[key] = torch.tensor(hp.timescales, dtype=ct, device=p.device)
        res = mlp_update_one(p, grads[i], moms[i], rmss[i], fac_rows[i], fac_cols[i], steps[i],
                             weights, decays, hp, ts_cache[key])
        for lst, r in zip(outs, res):
            lst.append(r)
    return tuple(outs)


# ----------------------------------------------------------------------------------
# Reference (in place): the functional step, copied into the inputs.
# ----------------------------------------------------------------------------------
@torch.no_grad()
def mlp_update_reference(params: List[Tensor], grads: List[Tensor], moms: List[Tensor],
                         rmss: List[Tensor], fac_rows: List[Tensor], fac_cols: List[Tensor],
                         steps: List[Tensor], weights: List[Tensor], decays: Tensor,
                         hp: MLPUpdateHyper) -> None:
    """The MLP step over lists, in place. The specification every backend is tested
    against; ``steps[i]`` holds the number of updates already applied to tensor i and
    is incremented here (unless the tensor is skipped for a non-finite gradient)."""
    new = mlp_update_functional(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                weights, decays, hp)
    for dsts, srcs in zip((params, moms, rmss, fac_rows, fac_cols, steps), new):
        for dst, src in zip(dsts, srcs):
            if src is not dst:
                dst.copy_(src)


register_backend(OP, "torch")(mlp_update_reference)


# ----------------------------------------------------------------------------------
# Backend launchers. Each has the reference's signature and increments steps[i] itself
# for every tensor it does not skip. A backend that declines a configuration raises
# NotImplementedError *before touching any tensor*; the op then runs the reference
# (with a one-time SlowPathWarning naming the reason).
# ----------------------------------------------------------------------------------
def _present(params, grads, moms, rmss, fac_rows, fac_cols, steps):
    """Drop tensors whose gradient is None (a direct backend call may pass them; the
    op's schema only takes tensors)."""
    if all(g is not None for g in grads):
        return params, grads, moms, rmss, fac_rows, fac_cols, steps
    keep = [i for i, g in enumerate(grads) if g is not None]
    return tuple([xs[i] for i in keep]
                 for xs in (params, grads, moms, rmss, fac_rows, fac_cols, steps))


def native_mlp_config(hp: MLPUpdateHyper, lr_t: Optional[Tensor] = None):
    """``hp`` as ``pyoptk._C.MLPUpdateConfig`` (also taken by the fused backward of
    :mod:`pyoptk.ops.mlp_step`). ``lr_t`` overrides ``hp.lr_t`` (the backward passes it
    in its compute dtype)."""
    lr_t = hp.lr_t if lr_t is None else lr_t
    return native().MLPUpdateConfig(
        n_mom=hp.n_mom, n_rms=hp.n_rms, n_fac=hp.n_fac, fac_mom_index=hp.fac_mom_index,
        log_sign_k=float(hp.log_sign_k), timescales=[float(t) for t in hp.timescales],
        eps=float(hp.eps), norm_eps=float(hp.norm_eps), fac_eps=float(hp.fac_eps),
        exp_mult=float(hp.exp_mult), step_mult=float(hp.step_mult), lr=float(hp.lr),
        lr_ptr=nc.lr_ptr(lr_t), weight_decay=float(hp.weight_decay),
        # torch.set_num_threads governs the native loops too (passed explicitly: the
        # OpenMP default of pyoptk._C need not be torch's setting).
        num_threads=torch.get_num_threads())


@register_backend(OP, "cpu")
def _mlp_update_cpu(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
                    hp: MLPUpdateHyper) -> None:
    """Native C++ (OpenMP): pass 1 statistics, per-tensor finalize, pass 2 update
    (``csrc/cpu/mlp_update.cpp``). Runs every configuration the op accepts (any K/R/F,
    timescales, fac_mom_index, hidden widths and depth)."""
    params, grads, moms, rmss, fac_rows, fac_cols, steps = _present(
        params, grads, moms, rmss, fac_rows, fac_cols, steps)
    if not params:
        return
    rows, cols = [], []
    for p in params:
        if is_factored(p.shape):
            r, c = matrix_shape(p.shape)
        else:
            r, c = 0, 0  # 0/1-dim: the full accumulator lives in fac_rows
        rows.append(r)
        cols.append(c)
    # Raw pointers: (in, out) row-major weights; the locals keep any copies alive.
    weights = [w.contiguous() for w in weights]
    decays = decays.contiguous()
    widths = [int(weights[0].shape[0])] + [int(w.shape[1]) for w in weights[0::2]]
    native().mlp_update_cpu(
        nc.ptrs(params), nc.ptrs(grads), nc.ptrs(moms), nc.ptrs(rmss), nc.ptrs(fac_rows),
        nc.ptrs(fac_cols), nc.ptrs(steps), nc.numels(params), rows, cols,
        nc.dtype_code(params[0].dtype), nc.ptrs(weights), widths, decays.data_ptr(),
        native_mlp_config(hp))


@register_backend(OP, "triton")
def _mlp_update_triton(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
                       hp: MLPUpdateHyper) -> None:
    """The Triton kernels (``kernels/mlp_update.py``); NotImplementedError (raised by
    ``check_supported`` before any launch) for the configurations they decline."""
    from pyoptk.kernels import mlp_update as kernels

    kernels.check_supported(weights, hp, params[0].dtype if params else None)
    # The kernels index the weights as contiguous (in, out) matrices; the public op
    # accepts any layout (they are a few KB: copying costs nothing).
    kernels.mlp_update_(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                        [w.contiguous() for w in weights], decays.contiguous(), hp)


def _run_backend(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
                 hp: MLPUpdateHyper) -> None:
    device_type = params[0].device.type
    backend = resolve_backend(OP, device_type)
    fn = implementation_for(OP, backend)
    try:
        fn(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays, hp)
    except NotImplementedError as exc:
        if backend == "torch":
            raise
        # Declined before any tensor was written (the backends' contract): the reference.
        warn_fallback(OP, device_type, backend, str(exc))
        mlp_update_reference(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights,
                             decays, hp)


# ----------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------
def _hyper(n_mom, n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps,
           fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay) -> MLPUpdateHyper:
    return MLPUpdateHyper(n_mom, n_rms, n_fac, fac_mom_index, log_sign_k,
                          tuple(float(t) for t in timescales), eps, norm_eps, fac_eps,
                          exp_mult, step_mult, lr, lr_t, weight_decay)


@torch.library.custom_op(
    "pyoptk::mlp_update_", mutates_args=("params", "moms", "rmss", "fac_rows", "fac_cols", "steps"))
def _mlp_update_op(params: List[Tensor], grads: List[Tensor], moms: List[Tensor],
                   rmss: List[Tensor], fac_rows: List[Tensor], fac_cols: List[Tensor],
                   steps: List[Tensor], weights: List[Tensor], decays: Tensor, n_mom: int,
                   n_rms: int, n_fac: int, fac_mom_index: int, log_sign_k: float,
                   timescales: List[float], eps: float, norm_eps: float, fac_eps: float,
                   exp_mult: float, step_mult: float, lr: float, lr_t: Optional[Tensor],
                   weight_decay: float) -> None:
    """Default kernel (devices without a fused backend): the reference."""
    hp = _hyper(n_mom, n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps,
                fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay)
    mlp_update_reference(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights,
                         decays, hp)


@_mlp_update_op.register_kernel(("cpu", "cuda"))
def _mlp_update_dispatch(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
                         n_mom, n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps,
                         norm_eps, fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay) -> None:
    if not params:
        return
    hp = _hyper(n_mom, n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps,
                fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay)
    _run_backend(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays, hp)


@_mlp_update_op.register_fake
def _(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays, n_mom, n_rms,
      n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps, fac_eps, exp_mult,
      step_mult, lr, lr_t, weight_decay) -> None:
    return None


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
def check_weights(op: str, weights: Sequence[Tensor], n_features: int,
                  device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = STATE_DTYPE) -> None:
    """``weights`` = [w0, b0, …]: (in, out) matrices and (out,) biases chained from
    ``n_features`` inputs to 2 outputs. Errors say which layer is wrong."""
    if not isinstance(weights, (list, tuple)) or len(weights) < 2 or len(weights) % 2:
        got = len(weights) if isinstance(weights, (list, tuple)) else repr(weights)
        raise ValueError(f"{op}: weights must be a list [w0, b0, w1, b1, ...] of even length "
                         f">= 2, got {got}")
    width = n_features
    for i in range(len(weights) // 2):
        w, b = weights[2 * i], weights[2 * i + 1]
        for name, t in ((f"w{i}", w), (f"b{i}", b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if dtype is not None and t.dtype != dtype:
                raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
            if device is not None and t.device != device:
                raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
        if w.dim() != 2 or w.shape[0] != width:
            what = ("the feature config produces" if i == 0 else "the previous layer has")
            raise ValueError(
                f"{op}: w{i} has shape {tuple(w.shape)} but {what} {width} "
                f"{'features' if i == 0 else 'outputs'}; expected ({width}, out)"
                + (" — meta-parameters and feature config do not match" if i == 0 else ""))
        if tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"{op}: b{i} has shape {tuple(b.shape)}, expected ({w.shape[1]},)")
        width = w.shape[1]
    if width != 2:
        raise ValueError(f"{op}: the last layer has {width} outputs; the MLP rule needs 2 "
                         "(direction, magnitude)")


def check_hyper(op: str, hp: MLPUpdateHyper) -> None:
    if not isinstance(hp, MLPUpdateHyper):
        raise TypeError(f"{op}: hp must be an MLPUpdateHyper, got {type(hp).__name__}")
    for name in ("n_mom", "n_rms", "n_fac"):
        v = getattr(hp, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{op}: hp.{name} must be an int >= 0, got {v!r}")
    if isinstance(hp.fac_mom_index, bool) or not isinstance(hp.fac_mom_index, int) or \
            not -1 <= hp.fac_mom_index < hp.n_mom:
        raise ValueError(f"{op}: hp.fac_mom_index must be -1 or in [0, {hp.n_mom}), "
                         f"got {hp.fac_mom_index}")
    for name in ("log_sign_k", "eps", "norm_eps", "fac_eps"):
        v = getattr(hp, name)
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{op}: hp.{name} must be a finite float > 0, got {v!r}")
    if any(not (t > 0 and math.isfinite(t)) for t in hp.timescales):
        raise ValueError(f"{op}: hp.timescales must be finite and > 0, got {hp.timescales}")
    for name in ("exp_mult", "step_mult"):
        if not math.isfinite(getattr(hp, name)):
            raise ValueError(f"{op}: hp.{name} must be finite, got {getattr(hp, name)}")
    if not hp.weight_decay >= 0.0:
        raise ValueError(f"{op}: Invalid weight_decay value: {hp.weight_decay}")


def check_step_lists(op: str, params, grads, moms, rmss, fac_rows, fac_cols, weights,
                     decays, hp: MLPUpdateHyper, param_dtypes: Sequence[torch.dtype],
                     state_dtype) -> Tuple[List[Tensor], ...]:
    """The checks ``mlp_update_`` and ``mlp_step`` share: list types and lengths, ``hp``,
    one param dtype out of ``param_dtypes``, and every tensor's device, shape, dtype and
    contiguity (state, weights and decays of ``state_dtype(param_dtype)``). Returns the
    lists as lists; ``steps`` and the lr are checked by each caller."""
    check_hyper(op, hp)
    K, R, F = hp.n_mom, hp.n_rms, hp.n_fac
    names = ("params", "grads", "moms", "rmss", "fac_rows", "fac_cols")
    lists = check_tensor_lists(
        op, dict(zip(names, (params, grads, moms, rmss, fac_rows, fac_cols))),
        same_dtype=("grads",), state_keys=names[2:], param_dtypes=param_dtypes,
        state_dtype=state_dtype,
        shapes={"moms": lambda s: (K,) + s, "rmss": lambda s: (R,) + s,
                "fac_rows": lambda s: factored_state_shapes(s, F)[0],
                "fac_cols": lambda s: factored_state_shapes(s, F)[1]})
    out = tuple(lists[n] for n in names)
    if not out[0]:
        return out
    device, sdt = out[0][0].device, state_dtype(out[0][0].dtype)
    check_weights(op, weights, hp.n_features, device, dtype=sdt)
    if not isinstance(decays, Tensor):
        raise TypeError(f"{op}: decays must be a {dtype_name(sdt)} tensor, got "
                        f"{type(decays).__name__}")
    check_tensor(op, "decays", decays, device, shape=(K + R + F,), dtype=sdt)
    return out


def rule_op_args(hp: MLPUpdateHyper) -> tuple:
    """The rule's constants in the order the ``pyoptk::mlp_update_`` and
    ``pyoptk::mlp_step`` schemas take them, between ``decays`` and the lr."""
    return (hp.n_mom, hp.n_rms, hp.n_fac, int(hp.fac_mom_index), float(hp.log_sign_k),
            [float(t) for t in hp.timescales], float(hp.eps), float(hp.norm_eps),
            float(hp.fac_eps), float(hp.exp_mult), float(hp.step_mult))


@annotate("mlp_update_")
def mlp_update_(params: Sequence[Tensor], grads: Sequence[Tensor], moms: Sequence[Tensor],
                rmss: Sequence[Tensor], fac_rows: Sequence[Tensor], fac_cols: Sequence[Tensor],
                steps: Sequence[Tensor], weights: Sequence[Tensor], decays: Tensor,
                hp: MLPUpdateHyper) -> None:
    """One learned-MLP step over lists of tensors, in place (no autograd; meta-training
    differentiates :func:`mlp_update_functional` instead).

    Args:
        params: parameters (float32, bfloat16 or float16, one dtype per call), updated.
        grads: their gradients, same dtypes and shapes; not modified.
        moms: float32 ``(K, *p.shape)`` momenta, updated.
        rmss: float32 ``(R, *p.shape)`` second moments, updated.
        fac_rows, fac_cols: float32 factored accumulators, updated: ``(F, rows)`` and
            ``(F, cols)`` for 2+ dim params viewed ``(prod(shape[:-1]), shape[-1])``;
            ``(F, *shape)`` and ``(F, 0)`` for 0/1-dim params
            (:func:`factored_state_shapes`).
        steps: one float32 scalar per param: updates applied so far; incremented.
        weights: float32 MLP weights ``[w0, b0, w1, b1, …]`` on the params' device.
        decays: float32 ``(K+R+F,)`` tensor: momentum, RMS, then factored decays.
        hp: :class:`MLPUpdateHyper`.

    A tensor whose gradient has a NaN/Inf is skipped (param, state and step unchanged).
    All tensors must be contiguous and on one device. The backend follows
    :func:`pyoptk.set_backend`.
    """
    op = OP
    params, grads, moms, rmss, fac_rows, fac_cols = check_step_lists(
        op, params, grads, moms, rmss, fac_rows, fac_cols, weights, decays, hp, PARAM_DTYPES,
        lambda _dtype: STATE_DTYPE)
    if not params:
        return
    device = params[0].device
    steps = list(steps) if isinstance(steps, (list, tuple)) else steps
    check_steps(op, steps, len(params), device)
    lr_f, lr_t = check_lr(op, hp.lr_t if hp.lr_t is not None else hp.lr, device)
    torch.ops.pyoptk.mlp_update_(
        params, grads, moms, rmss, fac_rows, fac_cols, steps, list(weights), decays,
        *rule_op_args(hp), lr_f, lr_t, float(hp.weight_decay))


@annotate("mlp_update_particles_")
def mlp_update_particles_(params: Sequence[Tensor], grads: Sequence[Tensor],
                          moms: Sequence[Tensor], rmss: Sequence[Tensor],
                          fac_rows: Sequence[Tensor], fac_cols: Sequence[Tensor],
                          steps: Sequence[Tensor], weights: Sequence[Tensor], decays: Tensor,
                          hp: MLPUpdateHyper) -> None:
    """``P`` independent learned-MLP steps over particle-stacked tensors, in place: what
    ``P`` calls of :func:`mlp_update_` would do, particle ``j`` stepping
    ``params[i][j]``, ``moms[i][j]``, … with its own rule ``weights[l][j]`` and
    ``decays[j]`` (e.g. the perturbed meta-parameters of evolution strategies).

    Every tensor carries a leading particle dimension ``P``: ``params[i]`` and
    ``grads[i]`` ``[P, *shape_i]``, the state ``[P, *(mlp_update_'s shape)]``,
    ``steps[i]`` ``[P]``, ``weights[l]`` ``[P, *w_l.shape]``, ``decays`` ``[P, K+R+F]``;
    contiguous, on one device; dtypes as :func:`mlp_update_`. Why: the checks run once
    (particle 0's slices through :func:`mlp_update_`'s, every tensor's ``P`` and layout),
    then each particle goes straight to the backend. Per call of :func:`mlp_update_` (or
    of :func:`pyoptk.learned.update`) the checks and the custom-op dispatch cost
    ~100–200 µs on CPU (measured, 1 thread), more than the kernel on a few thousand
    elements (~116 µs at 2,114). ``hp.lr_t`` is shared by the particles.
    """
    op = "mlp_update_particles_"
    lists = {name: check_list(op, name, xs) for name, xs in (
        ("params", params), ("grads", grads), ("moms", moms), ("rmss", rmss),
        ("fac_rows", fac_rows), ("fac_cols", fac_cols), ("steps", steps),
        ("weights", weights))}
    if not isinstance(decays, Tensor) or decays.dim() != 2:
        raise TypeError(f"{op}: decays must be a [P, K+R+F] tensor")
    P = int(decays.shape[0])
    for name, xs in lists.items():
        for i, t in enumerate(xs):
            if t.dim() < 1 or t.shape[0] != P or not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be a contiguous tensor with a "
                                 f"leading particle dimension {P} (that of decays)")
    if not decays.is_contiguous():
        raise ValueError(f"{op}: decays must be contiguous")

    def particle(j: int) -> Tuple[List[Tensor], ...]:
        return tuple([t[j] for t in xs] for xs in lists.values())

    if P == 0 or not params:
        return
    ps, gs, ms, rs, frs, fcs, sts, ws = particle(0)
    ps, gs, ms, rs, frs, fcs = check_step_lists(op, ps, gs, ms, rs, frs, fcs, ws, decays[0],
                                                hp, PARAM_DTYPES, lambda _dtype: STATE_DTYPE)
    device = params[0].device
    check_steps(op, sts, len(params), device)
    check_lr(op, hp.lr_t if hp.lr_t is not None else hp.lr, device)
    for j in range(P):
        ps, gs, ms, rs, frs, fcs, sts, ws = particle(j)
        _run_backend(ps, gs, ms, rs, frs, fcs, sts, ws, decays[j], hp)
