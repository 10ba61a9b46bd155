// Per-element math of the fused *backward* of the differentiable learned-MLP step
// (torch.ops.pyoptk.mlp_step; its forward is mlp_update_). The specification is autograd
// through pyoptk.ops.mlp_update.mlp_update_one; docs/learned.md derives the terms.
//
// Self-contained on purpose (prefix msg_, "mlp step grad"): the forward kernel's own
// per-element functions live in mlp_update_math.h and the two are to be unified. Every
// function is templated on the compute type T (float for float32 runs, double for
// float64 gradcheck runs) and is __host__ __device__ so a CUDA backward can reuse it.
//
// Notation, per parameter tensor of n elements viewed (rows, cols) when it has 2+ dims:
//   m_k = b_k m0_k + (1-b_k) g, v_j = r_j v0_j + (1-r_j) g^2, isv_j = rsqrt(v_j + eps)
//   planes P (N = 2+K+R+K*R+R): g, p, m_k, v_j, m_k*isv_j (k-major), isv_j
//   normed_i = P_i * s_i with the per-tensor s_i = rsqrt(mean(P_i^2) + norm_eps)
//   factored (2+ dims): R_f[r], C_f[c] (new row/col accumulators), vbar_f = mean(R_f),
//     vhat = R C / vbar, rowf = rsqrt(R/vbar), colf = rsqrt(C/vbar)
//   0/1 dims: U_f = a_f u0_f + (1-a_f)(g^2 + fac_eps), vbar_f = mean(U_f), vhat = U,
//     rowf = colf = rsqrt(U/vbar)
//   x = [normed (N), log-sign of normed_0 (2), g*ivh_f (F), m_fmi*ivh_f (F or 0),
//        rowf (F), colf (F)]   (ivh_f = rsqrt(vhat_f + eps)); time features are folded
//        into the first layer's bias.
#pragma once

#include <cmath>
#include <cstdint>

#include "pyoptk/common.h"

namespace pyoptk {

// Largest feature configuration the fused backward takes (the Python side declines
// others and runs autograd over the reference).
constexpr int kMsgMaxMom = 8;
constexpr int kMsgMaxRms = 4;
constexpr int kMsgMaxFac = 8;
constexpr int kMsgMaxPlanes = 2 + kMsgMaxMom + kMsgMaxRms + kMsgMaxMom * kMsgMaxRms + kMsgMaxRms;

// Per-call constants (compute type T).
template <typename T>
struct MsgScalars {
  int K, R, F;          // momentum, RMS, factored decays
  int fmi;              // momentum plane of the factored-momentum features, -1 none
  int N;                // normalized planes
  int n_elem;           // per-element features (rows of w0 used per element)
  T log_sign_k, log_sign_thr, log_sign_ek;  // k, e^-k, e^k
  T eps, norm_eps, fac_eps;
  T exp_mult, step_mult, lr, weight_decay;
  const T* dec;         // (K+R+F,) decays: momentum, RMS, factored
};

// Per-tensor view: inputs, finalized statistics of the forward, row/col arrays.
template <typename T>
struct MsgTensor {
  int64_t n, rows, cols;
  bool factored;
  const T *p, *g, *m0, *v0, *fr0, *fc0;
  const T* s;                  // (N,) normalization scales
  const T* vbar;               // (F,)
  const T *Rf, *Cf;            // (F, rows), (F, cols): new accumulators (factored)
  const T *rowf, *colf;        // (F, rows), (F, cols): rsqrt(R/vbar), rsqrt(C/vbar)
};

// Everything the backward needs of one element, recomputed from the inputs.
template <typename T>
struct MsgElem {
  T g, p;
  T m0[kMsgMaxMom], v0[kMsgMaxRms];  // the old accumulators (inputs)
  T m[kMsgMaxMom], v[kMsgMaxRms], isv[kMsgMaxRms];
  T P[kMsgMaxPlanes];
  T ivh[kMsgMaxFac];   // rsqrt(vhat + eps)
  T rowf[kMsgMaxFac], colf[kMsgMaxFac];
  T Rr[kMsgMaxFac], Cc[kMsgMaxFac];  // factored: R_f[r], C_f[c]
  T U[kMsgMaxFac], u0[kMsgMaxFac];   // 0/1 dims: new and old full accumulators
};

template <typename T>
PYOPTK_HD T msg_rsqrt(T x) {
  return T(1) / std::sqrt(x);
}

// d*acc + (1-d)*x, the reference's ema (same operation order).
template <typename T>
PYOPTK_HD T msg_ema(T d, T acc, T x) {
  return d * acc + (T(1) - d) * x;
}

// y = rsqrt(x): dy/dx = -0.5 y^3.
template <typename T>
PYOPTK_HD T msg_rsqrt_vjp(T y, T dy) {
  return dy * (T(-0.5) * y * y * y);
}

// Log-and-sign of x: (log|x|/k, sign x) if |x| >= e^-k, else (-1, e^k x).
template <typename T>
PYOPTK_HD void msg_log_sign(T x, const MsgScalars<T>& s, T& lg, T& sg) {
  const T ax = std::fabs(x);
  const bool big = ax >= s.log_sign_thr;
  lg = big ? std::log(ax) / s.log_sign_k : T(-1);
  sg = big ? (x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0))) : x * s.log_sign_ek;
}

// d/dx of (lg, sg) against their cotangents: 1/(k x) · dlg when |x| >= e^-k (the clamp
// passes the gradient at equality, as torch.clamp), e^k · dsg below.
template <typename T>
PYOPTK_HD T msg_log_sign_vjp(T x, const MsgScalars<T>& s, T dlg, T dsg) {
  const bool big = std::fabs(x) >= s.log_sign_thr;
  return big ? dlg / (s.log_sign_k * x) : dsg * s.log_sign_ek;
}

// Recomputes the element's accumulators and normalized planes (not yet scaled).
template <typename T>
PYOPTK_HD void msg_recompute_planes(const MsgScalars<T>& s, const MsgTensor<T>& t, int64_t e,
                                    MsgElem<T>& el) {
  const int K = s.K, R = s.R;
  const T g = t.g[e], p = t.p[e];
  el.g = g;
  el.p = p;
  for (int k = 0; k < K; ++k) {
    el.m0[k] = t.m0[k * t.n + e];
    el.m[k] = msg_ema(s.dec[k], el.m0[k], g);
  }
  const T g2 = g * g;
  for (int j = 0; j < R; ++j) {
    el.v0[j] = t.v0[j * t.n + e];
    el.v[j] = msg_ema(s.dec[K + j], el.v0[j], g2);
    el.isv[j] = msg_rsqrt(el.v[j] + s.eps);
  }
  int i = 0;
  el.P[i++] = g;
  el.P[i++] = p;
  for (int k = 0; k < K; ++k) el.P[i++] = el.m[k];
  for (int j = 0; j < R; ++j) el.P[i++] = el.v[j];
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < R; ++j) el.P[i++] = el.m[k] * el.isv[j];
  for (int j = 0; j < R; ++j) el.P[i++] = el.isv[j];
}

// Recomputes the factored quantities of element e at (r, c).
template <typename T>
PYOPTK_HD void msg_recompute_factored(const MsgScalars<T>& s, const MsgTensor<T>& t, int64_t e,
                                      int64_t r, int64_t c, MsgElem<T>& el) {
  const int F = s.F, KR = s.K + s.R;
  const T g2e = el.g * el.g + s.fac_eps;
  for (int f = 0; f < F; ++f) {
    T vhat;
    if (t.factored) {
      el.Rr[f] = t.Rf[f * t.rows + r];
      el.Cc[f] = t.Cf[f * t.cols + c];
      vhat = el.Rr[f] * el.Cc[f] / t.vbar[f];
      el.rowf[f] = t.rowf[f * t.rows + r];
      el.colf[f] = t.colf[f * t.cols + c];
    } else {
      el.u0[f] = t.fr0[f * t.n + e];
      el.U[f] = msg_ema(s.dec[KR + f], el.u0[f], g2e);
      vhat = el.U[f];
      el.rowf[f] = msg_rsqrt(el.U[f] / t.vbar[f]);
      el.colf[f] = el.rowf[f];
    }
    el.ivh[f] = msg_rsqrt(vhat + s.eps);
  }
}

// The MLP's per-element inputs x[i * stride] (i < n_elem) from a recomputed element.
template <typename T>
PYOPTK_HD void msg_features(const MsgScalars<T>& s, const MsgTensor<T>& t, const MsgElem<T>& el,
                            T* x, int64_t stride) {
  const int N = s.N, F = s.F;
  for (int i = 0; i < N; ++i) x[i * stride] = el.P[i] * t.s[i];
  int i = N;
  T lg, sg;
  msg_log_sign(el.P[0] * t.s[0], s, lg, sg);
  x[(i++) * stride] = lg;
  x[(i++) * stride] = sg;
  for (int f = 0; f < F; ++f) x[(i++) * stride] = el.g * el.ivh[f];
  if (s.fmi >= 0)
    for (int f = 0; f < F; ++f) x[(i++) * stride] = el.m[s.fmi] * el.ivh[f];
  for (int f = 0; f < F; ++f) x[(i++) * stride] = el.rowf[f];
  for (int f = 0; f < F; ++f) x[(i++) * stride] = el.colf[f];
}

// Chains the cotangents of the (unscaled) planes dP back to g, p, m_k, v_j, given extra
// cotangents dm, dv already accumulated on m_k, v_j (e.g. from the outputs and the
// factored-momentum features), then through the momentum/RMS EMAs to the inputs:
// returns the contributions to dg and dp and writes dm0_k, dv0_j; adds the decay
// cotangents to ddec (momentum, RMS parts).
template <typename T>
PYOPTK_HD void msg_planes_vjp(const MsgScalars<T>& s, const MsgElem<T>& el, const T* dP,
                              T* dm, T* dv, T& dg, T& dp, T* dm0, T* dv0, double* ddec) {
  const int K = s.K, R = s.R;
  T disv[kMsgMaxRms];
  int i = 0;
  dg += dP[i++];
  dp += dP[i++];
  for (int k = 0; k < K; ++k) dm[k] += dP[i++];
  for (int j = 0; j < R; ++j) {
    dv[j] += dP[i++];
    disv[j] = T(0);
  }
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < R; ++j) {
      const T d = dP[i++];
      dm[k] += d * el.isv[j];
      disv[j] += d * el.m[k];
    }
  for (int j = 0; j < R; ++j) disv[j] += dP[i++];
  for (int j = 0; j < R; ++j) dv[j] += msg_rsqrt_vjp(el.isv[j], disv[j]);
  for (int k = 0; k < K; ++k) {
    const T b = s.dec[k];
    dm0[k] = b * dm[k];
    dg += (T(1) - b) * dm[k];
    ddec[k] += static_cast<double>(dm[k] * (el.m0[k] - el.g));
  }
  const T g2 = el.g * el.g;
  for (int j = 0; j < R; ++j) {
    const T rho = s.dec[K + j];
    dv0[j] = rho * dv[j];
    dg += T(2) * el.g * ((T(1) - rho) * dv[j]);
    ddec[K + j] += static_cast<double>(dv[j] * (el.v0[j] - g2));
  }
}

}  // namespace pyoptk
