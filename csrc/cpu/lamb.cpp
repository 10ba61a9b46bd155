// LAMB on CPU. Pass 1 (one OpenMP loop over the chunks of all tensors) updates m, v
// and keeps per-chunk double partials of ||p||^2 and ||u||^2; the partials of each
// tensor are summed in chunk order (deterministic) into its trust ratio; pass 2
// recomputes u from (m, v, p) and applies it. adam=True needs no norms: one pass.
// The element math is pyoptk/lamb_math.h, shared with the CUDA kernels.
#include <cmath>
#include <vector>

#include "cpu_util.h"
#include "pyoptk/api.h"
#include "pyoptk/lamb_math.h"

namespace pyoptk {
namespace {

struct NormPartial {
  double p_sq;
  double u_sq;
};

// Pass 1: moments, and the chunk's sums of p^2 and u^2 (double).
template <typename T, bool MAXIMIZE>
struct LambPass1Span {
  PYOPTK_LOOP NormPartial run(const T* PYOPTK_RESTRICT p, const T* PYOPTK_RESTRICT g,
                              float* PYOPTK_RESTRICT m, float* PYOPTK_RESTRICT v, int64_t n,
                              const LambScalars* sp) {
    const LambScalars s = *sp;
    double p_sq[cpu::kLanes] = {}, u_sq[cpu::kLanes] = {};
    const auto element = [&](int64_t i, int k) __attribute__((always_inline)) {
      const float pf = load_f32(p[i]);
      float mi = m[i];
      float vi = v[i];
      const float u = lamb_moments<MAXIMIZE>(pf, load_f32(g[i]), mi, vi, s);
      m[i] = mi;
      v[i] = vi;
      const double pd = pf, ud = u;
      p_sq[k] += pd * pd;
      u_sq[k] += ud * ud;
    };
    const int64_t nb = n - n % cpu::kLanes;
    for (int64_t b = 0; b < nb; b += cpu::kLanes) {
#pragma omp simd
      for (int k = 0; k < cpu::kLanes; ++k) element(b + k, k);
    }
    for (int64_t i = nb; i < n; ++i) element(i, static_cast<int>(i - nb));
    return NormPartial{cpu::combine_lanes(p_sq), cpu::combine_lanes(u_sq)};
  }
};

// Pass 2: u recomputed from the updated moments and the unchanged p, then applied.
template <typename T>
struct LambPass2Span {
  PYOPTK_LOOP void run(T* PYOPTK_RESTRICT p, const float* PYOPTK_RESTRICT m,
                       const float* PYOPTK_RESTRICT v, int64_t n, const LambScalars* sp,
                       float step_factor) {
    const LambScalars s = *sp;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float pf = load_f32(p[i]);
      const float u = lamb_direction(pf, m[i], v[i], s);
      p[i] = store_from_f32<T>(lamb_apply(pf, u, step_factor));
    }
  }
};

// adam mode (trust ratio 1): moments and update in one pass.
template <typename T, bool MAXIMIZE>
struct LambAdamSpan {
  PYOPTK_LOOP void run(T* PYOPTK_RESTRICT p, const T* PYOPTK_RESTRICT g,
                       float* PYOPTK_RESTRICT m, float* PYOPTK_RESTRICT v, int64_t n,
                       const LambScalars* sp, float step_factor) {
    const LambScalars s = *sp;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float pf = load_f32(p[i]);
      float mi = m[i];
      float vi = v[i];
      const float u = lamb_moments<MAXIMIZE>(pf, load_f32(g[i]), mi, vi, s);
      m[i] = mi;
      v[i] = vi;
      p[i] = store_from_f32<T>(lamb_apply(pf, u, step_factor));
    }
  }
};

template <typename T, bool MAXIMIZE>
void lamb_cpu_impl(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                   const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels,
                   const LambParams& hp) {
  const double lr = hp.lr_ptr ? static_cast<double>(*hp.lr_ptr) : hp.lr;
  const size_t nt = numels.size();
  std::vector<LambScalars> scalars(nt);
  for (size_t t = 0; t < nt; ++t) {
    if (numels[t] > 0) scalars[t] = lamb_scalars(*cpu::as_ptr<const float>(steps[t]), lr, hp);
  }
  std::vector<int64_t> first_chunk;
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels, &first_chunk);
  const int64_t nc = static_cast<int64_t>(chunks.size());

  if (hp.adam) {
    cpu::parallel_for(nc, [&](int64_t c) {
      const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
      const size_t t = static_cast<size_t>(ch.tensor);
      cpu::run_loop<LambAdamSpan<T, MAXIMIZE>>(
          cpu::as_ptr<T>(params[t]) + ch.begin, cpu::as_ptr<const T>(grads[t]) + ch.begin,
          cpu::as_ptr<float>(exp_avgs[t]) + ch.begin,
          cpu::as_ptr<float>(exp_avg_sqs[t]) + ch.begin, ch.len, &scalars[t],
          lamb_step_factor(scalars[t].lr, 1.0f));
    });
    return;
  }

  std::vector<NormPartial> partials(static_cast<size_t>(nc));
  cpu::parallel_for(nc, [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    partials[static_cast<size_t>(c)] = cpu::run_loop<LambPass1Span<T, MAXIMIZE>>(
        cpu::as_ptr<const T>(params[t]) + ch.begin, cpu::as_ptr<const T>(grads[t]) + ch.begin,
        cpu::as_ptr<float>(exp_avgs[t]) + ch.begin,
        cpu::as_ptr<float>(exp_avg_sqs[t]) + ch.begin, ch.len, &scalars[t]);
  });

  std::vector<float> step_factor(nt, 0.0f);
  for (size_t t = 0; t < nt; ++t) {
    double p_sq = 0.0, u_sq = 0.0;
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {  // fixed order
      p_sq += partials[static_cast<size_t>(c)].p_sq;
      u_sq += partials[static_cast<size_t>(c)].u_sq;
    }
    const float w_norm = static_cast<float>(std::sqrt(p_sq));
    const float u_norm = static_cast<float>(std::sqrt(u_sq));
    step_factor[t] = lamb_step_factor(scalars[t].lr, lamb_trust_ratio(w_norm, u_norm, hp));
  }

  cpu::parallel_for(nc, [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    cpu::run_loop<LambPass2Span<T>>(cpu::as_ptr<T>(params[t]) + ch.begin,
                                    cpu::as_ptr<const float>(exp_avgs[t]) + ch.begin,
                                    cpu::as_ptr<const float>(exp_avg_sqs[t]) + ch.begin, ch.len,
                                    &scalars[t], step_factor[t]);
  });
}

}  // namespace

void lamb_cpu(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
              const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels,
              int dtype, const LambConfig& cfg) {
  if (numels.empty()) return;
  const LambParams hp = cfg.params();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (cfg.maximize) {
      lamb_cpu_impl<T, true>(params, grads, exp_avgs, exp_avg_sqs, steps, numels, hp);
    } else {
      lamb_cpu_impl<T, false>(params, grads, exp_avgs, exp_avg_sqs, steps, numels, hp);
    }
  });
}

}  // namespace pyoptk
