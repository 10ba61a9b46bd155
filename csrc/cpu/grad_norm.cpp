// Gradient norm and clipping on CPU: per-chunk partials (double sum of squares, or
// NaN-propagating max |g|) in one OpenMP loop over all chunks, combined in chunk
// order (deterministic), then (clip) one more loop scaling every gradient.
// The element math is pyoptk/grad_norm_math.h, shared with the CUDA kernels.
#include <cmath>
#include <vector>

#include "cpu_util.h"
#include "pyoptk/api.h"
#include "pyoptk/grad_norm_math.h"

namespace pyoptk {
namespace {

template <typename T>
struct SqSumSpan {  // sum of g^2 in double, fixed association (see cpu::kLanes)
  PYOPTK_LOOP double run(const T* PYOPTK_RESTRICT g, int64_t n) {
    double acc[cpu::kLanes] = {};
    const int64_t nb = n - n % cpu::kLanes;
    for (int64_t b = 0; b < nb; b += cpu::kLanes) {
#pragma omp simd
      for (int k = 0; k < cpu::kLanes; ++k) {
        const double x = load_f32(g[b + k]);
        acc[k] += x * x;
      }
    }
    for (int64_t i = nb; i < n; ++i) {
      const double x = load_f32(g[i]);
      acc[i - nb] += x * x;
    }
    return cpu::combine_lanes(acc);
  }
};

template <typename T>
struct MaxAbsSpan {
  // Max of |g| plus a separate NaN flag: both reductions vectorize (max is exact in
  // any order), and a NaN anywhere makes the result NaN as in torch's inf-norm.
  PYOPTK_LOOP double run(const T* PYOPTK_RESTRICT g, int64_t n) {
    float mx = 0.0f;
    int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const float a = norm_abs_term(load_f32(g[i]));
      mx = a > mx ? a : mx;
      nan |= (a != a) ? 1 : 0;
    }
    return nan ? static_cast<double>(NAN) : static_cast<double>(mx);
  }
};

template <typename T>
struct ScaleSpan {
  PYOPTK_LOOP void run(T* PYOPTK_RESTRICT g, int64_t n, float coef) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = store_from_f32<T>(clip_apply(load_f32(g[i]), coef));
  }
};

template <typename T>
float total_norm(const PtrList& grads, const std::vector<cpu::Chunk>& chunks, bool inf_norm) {
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> partials(static_cast<size_t>(nc), 0.0);
  cpu::parallel_for(nc, [&](int64_t c) {
    const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
    const T* g = cpu::as_ptr<const T>(grads[static_cast<size_t>(ch.tensor)]) + ch.begin;
    partials[static_cast<size_t>(c)] = inf_norm ? cpu::run_loop<MaxAbsSpan<T>>(g, ch.len)
                                                : cpu::run_loop<SqSumSpan<T>>(g, ch.len);
  });
  double combined = 0.0;
  for (double x : partials) combined = inf_norm ? norm_max_combine(combined, x) : combined + x;
  return norm_finish(combined, inf_norm);
}

}  // namespace

void grad_norm_cpu(const PtrList& grads, const SizeList& numels, int dtype, bool inf_norm,
                   uintptr_t out_ptr) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
    *cpu::as_ptr<float>(out_ptr) = total_norm<T>(grads, chunks, inf_norm);
  });
}

void clip_grad_norm_cpu(const PtrList& grads, const SizeList& numels, int dtype,
                        bool inf_norm, double max_norm, uintptr_t out_ptr) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const std::vector<cpu::Chunk> chunks = cpu::make_chunks(numels);
    const float total = total_norm<T>(grads, chunks, inf_norm);
    *cpu::as_ptr<float>(out_ptr) = total;
    const float coef = clip_coef(total, static_cast<float>(max_norm));
    cpu::parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
      const cpu::Chunk& ch = chunks[static_cast<size_t>(c)];
      cpu::run_loop<ScaleSpan<T>>(
          cpu::as_ptr<T>(grads[static_cast<size_t>(ch.tensor)]) + ch.begin, ch.len, coef);
    });
  });
}

int64_t norm_workspace_numel(const SizeList& numels) {
  int64_t n = 0;
  for (int64_t x : numels) n += num_chunks(x);
  return n;
}

int64_t lamb_workspace_numel(const SizeList& numels) {
  // Per chunk: partial ||p||^2 and ||u||^2; per tensor: its step factor lr * ratio.
  int64_t n = 0;
  for (int64_t x : numels) n += num_chunks(x);
  return 2 * n + static_cast<int64_t>(numels.size());
}

}  // namespace pyoptk
