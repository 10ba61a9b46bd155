// Per-element math of the fused *backward* of the differentiable learned-MLP step
// (torch.ops.pyoptk.mlp_step; its forward is mlp_update_). The specification is autograd
// through pyoptk.ops.mlp_update.mlp_update_one; docs/learned.md derives the terms.
//
// Only the backward-specific parts live here (prefix msg_, "mlp step grad"): the
// vector-Jacobian products of the features and accumulators. The forward the backward
// recomputes (accumulators, planes, features, folded bias, MLP) is the forward's own
// code, pyoptk/mlp_update_math.h (DESIGN.md "One copy of the math"), so the backward
// differentiates exactly the operations the forward ran. Every function is templated on
// the compute type T (float for float32 runs, double for float64 gradcheck runs) and is
// __host__ __device__ so a CUDA backward can reuse it.
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

#if defined(__CUDACC__)
#define PYOPTK_LANES_BWD
#else
#define PYOPTK_LANES_BWD _Pragma("omp simd")
#endif

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

// y = rsqrt(x): dy/dx = -0.5 y^3.
template <typename T>
PYOPTK_HD T msg_rsqrt_vjp(T y, T dy) {
  return dy * (T(-0.5) * y * y * y);
}

// d/dx of the log-sign features (log|x|/k, sign x) if |x| >= e^-k, else (-1, e^k x),
// against their cotangents: 1/(k x) · dlg when |x| >= e^-k (the clamp passes the
// gradient at equality, as torch.clamp), e^k · dsg below.
template <typename T>
PYOPTK_HD T msg_log_sign_vjp(T x, const MsgScalars<T>& s, T dlg, T dsg) {
  const bool big = std::fabs(x) >= s.log_sign_thr;
  return big ? dlg / (s.log_sign_k * x) : dsg * s.log_sign_ek;
}

// Chains the cotangents of the (unscaled) planes dP back to g, p, m_k, v_j, given extra
// cotangents dm, dv already accumulated on m_k, v_j (e.g. from the outputs and the
// factored-momentum features), then through the momentum/RMS EMAs to the inputs:
// returns the contributions to dg and dp and writes dm0_k, dv0_j; adds the decay
// cotangents to ddec (momentum, RMS parts).
// The element's recomputed forward is read from plane-major lane arrays (stride L, the
// layout of mlp_update_math.h): P[i * L] its unscaled planes (mlp_planes: m_k at plane
// 2+k, isv_j at plane 2+K+R+K*R+j), m0[k * L], v0[j * L] the old accumulators.
template <typename T>
PYOPTK_HD void msg_planes_vjp(const MsgScalars<T>& s, T g, const T* P, const T* m0,
                              const T* v0, int L, const T* dP, T* dm, T* dv, T& dg, T& dp,
                              T* dm0, T* dv0, double* ddec) {
  const int K = s.K, R = s.R;
  const int o_isv = 2 + K + R + K * R;
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
      dm[k] += d * P[(o_isv + j) * L];
      disv[j] += d * P[(2 + k) * L];
    }
  for (int j = 0; j < R; ++j) disv[j] += dP[i++];
  for (int j = 0; j < R; ++j) dv[j] += msg_rsqrt_vjp(P[(o_isv + j) * L], disv[j]);
  for (int k = 0; k < K; ++k) {
    const T b = s.dec[k];
    dm0[k] = b * dm[k];
    dg += (T(1) - b) * dm[k];
    ddec[k] += static_cast<double>(dm[k] * (m0[k * L] - g));
  }
  const T g2 = g * g;
  for (int j = 0; j < R; ++j) {
    const T rho = s.dec[K + j];
    dv0[j] = rho * dv[j];
    dg += T(2) * g * ((T(1) - rho) * dv[j]);
    ddec[K + j] += static_cast<double>(dv[j] * (v0[j * L] - g2));
  }
}

// msg_planes_vjp on a block of L lanes at once (plane-major lane arrays, as the forward's
// math): the same operations per lane in the same order, so every lane's results equal
// msg_planes_vjp's. dP (N*L), dm (K*L), dv (R*L) cotangents in (dm, dv updated); dg, dp
// (L) added to; dm0 (K*L), dv0 (R*L) written; ddec ((K+R)*L, double) per-lane decay
// partials, added to for lanes < nb only (the caller combines the lanes in a fixed order).
template <typename T, int L>
PYOPTK_HD void msg_planes_vjp_lanes(const MsgScalars<T>& s, const T* PYOPTK_RESTRICT g,
                                    const T* PYOPTK_RESTRICT P, const T* PYOPTK_RESTRICT m0,
                                    const T* PYOPTK_RESTRICT v0, const T* PYOPTK_RESTRICT dP,
                                    T* PYOPTK_RESTRICT dm, T* PYOPTK_RESTRICT dv,
                                    T* PYOPTK_RESTRICT dg, T* PYOPTK_RESTRICT dp,
                                    T* PYOPTK_RESTRICT dm0, T* PYOPTK_RESTRICT dv0,
                                    double* PYOPTK_RESTRICT ddec, int nb) {
  const int K = s.K, R = s.R;
  const int o_isv = 2 + K + R + K * R;
  T disv[kMsgMaxRms * L];
  PYOPTK_LANES_BWD
  for (int l = 0; l < L; ++l) {
    dg[l] += dP[l];
    dp[l] += dP[L + l];
  }
  for (int k = 0; k < K; ++k) {
    PYOPTK_LANES_BWD
    for (int l = 0; l < L; ++l) dm[k * L + l] += dP[(2 + k) * L + l];
  }
  for (int j = 0; j < R; ++j) {
    PYOPTK_LANES_BWD
    for (int l = 0; l < L; ++l) {
      dv[j * L + l] += dP[(2 + K + j) * L + l];
      disv[j * L + l] = T(0);
    }
  }
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < R; ++j) {
      const T* d = dP + (2 + K + R + k * R + j) * L;
      PYOPTK_LANES_BWD
      for (int l = 0; l < L; ++l) {
        dm[k * L + l] += d[l] * P[(o_isv + j) * L + l];
        disv[j * L + l] += d[l] * P[(2 + k) * L + l];
      }
    }
  for (int j = 0; j < R; ++j) {
    PYOPTK_LANES_BWD
    for (int l = 0; l < L; ++l) disv[j * L + l] += dP[(o_isv + j) * L + l];
  }
  for (int j = 0; j < R; ++j) {
    PYOPTK_LANES_BWD
    for (int l = 0; l < L; ++l)
      dv[j * L + l] += msg_rsqrt_vjp(P[(o_isv + j) * L + l], disv[j * L + l]);
  }
  for (int k = 0; k < K; ++k) {
    const T b = s.dec[k], omb = T(1) - b;
    PYOPTK_LANES_BWD
    for (int l = 0; l < L; ++l) {
      const T d = dm[k * L + l];
      dm0[k * L + l] = b * d;
      dg[l] += omb * d;
      const double q = static_cast<double>(d * (m0[k * L + l] - g[l]));
      ddec[k * L + l] += l < nb ? q : 0.0;
    }
  }
  for (int j = 0; j < R; ++j) {
    const T rho = s.dec[K + j], omr = T(1) - rho;
    PYOPTK_LANES_BWD
    for (int l = 0; l < L; ++l) {
      const T d = dv[j * L + l];
      dv0[j * L + l] = rho * d;
      dg[l] += T(2) * g[l] * (omr * d);
      const double q = static_cast<double>(d * (v0[j * L + l] - g[l] * g[l]));
      ddec[(K + j) * L + l] += l < nb ? q : 0.0;
    }
  }
}

}  // namespace pyoptk
