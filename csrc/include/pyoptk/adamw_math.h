// AdamW per-element math: the one copy used by the CPU loops and the CUDA kernels.
//
// Exactly torch.optim.AdamW (and pyoptk.ops.adamw.adamw_reference): fp32 element math,
// per-step scalars computed in double and rounded to fp32 once per tensor.
//
//   g = maximize ? -g : g
//   p = p * (1 - lr*wd)
//   m = lerp(m, g, 1-b1)                                  (torch's lerp formula)
//   v = b2*v + (1-b2)*g*g
//   vv = amsgrad ? (vmax = max(vmax, v)) : v
//   p = p - (lr/bc1) * m / (sqrt(vv)/sqrt(bc2) + eps)
#pragma once

#include <cmath>

#include "pyoptk/common.h"

namespace pyoptk {

struct AdamWParams {   // the per-call hyperparameters (host and kernel argument)
  double lr;           // used unless lr_ptr is non-null
  const float* lr_ptr; // one float32 on the params' device, or nullptr
  double beta1, beta2, eps, weight_decay;
};

struct AdamWScalars {  // per tensor and step, fp32 like the reference's .to(ct)
  float decay;         // 1 - lr*wd
  float step_size;     // lr / (1 - b1^t)
  float bc2_sqrt;      // sqrt(1 - b2^t)
  float lerp_base_g;   // torch lerp: 0 -> m + w*(g-m) (w < 0.5), 1 -> g - (1-w)*(g-m)
  float lerp_coef;     // w (w < 0.5) or w-1
  float beta2;
  float one_minus_beta2;
  float eps;
};

// Scalars of one tensor for this step. `lr` is the effective learning rate (the value
// at lr_ptr when given). Double math, like the reference's float64 scalar tensors.
PYOPTK_HD AdamWScalars adamw_scalars(float step, double lr, const AdamWParams& hp) {
  AdamWScalars s;
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - pow(hp.beta1, t);
  const double bc2 = 1.0 - pow(hp.beta2, t);
  s.decay = static_cast<float>(1.0 - lr * hp.weight_decay);
  s.step_size = static_cast<float>(lr / bc1);
  s.bc2_sqrt = static_cast<float>(sqrt(bc2));
  const float w = static_cast<float>(1.0 - hp.beta1);
  const bool small = fabsf(w) < 0.5f;
  s.lerp_base_g = small ? 0.0f : 1.0f;
  s.lerp_coef = small ? w : w - 1.0f;
  s.beta2 = static_cast<float>(hp.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - hp.beta2);
  s.eps = static_cast<float>(hp.eps);
  return s;
}

// torch's lerp(self, end, weight) for a scalar weight: self + w*(end-self) when
// |w| < 0.5, else end - (end-self)*(1-w). Written as a select so loops vectorize.
PYOPTK_HD float lerp_like_torch(float self, float end, float base_is_end, float coef) {
  const float base = base_is_end != 0.0f ? end : self;
  return base + coef * (end - self);
}

// One element. p is the parameter in fp32 (caller converts); m, v, vmax updated in
// place. Returns the new parameter value (fp32, caller rounds to the param dtype).
template <bool AMSGRAD, bool MAXIMIZE>
PYOPTK_HD float adamw_element(float p, float g, float& m, float& v, float& vmax,
                              const AdamWScalars& s) {
  if (MAXIMIZE) g = -g;
  p = p * s.decay;
  const float m_new = lerp_like_torch(m, g, s.lerp_base_g, s.lerp_coef);
  const float v_new = s.beta2 * v + s.one_minus_beta2 * g * g;
  m = m_new;
  v = v_new;
  float vv = v_new;
  if (AMSGRAD) {
    vv = nan_max(v_new, vmax);
    vmax = vv;
  }
  const float denom = sqrtf(vv) / s.bc2_sqrt + s.eps;
  return p - (s.step_size * m_new) / denom;
}

}  // namespace pyoptk
