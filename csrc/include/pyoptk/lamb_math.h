// LAMB per-element math (one copy for the CPU loops and the CUDA kernels).
//
// pyoptk.ops.lamb.lamb_reference, fp32 element math:
//   g = maximize ? -g : g
//   m = lerp(m, g, 1-b1) ; v = b2*v + (1-b2)*g*g
//   u = (m/bc1) / (sqrt(v/bc2) + eps) + wd*p       (bc1 = bc2 = 1 without bias correction)
//   w = ||p|| ; un = ||u|| (per tensor, p before the update)
//   phi = min(w, clamp) ; r = (phi > 0 && un > 0) ? phi/un : 1 ; r = 1 in adam mode
//   p = p - (lr*r) * u
// Pass 1 (lamb_moments) updates m, v and returns u so the caller accumulates p^2, u^2;
// pass 2 (lamb_recompute_u) recomputes the identical u from the stored m, v and the
// unchanged p, and lamb_apply applies it.
#pragma once

#include <cmath>

#include "pyoptk/adamw_math.h"  // lerp_like_torch
#include "pyoptk/common.h"

namespace pyoptk {

struct LambParams {
  double lr;
  const float* lr_ptr;
  double beta1, beta2, eps, weight_decay;
  bool bias_correction;
  bool adam;
  double clamp_value;  // may be +inf
};

struct LambScalars {
  float lerp_base_g, lerp_coef;  // torch lerp with weight 1-b1 (see adamw_math.h)
  float beta2, one_minus_beta2;
  float bc1, bc2;  // 1 - b^t, or 1 without bias correction (division by 1 is exact)
  float eps;
  float weight_decay;
  float lr;  // effective lr in fp32 (the reference's lr.to(ct))
};

PYOPTK_HD LambScalars lamb_scalars(float step, double lr, const LambParams& hp) {
  LambScalars s;
  const float w = static_cast<float>(1.0 - hp.beta1);
  const bool small = fabsf(w) < 0.5f;
  s.lerp_base_g = small ? 0.0f : 1.0f;
  s.lerp_coef = small ? w : w - 1.0f;
  s.beta2 = static_cast<float>(hp.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - hp.beta2);
  if (hp.bias_correction) {
    const double t = static_cast<double>(step);
    s.bc1 = static_cast<float>(1.0 - pow(hp.beta1, t));
    s.bc2 = static_cast<float>(1.0 - pow(hp.beta2, t));
  } else {
    s.bc1 = 1.0f;
    s.bc2 = 1.0f;
  }
  s.eps = static_cast<float>(hp.eps);
  s.weight_decay = static_cast<float>(hp.weight_decay);
  s.lr = static_cast<float>(lr);
  return s;
}

// The update direction u from the (already updated) moments and the fp32 param.
PYOPTK_HD float lamb_direction(float p, float m, float v, const LambScalars& s) {
  const float mh = m / s.bc1;
  const float vh = v / s.bc2;
  return mh / (sqrtf(vh) + s.eps) + s.weight_decay * p;
}

// Pass 1 for one element: updates m and v, returns u.
template <bool MAXIMIZE>
PYOPTK_HD float lamb_moments(float p, float g, float& m, float& v, const LambScalars& s) {
  if (MAXIMIZE) g = -g;
  const float m_new = lerp_like_torch(m, g, s.lerp_base_g, s.lerp_coef);
  const float v_new = s.beta2 * v + s.one_minus_beta2 * g * g;
  m = m_new;
  v = v_new;
  return lamb_direction(p, m_new, v_new, s);
}

// Trust ratio of one tensor from its norms (fp32, like the reference).
PYOPTK_HD float lamb_trust_ratio(float w_norm, float u_norm, const LambParams& hp) {
  if (hp.adam) return 1.0f;
  const float clamp = static_cast<float>(hp.clamp_value);
  const float phi = w_norm > clamp ? clamp : w_norm;  // NaN w stays NaN -> r = 1
  return (phi > 0.0f && u_norm > 0.0f) ? phi / u_norm : 1.0f;
}

// Per-tensor step factor lr * r (fp32 product, as the reference's lr.to(ct) * ratio).
PYOPTK_HD float lamb_step_factor(float lr, float ratio) { return lr * ratio; }

// Pass 2 for one element: the new param from u.
PYOPTK_HD float lamb_apply(float p, float u, float step_factor) { return p - step_factor * u; }

}  // namespace pyoptk
