// LAMB on CUDA: three launches per call (per table of up to kLambMaxTensors tensors),
// no host sync, deterministic (no atomics). Indexing, chunking and launch only; the
// element math is pyoptk/lamb_math.h.
//
//   pass 1  (per chunk)  m, v update; fp32 block sums of p^2 and u^2 -> workspace
//   reduce  (per tensor) its chunk partials summed in chunk order (double) -> norms ->
//                        trust ratio -> step factor lr*r -> workspace
//   pass 2  (per chunk)  u recomputed from (m, v, p) with the same math, p -= factor*u
// adam=True (ratio 1) needs no norms: one fused launch.
//
// Workspace (float32, lamb_workspace_numel): [0, C) partial ||p||^2 per chunk,
// [C, 2C) partial ||u||^2 per chunk, [2C, 2C + ntensors) step factor per tensor, where
// C is the call's total chunk count and tensors are numbered among the non-empty ones.
#include "cuda_util.cuh"
#include "pyoptk/lamb_math.h"

namespace pyoptk {
namespace cuda {
namespace {

constexpr int kLambMaxTensors = 512;

struct LambArgs {
  void* p[kLambMaxTensors];
  const void* g[kLambMaxTensors];
  float* m[kLambMaxTensors];
  float* v[kLambMaxTensors];
  const float* step[kLambMaxTensors];
  int64_t numel[kLambMaxTensors];
  int32_t chunk_start[kLambMaxTensors + 1];
  int32_t ntensors;
  int32_t nchunks;
  int32_t chunk_base;    // global index of this table's first chunk
  int32_t tensor_base;   // global index of this table's first (non-empty) tensor
  int32_t total_chunks;  // of the whole call: offset of the u^2 partials
  float* workspace;
  LambParams hp;
};
static_assert(sizeof(LambArgs) <= kMaxKernelParamBytes, "LAMB table exceeds kernel params");

struct ChunkView {
  int t;        // table slot
  int64_t begin;
  int n;
};

__device__ __forceinline__ ChunkView chunk_view(const LambArgs& a, int32_t c) {
  ChunkView cv;
  cv.t = find_slot(a.chunk_start, a.ntensors, c);
  cv.begin = static_cast<int64_t>(c - a.chunk_start[cv.t]) * kChunkSize;
  const int64_t rest = a.numel[cv.t] - cv.begin;
  cv.n = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
  return cv;
}

// Pass 1 (APPLY = false): moments + partial norms. adam mode (APPLY = true): moments and
// the update p -= lr*u in the same pass, no partials.
template <typename T, bool MAXIMIZE, bool APPLY>
__global__ void __launch_bounds__(kThreads) lamb_pass1_kernel(const __grid_constant__ LambArgs args) {
  __shared__ float red[kWarps];
  const double lr = effective_lr(args.hp.lr, args.hp.lr_ptr);
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const ChunkView cv = chunk_view(args, c);
    const LambScalars s = lamb_scalars(*args.step[cv.t], lr, args.hp);
    const float factor = lamb_step_factor(s.lr, 1.0f);  // adam mode only
    T* __restrict__ p = static_cast<T*>(args.p[cv.t]) + cv.begin;
    const T* __restrict__ g = static_cast<const T*>(args.g[cv.t]) + cv.begin;
    float* __restrict__ m = args.m[cv.t] + cv.begin;
    float* __restrict__ v = args.v[cv.t] + cv.begin;
    float p_sq = 0.0f, u_sq = 0.0f;
    int done = 0;
    if (aligned_for_vec<T>(p) && aligned_for_vec<T>(g) && aligned_for_vec<float>(m) &&
        aligned_for_vec<float>(v)) {
      const int nv = cv.n / kVec;
      for (int i = threadIdx.x; i < nv; i += kThreads) {
        float pf[kVec], gf[kVec], mf[kVec], vf[kVec];
        load4(p + i * kVec, pf);
        load4(g + i * kVec, gf);
        load4(m + i * kVec, mf);
        load4(v + i * kVec, vf);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float u = lamb_moments<MAXIMIZE>(pf[k], gf[k], mf[k], vf[k], s);
          if (APPLY) {
            pf[k] = lamb_apply(pf[k], u, factor);
          } else {
            p_sq += pf[k] * pf[k];
            u_sq += u * u;
          }
        }
        store4(m + i * kVec, mf);
        store4(v + i * kVec, vf);
        if (APPLY) store4(p + i * kVec, pf);
      }
      done = nv * kVec;
    }
    for (int i = done + threadIdx.x; i < cv.n; i += kThreads) {
      const float pf = load_f32(p[i]);
      float mi = m[i], vi = v[i];
      const float u = lamb_moments<MAXIMIZE>(pf, load_f32(g[i]), mi, vi, s);
      m[i] = mi;
      v[i] = vi;
      if (APPLY) {
        p[i] = store_from_f32<T>(lamb_apply(pf, u, factor));
      } else {
        p_sq += pf * pf;
        u_sq += u * u;
      }
    }
    if (!APPLY) {
      const float bp = block_reduce(p_sq, SumOp{}, red);
      const float bu = block_reduce(u_sq, SumOp{}, red);
      if (threadIdx.x == 0) {
        args.workspace[args.chunk_base + c] = bp;
        args.workspace[args.total_chunks + args.chunk_base + c] = bu;
      }
    }
  }
}

// One block per tensor (grid-stride): norms from the chunk partials in chunk order.
__global__ void __launch_bounds__(kThreads) lamb_reduce_kernel(const __grid_constant__ LambArgs args) {
  __shared__ double red[kWarps];
  const double lr = effective_lr(args.hp.lr, args.hp.lr_ptr);
  for (int t = blockIdx.x; t < args.ntensors; t += gridDim.x) {
    const int32_t c0 = args.chunk_base + args.chunk_start[t];
    const int32_t c1 = args.chunk_base + args.chunk_start[t + 1];
    double p_sq = 0.0, u_sq = 0.0;
    for (int32_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
      p_sq += static_cast<double>(args.workspace[c]);
      u_sq += static_cast<double>(args.workspace[args.total_chunks + c]);
    }
    const double bp = block_reduce(p_sq, SumOp{}, red);
    const double bu = block_reduce(u_sq, SumOp{}, red);
    if (threadIdx.x == 0) {
      const float w_norm = static_cast<float>(sqrt(bp));
      const float u_norm = static_cast<float>(sqrt(bu));
      const float ratio = lamb_trust_ratio(w_norm, u_norm, args.hp);
      args.workspace[2 * args.total_chunks + args.tensor_base + t] =
          lamb_step_factor(static_cast<float>(lr), ratio);
    }
  }
}

// Pass 2: u recomputed from the updated moments and the unchanged p, then applied.
template <typename T>
__global__ void __launch_bounds__(kThreads) lamb_pass2_kernel(const __grid_constant__ LambArgs args) {
  const double lr = effective_lr(args.hp.lr, args.hp.lr_ptr);
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const ChunkView cv = chunk_view(args, c);
    const LambScalars s = lamb_scalars(*args.step[cv.t], lr, args.hp);
    const float factor = args.workspace[2 * args.total_chunks + args.tensor_base + cv.t];
    T* __restrict__ p = static_cast<T*>(args.p[cv.t]) + cv.begin;
    const float* __restrict__ m = args.m[cv.t] + cv.begin;
    const float* __restrict__ v = args.v[cv.t] + cv.begin;
    int done = 0;
    if (aligned_for_vec<T>(p) && aligned_for_vec<float>(m) && aligned_for_vec<float>(v)) {
      const int nv = cv.n / kVec;
      for (int i = threadIdx.x; i < nv; i += kThreads) {
        float pf[kVec], mf[kVec], vf[kVec];
        load4(p + i * kVec, pf);
        load4(m + i * kVec, mf);
        load4(v + i * kVec, vf);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          pf[k] = lamb_apply(pf[k], lamb_direction(pf[k], mf[k], vf[k], s), factor);
        }
        store4(p + i * kVec, pf);
      }
      done = nv * kVec;
    }
    for (int i = done + threadIdx.x; i < cv.n; i += kThreads) {
      const float pf = load_f32(p[i]);
      p[i] = store_from_f32<T>(lamb_apply(pf, lamb_direction(pf, m[i], v[i], s), factor));
    }
  }
}

// Fills one table per group of tensors (shared by the three launches).
void fill_table(LambArgs& args, const std::vector<TableEntry>& table, const PtrList& params,
                const PtrList& grads, const PtrList& exp_avgs, const PtrList& exp_avg_sqs,
                const PtrList& steps) {
  fill_chunk_table(args, table, [&](size_t k, size_t i) {
    args.p[k] = reinterpret_cast<void*>(params[i]);
    args.g[k] = reinterpret_cast<const void*>(grads[i]);
    args.m[k] = reinterpret_cast<float*>(exp_avgs[i]);
    args.v[k] = reinterpret_cast<float*>(exp_avg_sqs[i]);
    args.step[k] = reinterpret_cast<const float*>(steps[i]);
  });
}

template <typename T, bool MAXIMIZE>
void launch_lamb(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                 const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels,
                 const LambParams& hp, float* workspace, int device, cudaStream_t stream) {
  int64_t total_chunks = 0;
  for (int64_t n : numels) total_chunks += num_chunks(n);
  check_chunk_count(total_chunks);
  const auto tables = plan_tables(numels, kLambMaxTensors);

  // Tables are rebuilt for each pass (cheap host work) so only one ~27 KB argument
  // block is alive at a time.
  auto for_each_table = [&](auto&& launch) {
    int32_t chunk_base = 0, tensor_base = 0;
    for (const auto& table : tables) {
      LambArgs args;
      fill_table(args, table, params, grads, exp_avgs, exp_avg_sqs, steps);
      args.chunk_base = chunk_base;
      args.tensor_base = tensor_base;
      args.total_chunks = static_cast<int32_t>(total_chunks);
      args.workspace = workspace;
      args.hp = hp;
      launch(args);
      chunk_base += args.nchunks;
      tensor_base += args.ntensors;
    }
  };

  if (hp.adam) {
    constexpr auto k = lamb_pass1_kernel<T, MAXIMIZE, true>;
    for_each_table([&](const LambArgs& args) {
      k<<<persistent_grid<k>(device, args.nchunks), kThreads, 0, stream>>>(args);
      PYOPTK_CUDA_CHECK_LAUNCH("lamb_pass1_kernel (adam)");
    });
    return;
  }
  constexpr auto k1 = lamb_pass1_kernel<T, MAXIMIZE, false>;
  constexpr auto kr = lamb_reduce_kernel;
  constexpr auto k2 = lamb_pass2_kernel<T>;
  for_each_table([&](const LambArgs& args) {
    k1<<<persistent_grid<k1>(device, args.nchunks), kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH("lamb_pass1_kernel");
  });
  for_each_table([&](const LambArgs& args) {
    kr<<<persistent_grid<kr>(device, args.ntensors), kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH("lamb_reduce_kernel");
  });
  for_each_table([&](const LambArgs& args) {
    k2<<<persistent_grid<k2>(device, args.nchunks), kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH("lamb_pass2_kernel");
  });
}

}  // namespace
}  // namespace cuda

void lamb_cuda(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
               const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels,
               int dtype, const LambConfig& cfg, uintptr_t workspace_ptr, uintptr_t stream) {
  const size_t first = cuda::first_nonempty(numels);
  if (first == numels.size()) return;
  cuda::DeviceGuard guard(params[first]);
  const LambParams hp = cfg.params();
  float* workspace = reinterpret_cast<float*>(workspace_ptr);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (cfg.maximize) {
      cuda::launch_lamb<T, true>(params, grads, exp_avgs, exp_avg_sqs, steps, numels, hp,
                                 workspace, guard.device(), cuda::as_stream(stream));
    } else {
      cuda::launch_lamb<T, false>(params, grads, exp_avgs, exp_avg_sqs, steps, numels, hp,
                                  workspace, guard.device(), cuda::as_stream(stream));
    }
  });
}

}  // namespace pyoptk
