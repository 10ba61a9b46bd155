// Differentiable inner steps (MAML family): per-element forward and vector-Jacobian
// products, the one copy used by the CPU loops (csrc/cpu/inner_step.cpp) and the CUDA
// kernels (csrc/cuda/inner_step.cu). Also declares their entry points.
//
// The specification is pyoptk/ops/inner_step.py (inner_*_reference, inner_*_vjp_reference);
// the operations below follow its order so that fp32 results agree to rounding. T is the
// compute and storage type of every array of a call: float, or double (gradcheck). The
// Python launchers upcast bf16/fp16 params to fp32 copies first.
//
//   SGD      p' = p - lr*g                  d_g = (-lr)*d_p,  d_lr = -sum(d_p*g)
//   MetaSGD  p' = p - a*g                   d_g = (-a)*d_p,   d_a = (-g)*d_p
//   Adam     m' = lerp(m, g, 1-b1)   v' = b2*v + ((1-b2)*g)*g
//            r = safe_sqrt(v')  d = r/s + eps  (s = sqrt(1-b2^t))   c = lr/(1-b1^t)
//            p' = p - (c*m')/d
//     VJP    M = d_m' - (c*d_p)/d
//            V = d_v' + ((((c*d_p)*m')/(d*d))*r'(v'))/s   r'(v') = v' == 0 ? 0 : 0.5/r
//            d_g = ((2(1-b2))*g)*V + (1-b1)*M,  d_m = b1*M,  d_v = b2*V
//            d_lr = -sum(d_p*(m'/d)) / (1-b1^t)
// safe_sqrt is sqrt with derivative 0 instead of +inf at exactly 0: zero gradients on
// zero moments give finite (zero) v' derivatives instead of inf*0 = NaN.
// The sums (d_lr) are per-chunk partials (double on CPU, T on CUDA) that the Python
// launcher adds in chunk order.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "pyoptk/common.h"

namespace pyoptk {

// Host-side hyperparameters of one call (pybind InnerStepConfig).
struct InnerStepConfig {
  double lr = 0.0;
  uintptr_t lr_ptr = 0;    // one element of T on the tensors' device overriding lr, or 0
  double beta1 = 0.9;      // Adam only
  double beta2 = 0.999;
  double eps = 1e-8;
  int64_t step = 1;        // Adam: this update's step number (>= 1)
};

// ---- SGD / MetaSGD -----------------------------------------------------------------
template <typename T>
PYOPTK_HD T inner_sgd_element(T p, T g, T lr) { return p - lr * g; }

// d_g for SGD (lr scalar) and MetaSGD (lr per element): (-lr)*d_p.
template <typename T>
PYOPTK_HD T inner_sgd_d_grad(T lr, T dp) { return (-lr) * dp; }

// MetaSGD d_lr: (-g)*d_p.
template <typename T>
PYOPTK_HD T inner_metasgd_d_lr(T g, T dp) { return (-g) * dp; }

// ---- Adam ----------------------------------------------------------------------------
template <typename T>
struct InnerAdamScalars {
  T c;            // lr / (1 - b1^t)
  T bc2_sqrt;     // sqrt(1 - b2^t)
  T lerp_base_g;  // torch lerp: 0 -> m + w*(g-m) (|w| < 0.5), 1 -> g + (w-1)*(g-m)
  T lerp_coef;    // w or w-1, w = 1-b1
  T w1;           // 1 - b1
  T beta1;
  T beta2;
  T one_minus_beta2;
  T two_one_minus_beta2;  // (1-b2)*2, rounded once
  T eps;
};

// Bias corrections in double, as torch.optim.Adam. A tensor lr (has_lr_t) is divided in
// T, as the reference's `lr_t / bc1` tensor op; a float lr in double.
template <typename T>
PYOPTK_HD InnerAdamScalars<T> inner_adam_scalars(double lr, bool has_lr_t, double beta1,
                                                 double beta2, double eps, int64_t step) {
  InnerAdamScalars<T> s;
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - pow(beta1, t);
  const double bc2 = 1.0 - pow(beta2, t);
  s.c = has_lr_t ? static_cast<T>(lr) / static_cast<T>(bc1) : static_cast<T>(lr / bc1);
  s.bc2_sqrt = static_cast<T>(sqrt(bc2));
  const T w = static_cast<T>(1.0 - beta1);
  const bool small = (w < T(0) ? -w : w) < T(0.5);
  s.lerp_base_g = small ? T(0) : T(1);
  s.lerp_coef = small ? w : w - T(1);
  s.w1 = w;
  s.beta1 = static_cast<T>(beta1);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.two_one_minus_beta2 = static_cast<T>((1.0 - beta2) * 2.0);
  s.eps = static_cast<T>(eps);
  return s;
}

template <typename T>
PYOPTK_HD T inner_sqrt(T x) { return sqrt(x); }
template <>
PYOPTK_HD float inner_sqrt<float>(float x) { return sqrtf(x); }

// sqrt with the value of sqrt everywhere (NaN for NaN / negative x) and 0 at 0.
template <typename T>
PYOPTK_HD T safe_sqrt(T x) { return x == T(0) ? T(0) : inner_sqrt(x); }

// Its derivative: 0.5/sqrt(x), and 0 (not +inf) at exactly 0.
template <typename T>
PYOPTK_HD T safe_sqrt_grad(T x, T r) { return x == T(0) ? T(0) : T(0.5) / r; }

template <typename T>
PYOPTK_HD T inner_lerp(T self, T end, const InnerAdamScalars<T>& s) {
  const T base = s.lerp_base_g != T(0) ? end : self;
  return base + s.lerp_coef * (end - self);
}

// The new moments m', v' of one element.
template <typename T>
PYOPTK_HD void inner_adam_moments(T g, T m, T v, const InnerAdamScalars<T>& s, T& m2, T& v2) {
  m2 = inner_lerp(m, g, s);
  v2 = v * s.beta2 + s.one_minus_beta2 * g * g;
}

// Forward of one element: returns p', writes m', v'.
template <typename T>
PYOPTK_HD T inner_adam_element(T p, T g, T m, T v, const InnerAdamScalars<T>& s, T& m2, T& v2) {
  inner_adam_moments(g, m, v, s, m2, v2);
  const T d = safe_sqrt(v2) / s.bc2_sqrt + s.eps;
  return p - (s.c * m2) / d;
}

// VJP of one element (d_p passes through, not computed here). Writes d_g, d_m, d_v and
// returns this element's term of sum(d_p * (m'/d)) (d_lr = -sum / (1 - b1^t)).
template <typename T>
PYOPTK_HD T inner_adam_vjp_element(T g, T m, T v, T dp, T dm2, T dv2,
                                   const InnerAdamScalars<T>& s, T& d_g, T& d_m, T& d_v) {
  T m2, v2;
  inner_adam_moments(g, m, v, s, m2, v2);
  const T r = safe_sqrt(v2);
  const T dr = safe_sqrt_grad(v2, r);
  const T d = r / s.bc2_sqrt + s.eps;
  const T cdp = s.c * dp;
  const T M = dm2 - cdp / d;
  const T V = dv2 + (((cdp * m2) / (d * d)) * dr) / s.bc2_sqrt;
  d_g = (s.two_one_minus_beta2 * g) * V + s.w1 * M;
  d_m = s.beta1 * M;
  d_v = s.beta2 * V;
  return dp * (m2 / d);
}

// ---- entry points (csrc/cpu/inner_step.cpp, csrc/cuda/inner_step.cu) -----------------
// Pointer lists hold one entry per tensor (data_ptr), numels one count per tensor; every
// array is T = double when f64 else float. `lrs` empty: SGD with the scalar lr (cfg.lr
// or *cfg.lr_ptr); else MetaSGD with one lr per element. `partials` (0: not wanted)
// receives one value per chunk of kChunkSize elements (chunks of all tensors in order,
// inner_step_num_chunks of them): double on CPU, T on CUDA. In the Adam backward,
// d_exp_avgs / d_exp_avg_sqs may be empty: zero cotangents, not read.
using InnerPtrList = std::vector<uintptr_t>;
using InnerSizeList = std::vector<int64_t>;

inline int64_t inner_step_num_chunks(const InnerSizeList& numels) {
  int64_t n = 0;
  for (int64_t k : numels) n += num_chunks(k);
  return n;
}

void inner_sgd_cpu(const InnerPtrList& params, const InnerPtrList& grads,
                   const InnerPtrList& lrs, const InnerPtrList& out,
                   const InnerSizeList& numels, bool f64, const InnerStepConfig& cfg);
void inner_sgd_backward_cpu(const InnerPtrList& grads, const InnerPtrList& lrs,
                            const InnerPtrList& d_params, const InnerPtrList& d_grads,
                            const InnerPtrList& d_lrs, const InnerSizeList& numels, bool f64,
                            const InnerStepConfig& cfg, uintptr_t partials);
void inner_adam_cpu(const InnerPtrList& params, const InnerPtrList& grads,
                    const InnerPtrList& exp_avgs, const InnerPtrList& exp_avg_sqs,
                    const InnerPtrList& params_out, const InnerPtrList& exp_avgs_out,
                    const InnerPtrList& exp_avg_sqs_out, const InnerSizeList& numels, bool f64,
                    const InnerStepConfig& cfg);
void inner_adam_backward_cpu(const InnerPtrList& grads, const InnerPtrList& exp_avgs,
                             const InnerPtrList& exp_avg_sqs, const InnerPtrList& d_params,
                             const InnerPtrList& d_exp_avgs, const InnerPtrList& d_exp_avg_sqs,
                             const InnerPtrList& d_grads_out, const InnerPtrList& d_exp_avgs_out,
                             const InnerPtrList& d_exp_avg_sqs_out, const InnerSizeList& numels,
                             bool f64, const InnerStepConfig& cfg, uintptr_t partials);

#ifdef PYOPTK_WITH_CUDA
void inner_sgd_cuda(const InnerPtrList& params, const InnerPtrList& grads,
                    const InnerPtrList& lrs, const InnerPtrList& out,
                    const InnerSizeList& numels, bool f64, const InnerStepConfig& cfg,
                    uintptr_t stream);
void inner_sgd_backward_cuda(const InnerPtrList& grads, const InnerPtrList& lrs,
                             const InnerPtrList& d_params, const InnerPtrList& d_grads,
                             const InnerPtrList& d_lrs, const InnerSizeList& numels, bool f64,
                             const InnerStepConfig& cfg, uintptr_t partials, uintptr_t stream);
void inner_adam_cuda(const InnerPtrList& params, const InnerPtrList& grads,
                     const InnerPtrList& exp_avgs, const InnerPtrList& exp_avg_sqs,
                     const InnerPtrList& params_out, const InnerPtrList& exp_avgs_out,
                     const InnerPtrList& exp_avg_sqs_out, const InnerSizeList& numels, bool f64,
                     const InnerStepConfig& cfg, uintptr_t stream);
void inner_adam_backward_cuda(const InnerPtrList& grads, const InnerPtrList& exp_avgs,
                              const InnerPtrList& exp_avg_sqs, const InnerPtrList& d_params,
                              const InnerPtrList& d_exp_avgs,
                              const InnerPtrList& d_exp_avg_sqs,
                              const InnerPtrList& d_grads_out,
                              const InnerPtrList& d_exp_avgs_out,
                              const InnerPtrList& d_exp_avg_sqs_out,
                              const InnerSizeList& numels, bool f64,
                              const InnerStepConfig& cfg, uintptr_t partials,
                              uintptr_t stream);
#endif

}  // namespace pyoptk
