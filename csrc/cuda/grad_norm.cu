// Gradient norm and clipping on CUDA, no host sync, deterministic (no atomics).
// Indexing, chunking and launch only; the math is pyoptk/grad_norm_math.h.
//
//   partials (per chunk)  fp32 block sum of g^2 (or NaN-propagating max |g|) -> workspace
//   reduce   (one block)  the partials combined in chunk order (double) -> total -> out
//   scale    (per chunk)  clip only: coef = min(max_norm / (total + 1e-6), 1) read from
//                         the device total; g *= coef
// grad_norm: 2 launches, clip_grad_norm_: 3 (per table of up to kNormMaxTensors
// tensors for the per-chunk launches). Workspace: one float per chunk of the call.
#include "cuda_util.cuh"
#include "pyoptk/grad_norm_math.h"

namespace pyoptk {
namespace cuda {
namespace {

constexpr int kNormMaxTensors = 1024;

struct NormArgs {
  void* g[kNormMaxTensors];
  int64_t numel[kNormMaxTensors];
  int32_t chunk_start[kNormMaxTensors + 1];
  int32_t ntensors;
  int32_t nchunks;
  int32_t chunk_base;  // global index of this table's first chunk
  float* workspace;
  const float* total;  // scale kernel: the device total norm
  float max_norm;
};
static_assert(sizeof(NormArgs) <= kMaxKernelParamBytes, "norm table exceeds kernel params");

template <typename T, bool INF>
__global__ void __launch_bounds__(kThreads) norm_partials_kernel(const __grid_constant__ NormArgs args) {
  __shared__ float red[kWarps];
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const int t = find_slot(args.chunk_start, args.ntensors, c);
    const int64_t begin = static_cast<int64_t>(c - args.chunk_start[t]) * kChunkSize;
    const int64_t rest = args.numel[t] - begin;
    const int n = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
    const T* __restrict__ g = static_cast<const T*>(args.g[t]) + begin;
    float acc = 0.0f;
    int done = 0;
    if (aligned_for_vec<T>(g)) {
      const int nv = n / kVec;
      for (int i = threadIdx.x; i < nv; i += kThreads) {
        float x[kVec];
        load4(g + i * kVec, x);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          acc = INF ? norm_max_combine(acc, norm_abs_term(x[k])) : acc + norm_sq_term(x[k]);
        }
      }
      done = nv * kVec;
    }
    for (int i = done + threadIdx.x; i < n; i += kThreads) {
      const float x = load_f32(g[i]);
      acc = INF ? norm_max_combine(acc, norm_abs_term(x)) : acc + norm_sq_term(x);
    }
    const float r = INF ? block_reduce(acc, NanMaxOp{}, red) : block_reduce(acc, SumOp{}, red);
    if (threadIdx.x == 0) args.workspace[args.chunk_base + c] = r;
  }
}

// One block: all partials in chunk order (double), then the total.
template <bool INF>
__global__ void __launch_bounds__(kThreads)
    norm_reduce_kernel(const float* __restrict__ partials, int32_t n, float* __restrict__ out) {
  __shared__ double red[kWarps];
  double acc = 0.0;
  for (int32_t i = threadIdx.x; i < n; i += kThreads) {
    const double x = partials[i];
    acc = INF ? norm_max_combine(acc, x) : acc + x;
  }
  const double r = INF ? block_reduce(acc, NanMaxOp{}, red) : block_reduce(acc, SumOp{}, red);
  if (threadIdx.x == 0) *out = norm_finish(r, INF);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) clip_scale_kernel(const __grid_constant__ NormArgs args) {
  const float coef = clip_coef(*args.total, args.max_norm);
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const int t = find_slot(args.chunk_start, args.ntensors, c);
    const int64_t begin = static_cast<int64_t>(c - args.chunk_start[t]) * kChunkSize;
    const int64_t rest = args.numel[t] - begin;
    const int n = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
    T* __restrict__ g = static_cast<T*>(args.g[t]) + begin;
    int done = 0;
    if (aligned_for_vec<T>(g)) {
      const int nv = n / kVec;
      for (int i = threadIdx.x; i < nv; i += kThreads) {
        float x[kVec];
        load4(g + i * kVec, x);
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[k] = clip_apply(x[k], coef);
        store4(g + i * kVec, x);
      }
      done = nv * kVec;
    }
    for (int i = done + threadIdx.x; i < n; i += kThreads) {
      g[i] = store_from_f32<T>(clip_apply(load_f32(g[i]), coef));
    }
  }
}

// Calls launch(args) for each table of the call's non-empty tensors.
template <typename F>
void for_each_table(const PtrList& grads, const SizeList& numels, float* workspace,
                    const float* total, float max_norm, F&& launch) {
  int32_t chunk_base = 0;
  for (const auto& table : plan_tables(numels, kNormMaxTensors)) {
    NormArgs args;
    args.ntensors = static_cast<int32_t>(table.size());
    int64_t chunks = 0;
    for (size_t k = 0; k < table.size(); ++k) {
      const size_t i = static_cast<size_t>(table[k].index);
      args.g[k] = reinterpret_cast<void*>(grads[i]);
      args.numel[k] = table[k].numel;
      args.chunk_start[k] = static_cast<int32_t>(chunks);
      chunks += num_chunks(table[k].numel);
    }
    args.chunk_start[table.size()] = static_cast<int32_t>(chunks);
    args.nchunks = static_cast<int32_t>(chunks);
    args.chunk_base = chunk_base;
    args.workspace = workspace;
    args.total = total;
    args.max_norm = max_norm;
    launch(args);
    chunk_base += args.nchunks;
  }
}

template <typename T>
void launch_norm(const PtrList& grads, const SizeList& numels, bool inf_norm, bool clip,
                 double max_norm, float* out, float* workspace, int device,
                 cudaStream_t stream) {
  int64_t total_chunks = 0;
  for (int64_t n : numels) total_chunks += num_chunks(n);
  check_chunk_count(total_chunks);
  if (total_chunks == 0) {  // no elements: the norm is 0 and nothing is scaled
    PYOPTK_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), stream));
    return;
  }
  const float max_norm_f = static_cast<float>(max_norm);
  for_each_table(grads, numels, workspace, out, max_norm_f, [&](const NormArgs& args) {
    if (inf_norm) {
      constexpr auto k = norm_partials_kernel<T, true>;
      k<<<persistent_grid<k>(device, args.nchunks), kThreads, 0, stream>>>(args);
    } else {
      constexpr auto k = norm_partials_kernel<T, false>;
      k<<<persistent_grid<k>(device, args.nchunks), kThreads, 0, stream>>>(args);
    }
    PYOPTK_CUDA_CHECK_LAUNCH("norm_partials_kernel");
  });
  const int32_t n = static_cast<int32_t>(total_chunks);
  if (inf_norm) {
    norm_reduce_kernel<true><<<1, kThreads, 0, stream>>>(workspace, n, out);
  } else {
    norm_reduce_kernel<false><<<1, kThreads, 0, stream>>>(workspace, n, out);
  }
  PYOPTK_CUDA_CHECK_LAUNCH("norm_reduce_kernel");
  if (!clip) return;
  for_each_table(grads, numels, workspace, out, max_norm_f, [&](const NormArgs& args) {
    constexpr auto k = clip_scale_kernel<T>;
    k<<<persistent_grid<k>(device, args.nchunks), kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH("clip_scale_kernel");
  });
}

void norm_entry(const PtrList& grads, const SizeList& numels, int dtype, bool inf_norm,
                bool clip, double max_norm, uintptr_t out_ptr, uintptr_t workspace_ptr,
                uintptr_t stream) {
  // The device is the output's (always a device pointer, even without elements).
  DeviceGuard guard(out_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  float* workspace = reinterpret_cast<float*>(workspace_ptr);
  dispatch_dtype(dtype, [&](auto tag) {
    launch_norm<decltype(tag)>(grads, numels, inf_norm, clip, max_norm, out, workspace,
                               guard.device(), as_stream(stream));
  });
}

}  // namespace
}  // namespace cuda

void grad_norm_cuda(const PtrList& grads, const SizeList& numels, int dtype, bool inf_norm,
                    uintptr_t out_ptr, uintptr_t workspace_ptr, uintptr_t stream) {
  cuda::norm_entry(grads, numels, dtype, inf_norm, false, 0.0, out_ptr, workspace_ptr, stream);
}

void clip_grad_norm_cuda(const PtrList& grads, const SizeList& numels, int dtype,
                         bool inf_norm, double max_norm, uintptr_t out_ptr,
                         uintptr_t workspace_ptr, uintptr_t stream) {
  cuda::norm_entry(grads, numels, dtype, inf_norm, true, max_norm, out_ptr, workspace_ptr,
                   stream);
}

}  // namespace pyoptk
