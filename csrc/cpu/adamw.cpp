// AdamW on CPU: one OpenMP loop over fixed-size chunks of all tensors of the call.
// The element math is pyoptk/adamw_math.h, shared with the CUDA kernel.
#include <vector>

#include "cpu_util.h"
#include "pyoptk/adamw_math.h"
#include "pyoptk/api.h"

namespace pyoptk {
namespace {

// One contiguous span of one tensor. Template flags keep the inner loop branch-free
// so it vectorizes (no fast-math: the result is the exact IEEE fp32 math).
template <typename T, bool AMSGRAD, bool MAXIMIZE>
struct AdamWSpan {
  PYOPTK_LOOP void run(T* PYOPTK_RESTRICT p, const T* PYOPTK_RESTRICT g,
                       float* PYOPTK_RESTRICT m, float* PYOPTK_RESTRICT v,
                       float* PYOPTK_RESTRICT vmax, int64_t n, const AdamWScalars* sp) {
    const AdamWScalars s = *sp;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float mi = m[i];
      float vi = v[i];
      float vm = AMSGRAD ? vmax[i] : 0.0f;
      const float pn =
          adamw_element<AMSGRAD, MAXIMIZE>(load_f32(p[i]), load_f32(g[i]), mi, vi, vm, s);
      m[i] = mi;
      v[i] = vi;
      if (AMSGRAD) vmax[i] = vm;
      p[i] = store_from_f32<T>(pn);
    }
  }
};

template <typename T, bool AMSGRAD, bool MAXIMIZE>
void adamw_cpu_impl(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                    const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs,
                    const PtrList& steps, const SizeList& numels, const AdamWParams& hp) {
  const double lr = hp.lr_ptr ? static_cast<double>(*hp.lr_ptr) : hp.lr;
  std::vector<AdamWScalars> scalars(numels.size());
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] > 0) scalars[t] = adamw_scalars(*cpu::as_ptr<const float>(steps[t]), lr, hp);
  }
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
  cpu::parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const size_t t = static_cast<size_t>(ch.tensor);
    float* vmax = AMSGRAD ? cpu::as_ptr<float>(max_exp_avg_sqs[t]) + ch.begin : nullptr;
    cpu::run_loop<AdamWSpan<T, AMSGRAD, MAXIMIZE>>(
        cpu::as_ptr<T>(params[t]) + ch.begin, cpu::as_ptr<const T>(grads[t]) + ch.begin,
        cpu::as_ptr<float>(exp_avgs[t]) + ch.begin, cpu::as_ptr<float>(exp_avg_sqs[t]) + ch.begin,
        vmax, ch.len, &scalars[t]);
  });
}

}  // namespace

void adamw_cpu(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
               const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs,
               const PtrList& steps, const SizeList& numels, int dtype,
               const AdamWConfig& cfg) {
  if (numels.empty()) return;
  const AdamWParams hp = cfg.params();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bools(cfg.amsgrad, cfg.maximize, [&](auto flags) {
      using F = decltype(flags);
      adamw_cpu_impl<T, F::first, F::second>(params, grads, exp_avgs, exp_avg_sqs,
                                             max_exp_avg_sqs, steps, numels, hp);
    });
  });
}

}  // namespace pyoptk
