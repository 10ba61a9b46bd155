// Learned-MLP optimizer step (mlp_update_): the per-element math, one copy for the C++
// CPU loops and CUDA kernels (DESIGN.md "One copy of the math").
//
// The specification is pyoptk.ops.mlp_update.mlp_update_reference (docs/learned.md,
// "For kernel authors"). For one tensor of n elements with gradient g (all in S = float,
// or double for fp64 checks):
//
//   m_k  = b_k m_k + (1-b_k) g                   k < K    (momenta)
//   v_j  = r_j v_j + (1-r_j) g^2                 j < R    (second moments)
//   2+ dim tensors, viewed (rows, cols):  r_f, c_f row/column accumulators of g^2+fac_eps
//   0/1-dim tensors: full accumulator u_f = y_f u_f + (1-y_f)(g^2+fac_eps)
//   x = [ N normalized planes * scale_i , scale-free features ]      (time: in b0')
//   (d, a) = MLP(x) ; p = p - lr*step_mult*(d*exp(exp_mult*a) + wd*p)
//
// Functions work on a *block of L lanes* (L elements at once), every array laid out
// plane-major: a[plane * L + lane]. The CPU backend uses L = 16 and vectorizes the
// lane loops (PYOPTK_LANES = #pragma omp simd); a CUDA kernel uses L = 1 (one element
// per thread), where every lane loop disappears. Every lane does exactly the same IEEE
// operations in the same order whatever L is, so results do not depend on L.
//
// Rounding: each feature operation is a separately rounded IEEE operation, in the
// reference's order (torch runs them as separate tensor ops, no contraction), written
// with mul_rn/add_rn/... so that nvcc cannot contract them into FMAs either (on the
// host the build passes -ffp-contract=off). The MLP's dot products are the exception:
// explicit fused multiply-adds (fma_rn), accumulated in input order starting from the
// bias, the same on CPU and GPU.
//
// Per-call layout (see MLPDims): N = 2 + K + R + K*R + R normalized planes
//   [g, p, m_0..m_{K-1}, v_0..v_{R-1}, m_k*rsqrt(v_j+eps) (k-major), rsqrt(v_j+eps)]
// then the scale-free features
//   [logsign_log(g_hat), logsign_sign(g_hat), fac_g (F), fac_m (F, if fac_mom_index >= 0),
//    row (F), col (F)]
// (NE = N + 2 + F*(3 + has_fac_mom) element features); the T time features are constant
// per tensor and are folded into the first layer's bias by mlp_folded_bias().
#pragma once

#include <cmath>
#include <cstdint>

#include "pyoptk/common.h"

#if defined(__CUDACC__)
#define PYOPTK_LANES
#else
#define PYOPTK_LANES _Pragma("omp simd")
#endif

namespace pyoptk {
namespace mlp {

// ---- correctly rounded scalar operations (float and double) ------------------------
// Device code uses the _rn intrinsics, which nvcc never contracts or approximates.
PYOPTK_HD float mul_rn(float a, float b) {
#if PYOPTK_ON_DEVICE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PYOPTK_HD double mul_rn(double a, double b) {
#if PYOPTK_ON_DEVICE
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PYOPTK_HD float add_rn(float a, float b) {
#if PYOPTK_ON_DEVICE
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PYOPTK_HD double add_rn(double a, double b) {
#if PYOPTK_ON_DEVICE
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
PYOPTK_HD float sub_rn(float a, float b) {
#if PYOPTK_ON_DEVICE
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
PYOPTK_HD double sub_rn(double a, double b) {
#if PYOPTK_ON_DEVICE
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
PYOPTK_HD float div_rn(float a, float b) {
#if PYOPTK_ON_DEVICE
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
PYOPTK_HD double div_rn(double a, double b) {
#if PYOPTK_ON_DEVICE
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
PYOPTK_HD float sqrt_rn(float a) {
#if PYOPTK_ON_DEVICE
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}
PYOPTK_HD double sqrt_rn(double a) {
#if PYOPTK_ON_DEVICE
  return __dsqrt_rn(a);
#else
  return sqrt(a);
#endif
}
// rsqrt as torch computes it on CPU: 1 / sqrt(x), both correctly rounded.
template <typename S>
PYOPTK_HD S rsqrt_rn(S a) {
  return div_rn(S(1), sqrt_rn(a));
}

// Row/column factor features rsqrt(r/vbar + floor). The floor (2^-7, exact in every
// float type) bounds them by sqrt(128) ~ 11.3: without it a row or an element whose
// gradients are ~0 (a dead unit) gets rsqrt(fac_eps/vbar) ~ 1e15 and the MLP output
// explodes as soon as its weights are trained. The backward's d/dx = -0.5 y^3 / vbar
// is unchanged in form (y is the floored value).
template <typename S>
PYOPTK_HD S factor_feature(S r, S vbar) {
  return rsqrt_rn(add_rn(div_rn(r, vbar), S(0.0078125)));
}
PYOPTK_HD float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }
PYOPTK_HD double fma_rn(double a, double b, double c) { return fma(a, b, c); }
PYOPTK_HD float log_(float a) { return logf(a); }
PYOPTK_HD double log_(double a) { return log(a); }
PYOPTK_HD float exp_(float a) { return expf(a); }
PYOPTK_HD double exp_(double a) { return exp(a); }
PYOPTK_HD float abs_(float a) { return fabsf(a); }
PYOPTK_HD double abs_(double a) { return fabs(a); }

// ReLU that keeps NaN (torch.relu propagates NaN; fmax would drop it).
template <typename S>
PYOPTK_HD S relu(S x) {
  return x < S(0) ? S(0) : x;
}

// ema as the reference's ``d*acc + (1-d)*x``: omd = 1 - d is rounded first (an fp32
// tensor op in the reference), then two products and a sum, each rounded.
template <typename S>
PYOPTK_HD S ema(S acc, S x, S d, S omd) {
  return add_rn(mul_rn(d, acc), mul_rn(omd, x));
}

// ---- per-call dimensions and constants ----------------------------------------------
struct MLPDims {
  int K;  // momentum decays
  int R;  // RMS decays
  int F;  // factored decays
  int fac_mom_index;  // momentum plane of the fac_m features, -1: none

  PYOPTK_HD int n_normalized() const { return 2 + K + R + K * R + R; }
  PYOPTK_HD int n_fac_mom() const { return fac_mom_index >= 0 ? F : 0; }
  PYOPTK_HD int n_scale_free() const { return 2 + 3 * F + n_fac_mom(); }
  PYOPTK_HD int n_element() const { return n_normalized() + n_scale_free(); }
  // Offsets of the feature groups in x.
  PYOPTK_HD int off_logsign() const { return n_normalized(); }
  PYOPTK_HD int off_fac_g() const { return n_normalized() + 2; }
  PYOPTK_HD int off_fac_m() const { return off_fac_g() + F; }
  PYOPTK_HD int off_row() const { return off_fac_m() + n_fac_mom(); }
  PYOPTK_HD int off_col() const { return off_row() + F; }
};

// Constants of one call, already rounded to S the way the reference rounds them
// (python floats meeting fp32 tensors are rounded to fp32 first).
template <typename S>
struct MLPConsts {
  S eps;       // added to v and vhat under the rsqrt
  S fac_eps;   // added to g^2 in the factored accumulators
  S ls_k;      // log_sign_k
  S ls_thr;    // exp(-log_sign_k): |g_hat| >= thr takes the log branch
  S ls_scale;  // exp(log_sign_k): the linear branch's slope
  S exp_mult;  // alpha
  S weight_decay;
};

// Per-tensor scalars produced by the finalize step (pointers into its workspace).
//   scale[N]: rsqrt(sum(plane^2)/n + norm_eps) of each normalized plane
//   vbar[F]:  mean of the new row accumulator r_f (2+ dim) or of the new full u_f
//   factored: 2+ dim tensor (row/column accumulators) or not (full accumulator)
template <typename S>
struct MLPTensorScalars {
  const S* scale;
  const S* vbar;
  bool factored;
};

// ---- accumulators -------------------------------------------------------------------
// New momenta and second moments of a block: m_new[k][l], v_new[j][l] from the old ones
// (which may alias the new ones). dec/omd: the K+R+F decays and their 1-d, fp32 rounded.
template <typename S, int L>
PYOPTK_HD void mlp_moments(const MLPDims& dm, const S* PYOPTK_RESTRICT g, const S* m_old,
                           const S* v_old, const S* dec, const S* omd, S* m_new, S* v_new) {
  for (int k = 0; k < dm.K; ++k) {
    const S d = dec[k], o = omd[k];
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) m_new[k * L + l] = ema(m_old[k * L + l], g[l], d, o);
  }
  for (int j = 0; j < dm.R; ++j) {
    const S d = dec[dm.K + j], o = omd[dm.K + j];
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) v_new[j * L + l] = ema(v_old[j * L + l], mul_rn(g[l], g[l]), d, o);
  }
}

// g^2 + fac_eps: the quantity the factored accumulators average.
template <typename S>
PYOPTK_HD S fac_input(S g, S fac_eps) {
  return add_rn(mul_rn(g, g), fac_eps);
}

// New full factored accumulators of a 0/1-dim tensor's block: u_new[f][l].
template <typename S, int L>
PYOPTK_HD void mlp_full_fac(const MLPDims& dm, const S* PYOPTK_RESTRICT g, const S* u_old,
                            const S* dec, const S* omd, S fac_eps, S* u_new) {
  for (int f = 0; f < dm.F; ++f) {
    const S d = dec[dm.K + dm.R + f], o = omd[dm.K + dm.R + f];
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) {
      u_new[f * L + l] = ema(u_old[f * L + l], fac_input(g[l], fac_eps), d, o);
    }
  }
}

// New row (or column) accumulator from the old value and the mean of g^2+fac_eps over
// the row (column), which the caller computes (in double on CPU) and rounds to S.
template <typename S>
PYOPTK_HD S mlp_factored_update(S old, S mean, S d, S omd) {
  return ema(old, mean, d, omd);
}

// ---- the N normalized planes (unscaled) ---------------------------------------------
// out[i][l] for i < N: g, p, m_k, v_j, m_k*rsqrt(v_j+eps), rsqrt(v_j+eps). Pass 1 sums
// their squares per tensor; pass 2 multiplies them by scale_i (mlp_features).
template <typename S, int L>
PYOPTK_HD void mlp_planes(const MLPDims& dm, const S* PYOPTK_RESTRICT g,
                          const S* PYOPTK_RESTRICT p, const S* PYOPTK_RESTRICT m,
                          const S* PYOPTK_RESTRICT v, S eps, S* PYOPTK_RESTRICT out) {
  const int K = dm.K, R = dm.R;
  PYOPTK_LANES
  for (int l = 0; l < L; ++l) {
    out[l] = g[l];
    out[L + l] = p[l];
  }
  for (int k = 0; k < K; ++k) {
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) out[(2 + k) * L + l] = m[k * L + l];
  }
  for (int j = 0; j < R; ++j) {
    S* iv = out + (2 + K + R + K * R + j) * L;
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) {
      out[(2 + K + j) * L + l] = v[j * L + l];
      iv[l] = rsqrt_rn(add_rn(v[j * L + l], eps));
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < R; ++j) {
      const S* iv = out + (2 + K + R + K * R + j) * L;
      S* q = out + (2 + K + R + k * R + j) * L;
      PYOPTK_LANES
      for (int l = 0; l < L; ++l) q[l] = mul_rn(m[k * L + l], iv[l]);
    }
  }
}

// ---- log-and-sign of the normalized gradient -----------------------------------------
// (log|x|/k, sign x) if |x| >= e^-k, else (-1, e^k x): the log of the clamped |x|.
// The logs are computed in a separate lane loop (logf does not vectorize without
// fast-math); log_part must hold max(|x|, thr) on entry, see mlp_features.
// Both branches are computed and one is selected (no conditional division/product).
template <typename S>
PYOPTK_HD S logsign_sign(S x, S thr, S scale) {
  // sign(x): +-1, +-0 for +-0, NaN for NaN.
  S sgn = x < S(0) ? S(-1) : x;
  sgn = x > S(0) ? S(1) : sgn;
  const S lin = mul_rn(x, scale);
  return abs_(x) >= thr ? sgn : lin;
}
template <typename S>
PYOPTK_HD S logsign_log(S x, S log_clamped, S thr, S k) {
  const S q = div_rn(log_clamped, k);
  const bool big = abs_(x) >= thr;
  return big ? q : S(-1);
}

// ---- the element features --------------------------------------------------------------
// x[i][l] for i < NE (see the layout at the top), from the *new* accumulators:
//   g[l], p[l]         gradient and parameter (S)
//   m[k][l], v[j][l]   new momenta / second moments (mlp_moments)
//   fa[f][l]           2+ dim: new row accumulator r_f[row of l]; 0/1-dim: new u_f
//   fb[f][l]           2+ dim: new column accumulator c_f[col of l]; unused otherwise
//   ts                 per-tensor scale[N] and vbar[F] (finalize), factored flag
// x needs n_element()*L entries; work needs L entries.
// mlp_features = mlp_planes -> mlp_scale_planes -> mlp_scale_free_features; the fused
// backward calls the three parts itself, keeping the unscaled planes and rsqrt(vhat+eps).

// x[i][l] = P[i][l] * scale_i for the N normalized planes (x may alias P).
template <typename S, int L>
PYOPTK_HD void mlp_scale_planes(const MLPDims& dm, const S* scale, const S* P, S* x) {
  const int N = dm.n_normalized();
  for (int i = 0; i < N; ++i) {
    const S s = scale[i];
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) x[i * L + l] = mul_rn(P[i * L + l], s);
  }
}

// The scale-free features x[N..NE) from g_hat = x[0] (already scaled) and the new
// accumulators. ivh (optional, F*L entries, KeepIvh): rsqrt(vhat_f + eps) per lane.
template <typename S, int L, bool KeepIvh = false>
PYOPTK_HD void mlp_scale_free_features(const MLPDims& dm, const MLPConsts<S>& c,
                                       const MLPTensorScalars<S>& ts,
                                       const S* PYOPTK_RESTRICT g, const S* PYOPTK_RESTRICT m,
                                       const S* PYOPTK_RESTRICT fa,
                                       const S* PYOPTK_RESTRICT fb, S* PYOPTK_RESTRICT x,
                                       S* PYOPTK_RESTRICT work, S* PYOPTK_RESTRICT ivh = nullptr) {
  // log-sign of g_hat = x[0] (= g * scale_g)
  S* ls_log = x + dm.off_logsign() * L;
  S* ls_sign = ls_log + L;
  PYOPTK_LANES
  for (int l = 0; l < L; ++l) {
    const S a = abs_(x[l]);
    work[l] = a < c.ls_thr ? c.ls_thr : a;  // clamp(min=thr); NaN stays NaN
  }
  for (int l = 0; l < L; ++l) work[l] = log_(work[l]);
  PYOPTK_LANES
  for (int l = 0; l < L; ++l) {
    ls_log[l] = logsign_log(x[l], work[l], c.ls_thr, c.ls_k);
    ls_sign[l] = logsign_sign(x[l], c.ls_thr, c.ls_scale);
  }
  // factored (scale-free) features
  const int F = dm.F;
  const bool fm = dm.fac_mom_index >= 0;
  const S* mf = m + (fm ? dm.fac_mom_index : 0) * L;
  for (int f = 0; f < F; ++f) {
    const S vb = ts.vbar[f];
    S* xg = x + (dm.off_fac_g() + f) * L;
    S* xm = x + (dm.off_fac_m() + f) * L;
    S* xr = x + (dm.off_row() + f) * L;
    S* xc = x + (dm.off_col() + f) * L;
    S* iv = KeepIvh ? ivh + f * L : nullptr;
    const S* a = fa + f * L;
    const S* b = fb + f * L;
    if (ts.factored) {
      PYOPTK_LANES
      for (int l = 0; l < L; ++l) {
        // vhat = r*c/vbar; row = rsqrt(r/vbar + floor); col = rsqrt(c/vbar + floor)
        const S ivh_l = rsqrt_rn(add_rn(div_rn(mul_rn(a[l], b[l]), vb), c.eps));
        if (KeepIvh) iv[l] = ivh_l;
        xg[l] = mul_rn(g[l], ivh_l);
        if (fm) xm[l] = mul_rn(mf[l], ivh_l);
        xr[l] = factor_feature(a[l], vb);
        xc[l] = factor_feature(b[l], vb);
      }
    } else {
      PYOPTK_LANES
      for (int l = 0; l < L; ++l) {
        // vhat = u; row = col = rsqrt(u/vbar + floor)
        const S ivh_l = rsqrt_rn(add_rn(a[l], c.eps));
        if (KeepIvh) iv[l] = ivh_l;
        xg[l] = mul_rn(g[l], ivh_l);
        if (fm) xm[l] = mul_rn(mf[l], ivh_l);
        const S rf = factor_feature(a[l], vb);
        xr[l] = rf;
        xc[l] = rf;
      }
    }
  }
}

template <typename S, int L>
PYOPTK_HD void mlp_features(const MLPDims& dm, const MLPConsts<S>& c,
                            const MLPTensorScalars<S>& ts, const S* PYOPTK_RESTRICT g,
                            const S* PYOPTK_RESTRICT p, const S* PYOPTK_RESTRICT m,
                            const S* PYOPTK_RESTRICT v, const S* PYOPTK_RESTRICT fa,
                            const S* PYOPTK_RESTRICT fb, S* PYOPTK_RESTRICT x,
                            S* PYOPTK_RESTRICT work) {
  mlp_planes<S, L>(dm, g, p, m, v, c.eps, x);
  mlp_scale_planes<S, L>(dm, ts.scale, x, x);
  mlp_scale_free_features<S, L>(dm, c, ts, g, m, fa, fb, x, work);
}

// ---- time features folded into the first layer's bias --------------------------------
// time_j = tanh(t/tau_j - 1) (mlp_time_feature), t = this update's step number
// (steps + 1), t/tau_j - 1 in S as the reference; tanh evaluated in double and rounded
// once. Then
//   b0'[h] = b0[h] + sum_j time_j * w0[NE + j][h]       (sum in double, rounded once)
// w0 is (D = NE + T, H0) row-major. On the host this is O(T*H0) per tensor.
template <typename S>
PYOPTK_HD S mlp_time_feature(S t, S tau) {
  const S x = sub_rn(div_rn(t, tau), S(1));
  return static_cast<S>(tanh(static_cast<double>(x)));
}

template <typename S>
PYOPTK_HD void mlp_folded_bias(S t, const S* timescales, int T, const S* w0, const S* b0,
                               int NE, int H0, S* out) {
  for (int h = 0; h < H0; ++h) {
    double acc = static_cast<double>(b0[h]);
    for (int j = 0; j < T; ++j) {
      const S tf = mlp_time_feature(t, timescales[j]);
      acc += static_cast<double>(tf) * static_cast<double>(w0[(NE + j) * H0 + h]);
    }
    out[h] = static_cast<S>(acc);
  }
}

// ---- the MLP forward --------------------------------------------------------------------
// One dense layer on a block: out[j][l] = act(bias[j] + sum_d w[d][j] * in[d][l]),
// w row-major (din, dout) as the meta-parameters (h = x @ w + b). The sum starts at the
// bias and adds the terms in d order with fused multiply-adds, for every j and l (BJ
// outputs are computed together only to keep independent accumulators in registers).
template <typename S, int L, int BJ>
PYOPTK_HD void mlp_layer_cols(const S* PYOPTK_RESTRICT in, int din, const S* PYOPTK_RESTRICT w,
                              int dout, const S* PYOPTK_RESTRICT bias, int j0, bool act,
                              S* PYOPTK_RESTRICT out) {
  S acc[BJ][L];
#if !defined(__CUDACC__)
#pragma GCC unroll 8
#endif
  for (int jj = 0; jj < BJ; ++jj) {
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) acc[jj][l] = bias[j0 + jj];
  }
  for (int d = 0; d < din; ++d) {
    const S* xr = in + d * L;
    const S* wr = w + d * dout + j0;
#if !defined(__CUDACC__)
#pragma GCC unroll 8
#endif
    for (int jj = 0; jj < BJ; ++jj) {
      const S wv = wr[jj];
      PYOPTK_LANES
      for (int l = 0; l < L; ++l) acc[jj][l] = fma_rn(wv, xr[l], acc[jj][l]);
    }
  }
#if !defined(__CUDACC__)
#pragma GCC unroll 8
#endif
  for (int jj = 0; jj < BJ; ++jj) {
    PYOPTK_LANES
    for (int l = 0; l < L; ++l) out[(j0 + jj) * L + l] = act ? relu(acc[jj][l]) : acc[jj][l];
  }
}

template <typename S, int L>
PYOPTK_HD void mlp_layer(const S* PYOPTK_RESTRICT in, int din, const S* PYOPTK_RESTRICT w,
                         int dout, const S* PYOPTK_RESTRICT bias, bool act,
                         S* PYOPTK_RESTRICT out) {
  int j = 0;
  for (; j + 6 <= dout; j += 6) mlp_layer_cols<S, L, 6>(in, din, w, dout, bias, j, act, out);
  for (; j + 4 <= dout; j += 4) mlp_layer_cols<S, L, 4>(in, din, w, dout, bias, j, act, out);
  for (; j + 2 <= dout; j += 2) mlp_layer_cols<S, L, 2>(in, din, w, dout, bias, j, act, out);
  for (; j < dout; ++j) mlp_layer_cols<S, L, 1>(in, din, w, dout, bias, j, act, out);
}

// The whole MLP on a block: x (n_in x L) -> ReLU hidden layers -> out (2 x L).
//   n_in: the element features in x (NE: the first layer reads rows 0..n_in-1 of w0;
//         its time rows are folded into b[0])
//   n_layers: number of Linear layers (>= 1); widths[0..n_layers]: D, H0, ..., 2
//   w[i], b[i]: layer i's (widths[i], widths[i+1]) weight and bias; b[0] is normally the
//               folded bias b0' (mlp_folded_bias), and w[0] is only read for its first
//               widths[0] rows (the time rows are in b0')
//   hidden: 2 * max(hidden widths) * L scratch; the activations of hidden layer i end up
//           in hidden + (i % 2) * max_width * L (the fused backward recomputes them)
//   out: 2 x L (direction, magnitude)
template <typename S, int L>
PYOPTK_HD void mlp_forward(const S* x, int n_in, int n_layers, const int64_t* widths,
                           const S* const* w, const S* const* b, S* hidden, int max_width,
                           S* out) {
  const S* in = x;
  for (int i = 0; i < n_layers; ++i) {
    const bool last = i == n_layers - 1;
    S* dst = last ? out : hidden + (i % 2) * max_width * L;
    const int din = i == 0 ? n_in : static_cast<int>(widths[i]);
    mlp_layer<S, L>(in, din, w[i], static_cast<int>(widths[i + 1]), b[i], !last, dst);
    in = dst;
  }
}

// ---- the step -------------------------------------------------------------------------
// p - coef*(d*exp(alpha*a) + wd*p), each operation rounded as the reference's tensor ops;
// coef = lr*step_mult rounded to S (mlp_step_coef). Split in three so that a CPU loop can
// vectorize the parts around the exp: mlp_exp_arg -> exp_ -> mlp_apply_exp.
template <typename S>
PYOPTK_HD S mlp_exp_arg(S a, const MLPConsts<S>& c) {
  return mul_rn(c.exp_mult, a);
}
template <typename S>
PYOPTK_HD S mlp_apply_exp(S p, S d, S e, S coef, const MLPConsts<S>& c) {
  const S upd = add_rn(mul_rn(d, e), mul_rn(c.weight_decay, p));
  return sub_rn(p, mul_rn(coef, upd));
}
template <typename S>
PYOPTK_HD S mlp_apply(S p, S d, S a, S coef, const MLPConsts<S>& c) {
  return mlp_apply_exp(p, d, exp_(mlp_exp_arg(a, c)), coef, c);
}

template <typename S>
PYOPTK_HD S mlp_step_coef(S lr, S step_mult) {
  return mul_rn(lr, step_mult);
}

// Per-plane scale from the tensor's sum of squares (accumulated in double):
// rsqrt(sum/n + norm_eps), evaluated in double and rounded once.
PYOPTK_HD double mlp_plane_scale(double sum_sq, double n, double norm_eps) {
  return 1.0 / sqrt(sum_sq / n + norm_eps);
}

}  // namespace mlp
}  // namespace pyoptk
