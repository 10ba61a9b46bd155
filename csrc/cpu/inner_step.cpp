// Differentiable inner steps (SGD, MetaSGD, Adam) on CPU: forward and fused backward,
// one OpenMP loop over fixed-size chunks of all tensors of the call. The element math is
// pyoptk/inner_step_math.h, shared with the CUDA kernels. float and double.
#include <vector>

#include "cpu_util.h"
#include "pyoptk/inner_step_math.h"

namespace pyoptk {
namespace {

template <typename T>
T effective_lr(const InnerStepConfig& cfg) {
  return cfg.lr_ptr ? *cpu::as_ptr<const T>(cfg.lr_ptr) : static_cast<T>(cfg.lr);
}

// ---- SGD / MetaSGD -------------------------------------------------------------------
template <typename T, bool PER_ELEMENT>
struct SgdSpan {
  PYOPTK_LOOP void run(const T* PYOPTK_RESTRICT p, const T* PYOPTK_RESTRICT g,
                       const T* PYOPTK_RESTRICT a, T* PYOPTK_RESTRICT out, int64_t n, T lr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = inner_sgd_element(p[i], g[i], PER_ELEMENT ? a[i] : lr);
  }
};

// d_g (and, MetaSGD, d_a) of one span; returns sum(d_p*g) in kLanes double lanes
// (SGD with a tensor lr only: WANT_SUM).
template <typename T, bool PER_ELEMENT, bool WANT_SUM>
struct SgdGradSpan {
  PYOPTK_LOOP double run(const T* PYOPTK_RESTRICT g, const T* PYOPTK_RESTRICT a,
                         const T* PYOPTK_RESTRICT dp, T* PYOPTK_RESTRICT dg,
                         T* PYOPTK_RESTRICT da, int64_t n, T lr) {
    double lanes[cpu::kLanes] = {};
    const int64_t nv = n - n % cpu::kLanes;
    for (int64_t i0 = 0; i0 < nv; i0 += cpu::kLanes) {
#pragma omp simd
      for (int k = 0; k < cpu::kLanes; ++k) {
        const int64_t i = i0 + k;
        dg[i] = inner_sgd_d_grad(PER_ELEMENT ? a[i] : lr, dp[i]);
        if (PER_ELEMENT) da[i] = inner_metasgd_d_lr(g[i], dp[i]);
        if (WANT_SUM) lanes[k] += static_cast<double>(dp[i] * g[i]);
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      dg[i] = inner_sgd_d_grad(PER_ELEMENT ? a[i] : lr, dp[i]);
      if (PER_ELEMENT) da[i] = inner_metasgd_d_lr(g[i], dp[i]);
      if (WANT_SUM) lanes[i - nv] += static_cast<double>(dp[i] * g[i]);
    }
    return cpu::combine_lanes(lanes);
  }
};

template <typename T>
void sgd_impl(const InnerPtrList& params, const InnerPtrList& grads, const InnerPtrList& lrs,
              const InnerPtrList& out, const InnerSizeList& numels, const InnerStepConfig& cfg) {
  const T lr = effective_lr<T>(cfg);
  const bool per_element = !lrs.empty();
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
  cpu::parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    const T* p = cpu::as_ptr<const T>(params[t]) + ch.begin;
    const T* g = cpu::as_ptr<const T>(grads[t]) + ch.begin;
    T* o = cpu::as_ptr<T>(out[t]) + ch.begin;
    if (per_element) {
      cpu::run_loop<SgdSpan<T, true>>(p, g, cpu::as_ptr<const T>(lrs[t]) + ch.begin, o, ch.len, lr);
    } else {
      cpu::run_loop<SgdSpan<T, false>>(p, g, static_cast<const T*>(nullptr), o, ch.len, lr);
    }
  });
}

template <typename T>
void sgd_backward_impl(const InnerPtrList& grads, const InnerPtrList& lrs,
                       const InnerPtrList& d_params, const InnerPtrList& d_grads,
                       const InnerPtrList& d_lrs, const InnerSizeList& numels,
                       const InnerStepConfig& cfg, uintptr_t partials) {
  const bool per_element = !lrs.empty();
  const T lr = per_element ? T(0) : effective_lr<T>(cfg);
  double* part = cpu::as_ptr<double>(partials);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
  cpu::parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    const T* g = cpu::as_ptr<const T>(grads[t]) + ch.begin;
    const T* dp = cpu::as_ptr<const T>(d_params[t]) + ch.begin;
    T* dg = cpu::as_ptr<T>(d_grads[t]) + ch.begin;
    if (per_element) {
      cpu::run_loop<SgdGradSpan<T, true, false>>(g, cpu::as_ptr<const T>(lrs[t]) + ch.begin, dp,
                                                 dg, cpu::as_ptr<T>(d_lrs[t]) + ch.begin,
                                                 ch.len, lr);
    } else if (part != nullptr) {
      part[c] = cpu::run_loop<SgdGradSpan<T, false, true>>(
          g, static_cast<const T*>(nullptr), dp, dg, static_cast<T*>(nullptr), ch.len, lr);
    } else {
      cpu::run_loop<SgdGradSpan<T, false, false>>(g, static_cast<const T*>(nullptr), dp, dg,
                                                  static_cast<T*>(nullptr), ch.len, lr);
    }
  });
}

// ---- Adam ----------------------------------------------------------------------------
template <typename T>
struct AdamSpan {
  PYOPTK_LOOP void run(const T* PYOPTK_RESTRICT p, const T* PYOPTK_RESTRICT g,
                       const T* PYOPTK_RESTRICT m, const T* PYOPTK_RESTRICT v,
                       T* PYOPTK_RESTRICT po, T* PYOPTK_RESTRICT mo, T* PYOPTK_RESTRICT vo,
                       int64_t n, const InnerAdamScalars<T>* sp) {
    const InnerAdamScalars<T> s = *sp;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T m2, v2;
      po[i] = inner_adam_element(p[i], g[i], m[i], v[i], s, m2, v2);
      mo[i] = m2;
      vo[i] = v2;
    }
  }
};

// HAS_DM / HAS_DV false: that output cotangent is zero (not passed).
template <typename T, bool WANT_SUM, bool HAS_DM, bool HAS_DV>
struct AdamGradSpan {
  PYOPTK_LOOP double run(const T* PYOPTK_RESTRICT g, const T* PYOPTK_RESTRICT m,
                         const T* PYOPTK_RESTRICT v, const T* PYOPTK_RESTRICT dp,
                         const T* PYOPTK_RESTRICT dm, const T* PYOPTK_RESTRICT dv,
                         T* PYOPTK_RESTRICT dgo, T* PYOPTK_RESTRICT dmo, T* PYOPTK_RESTRICT dvo,
                         int64_t n, const InnerAdamScalars<T>* sp) {
    const InnerAdamScalars<T> s = *sp;
    double lanes[cpu::kLanes] = {};
    const int64_t nv = n - n % cpu::kLanes;
    for (int64_t i0 = 0; i0 < nv; i0 += cpu::kLanes) {
#pragma omp simd
      for (int k = 0; k < cpu::kLanes; ++k) {
        const int64_t i = i0 + k;
        T a, b, c;
        const T term = inner_adam_vjp_element(g[i], m[i], v[i], dp[i], HAS_DM ? dm[i] : T(0),
                                                 HAS_DV ? dv[i] : T(0), s, a, b, c);
        dgo[i] = a;
        dmo[i] = b;
        dvo[i] = c;
        if (WANT_SUM) lanes[k] += static_cast<double>(term);
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      T a, b, c;
      const T term = inner_adam_vjp_element(g[i], m[i], v[i], dp[i], HAS_DM ? dm[i] : T(0),
                                                 HAS_DV ? dv[i] : T(0), s, a, b, c);
      dgo[i] = a;
      dmo[i] = b;
      dvo[i] = c;
      if (WANT_SUM) lanes[i - nv] += static_cast<double>(term);
    }
    return cpu::combine_lanes(lanes);
  }
};

template <typename T>
InnerAdamScalars<T> adam_scalars(const InnerStepConfig& cfg) {
  const double lr = cfg.lr_ptr ? static_cast<double>(*cpu::as_ptr<const T>(cfg.lr_ptr)) : cfg.lr;
  return inner_adam_scalars<T>(lr, cfg.lr_ptr != 0, cfg.beta1, cfg.beta2, cfg.eps, cfg.step);
}

template <typename T>
void adam_impl(const InnerPtrList& params, const InnerPtrList& grads, const InnerPtrList& ms,
               const InnerPtrList& vs, const InnerPtrList& po, const InnerPtrList& mo,
               const InnerPtrList& vo, const InnerSizeList& numels, const InnerStepConfig& cfg) {
  const InnerAdamScalars<T> s = adam_scalars<T>(cfg);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
  cpu::parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    const int64_t b = ch.begin;
    cpu::run_loop<AdamSpan<T>>(cpu::as_ptr<const T>(params[t]) + b, cpu::as_ptr<const T>(grads[t]) + b,
                               cpu::as_ptr<const T>(ms[t]) + b, cpu::as_ptr<const T>(vs[t]) + b,
                               cpu::as_ptr<T>(po[t]) + b, cpu::as_ptr<T>(mo[t]) + b,
                               cpu::as_ptr<T>(vo[t]) + b, ch.len, &s);
  });
}

template <typename T>
void adam_backward_impl(const InnerPtrList& grads, const InnerPtrList& ms, const InnerPtrList& vs,
                        const InnerPtrList& dps, const InnerPtrList& dms, const InnerPtrList& dvs,
                        const InnerPtrList& dgo, const InnerPtrList& dmo, const InnerPtrList& dvo,
                        const InnerSizeList& numels, const InnerStepConfig& cfg,
                        uintptr_t partials) {
  const InnerAdamScalars<T> s = adam_scalars<T>(cfg);
  double* part = cpu::as_ptr<double>(partials);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
  cpu::parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    const int64_t b = ch.begin;
    const T* g = cpu::as_ptr<const T>(grads[t]) + b;
    const T* m = cpu::as_ptr<const T>(ms[t]) + b;
    const T* v = cpu::as_ptr<const T>(vs[t]) + b;
    const T* dp = cpu::as_ptr<const T>(dps[t]) + b;
    const T* dm = dms.empty() ? nullptr : cpu::as_ptr<const T>(dms[t]) + b;
    const T* dv = dvs.empty() ? nullptr : cpu::as_ptr<const T>(dvs[t]) + b;
    T* a = cpu::as_ptr<T>(dgo[t]) + b;
    T* bm = cpu::as_ptr<T>(dmo[t]) + b;
    T* bv = cpu::as_ptr<T>(dvo[t]) + b;
    dispatch_bools(dm != nullptr, dv != nullptr, [&](auto flags) {
      using F = decltype(flags);
      if (part != nullptr) {
        part[c] = cpu::run_loop<AdamGradSpan<T, true, F::first, F::second>>(
            g, m, v, dp, dm, dv, a, bm, bv, ch.len, &s);
      } else {
        cpu::run_loop<AdamGradSpan<T, false, F::first, F::second>>(g, m, v, dp, dm, dv, a, bm,
                                                                   bv, ch.len, &s);
      }
    });
  });
}

}  // namespace

void inner_sgd_cpu(const InnerPtrList& params, const InnerPtrList& grads, const InnerPtrList& lrs,
                   const InnerPtrList& out, const InnerSizeList& numels, bool f64,
                   const InnerStepConfig& cfg) {
  if (numels.empty()) return;
  if (f64) sgd_impl<double>(params, grads, lrs, out, numels, cfg);
  else sgd_impl<float>(params, grads, lrs, out, numels, cfg);
}

void inner_sgd_backward_cpu(const InnerPtrList& grads, const InnerPtrList& lrs,
                            const InnerPtrList& d_params, const InnerPtrList& d_grads,
                            const InnerPtrList& d_lrs, const InnerSizeList& numels, bool f64,
                            const InnerStepConfig& cfg, uintptr_t partials) {
  if (numels.empty()) return;
  if (f64) sgd_backward_impl<double>(grads, lrs, d_params, d_grads, d_lrs, numels, cfg, partials);
  else sgd_backward_impl<float>(grads, lrs, d_params, d_grads, d_lrs, numels, cfg, partials);
}

void inner_adam_cpu(const InnerPtrList& params, const InnerPtrList& grads,
                    const InnerPtrList& exp_avgs, const InnerPtrList& exp_avg_sqs,
                    const InnerPtrList& params_out, const InnerPtrList& exp_avgs_out,
                    const InnerPtrList& exp_avg_sqs_out, const InnerSizeList& numels, bool f64,
                    const InnerStepConfig& cfg) {
  if (numels.empty()) return;
  if (f64) {
    adam_impl<double>(params, grads, exp_avgs, exp_avg_sqs, params_out, exp_avgs_out,
                      exp_avg_sqs_out, numels, cfg);
  } else {
    adam_impl<float>(params, grads, exp_avgs, exp_avg_sqs, params_out, exp_avgs_out,
                     exp_avg_sqs_out, numels, cfg);
  }
}

void inner_adam_backward_cpu(const InnerPtrList& grads, const InnerPtrList& exp_avgs,
                             const InnerPtrList& exp_avg_sqs, const InnerPtrList& d_params,
                             const InnerPtrList& d_exp_avgs, const InnerPtrList& d_exp_avg_sqs,
                             const InnerPtrList& d_grads_out, const InnerPtrList& d_exp_avgs_out,
                             const InnerPtrList& d_exp_avg_sqs_out, const InnerSizeList& numels,
                             bool f64, const InnerStepConfig& cfg, uintptr_t partials) {
  if (numels.empty()) return;
  if (f64) {
    adam_backward_impl<double>(grads, exp_avgs, exp_avg_sqs, d_params, d_exp_avgs, d_exp_avg_sqs,
                               d_grads_out, d_exp_avgs_out, d_exp_avg_sqs_out, numels, cfg,
                               partials);
  } else {
    adam_backward_impl<float>(grads, exp_avgs, exp_avg_sqs, d_params, d_exp_avgs, d_exp_avg_sqs,
                              d_grads_out, d_exp_avgs_out, d_exp_avg_sqs_out, numels, cfg,
                              partials);
  }
}

}  // namespace pyoptk
