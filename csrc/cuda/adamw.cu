// AdamW on CUDA: one launch per call (per table of up to kAdamWMaxTensors tensors).
// Indexing, chunking and launch only; the element math is pyoptk/adamw_math.h.
//
// The kernel argument is a table of per-tensor pointers/numels and the prefix sum of
// their chunk counts. A persistent grid strides over all chunks of the table; a block
// finds the chunk's tensor by binary search, computes the tensor's step scalars from
// its device step (and the device lr when given) and updates the chunk with 16-byte
// (fp32) / 8-byte (bf16, f16) vector accesses when every pointer is aligned, scalar
// accesses otherwise.
#include "cuda_util.cuh"
#include "pyoptk/adamw_math.h"

namespace pyoptk {
namespace cuda {
namespace {

constexpr int kAdamWMaxTensors = 512;
constexpr int kILP = 2;  // vectors in flight per thread

struct AdamWArgs {
  void* p[kAdamWMaxTensors];
  const void* g[kAdamWMaxTensors];
  float* m[kAdamWMaxTensors];
  float* v[kAdamWMaxTensors];
  float* vmax[kAdamWMaxTensors];  // nullptr unless amsgrad
  const float* step[kAdamWMaxTensors];
  int64_t numel[kAdamWMaxTensors];
  int32_t chunk_start[kAdamWMaxTensors + 1];  // prefix sum of chunk counts
  int32_t ntensors;
  int32_t nchunks;
  AdamWParams hp;
};
static_assert(sizeof(AdamWArgs) <= kMaxKernelParamBytes, "AdamW table exceeds kernel params");

template <typename T, bool AMSGRAD, bool MAXIMIZE>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ AdamWArgs args) {
  const double lr = effective_lr(args.hp.lr, args.hp.lr_ptr);
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const int t = find_slot(args.chunk_start, args.ntensors, c);
    const int64_t begin = static_cast<int64_t>(c - args.chunk_start[t]) * kChunkSize;
    const int64_t rest = args.numel[t] - begin;
    const int n = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
    const AdamWScalars s = adamw_scalars(*args.step[t], lr, args.hp);

    T* __restrict__ p = static_cast<T*>(args.p[t]) + begin;
    const T* __restrict__ g = static_cast<const T*>(args.g[t]) + begin;
    float* __restrict__ m = args.m[t] + begin;
    float* __restrict__ v = args.v[t] + begin;
    float* __restrict__ vmax = AMSGRAD ? args.vmax[t] + begin : nullptr;

    int done = 0;
    const bool vec = aligned_for_vec<T>(p) && aligned_for_vec<T>(g) &&
                     aligned_for_vec<float>(m) && aligned_for_vec<float>(v) &&
                     (!AMSGRAD || aligned_for_vec<float>(vmax));
    if (vec) {
      const int nv = n / kVec;
      for (int base = threadIdx.x; base < nv; base += kThreads * kILP) {
        float pf[kILP][kVec], gf[kILP][kVec], mf[kILP][kVec], vf[kILP][kVec];
        float xf[kILP][kVec] = {};  // vmax (amsgrad only)
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int i = base + j * kThreads;
          if (i < nv) {
            load4(p + i * kVec, pf[j]);
            load4(g + i * kVec, gf[j]);
            load4(m + i * kVec, mf[j]);
            load4(v + i * kVec, vf[j]);
            if (AMSGRAD) load4(vmax + i * kVec, xf[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int i = base + j * kThreads;
          if (i < nv) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              pf[j][k] = adamw_element<AMSGRAD, MAXIMIZE>(pf[j][k], gf[j][k], mf[j][k], vf[j][k],
                                                          xf[j][k], s);
            }
            store4(p + i * kVec, pf[j]);
            store4(m + i * kVec, mf[j]);
            store4(v + i * kVec, vf[j]);
            if (AMSGRAD) store4(vmax + i * kVec, xf[j]);
          }
        }
      }
      done = nv * kVec;
    }
    for (int i = done + threadIdx.x; i < n; i += kThreads) {  // tail / unaligned
      float mi = m[i], vi = v[i], xi = AMSGRAD ? vmax[i] : 0.0f;
      const float pn =
          adamw_element<AMSGRAD, MAXIMIZE>(load_f32(p[i]), load_f32(g[i]), mi, vi, xi, s);
      p[i] = store_from_f32<T>(pn);
      m[i] = mi;
      v[i] = vi;
      if (AMSGRAD) vmax[i] = xi;
    }
  }
}

template <typename T, bool AMSGRAD, bool MAXIMIZE>
void launch_adamw(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                  const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs,
                  const PtrList& steps, const SizeList& numels, const AdamWParams& hp,
                  int device, cudaStream_t stream) {
  constexpr auto kernel = adamw_kernel<T, AMSGRAD, MAXIMIZE>;
  for (const auto& table : plan_tables(numels, kAdamWMaxTensors)) {
    AdamWArgs args;  // ~31 KB, lives on the host stack only for the launch
    args.hp = hp;
    const int64_t chunks = fill_chunk_table(args, table, [&](size_t k, size_t i) {
      args.p[k] = reinterpret_cast<void*>(params[i]);
      args.g[k] = reinterpret_cast<const void*>(grads[i]);
      args.m[k] = reinterpret_cast<float*>(exp_avgs[i]);
      args.v[k] = reinterpret_cast<float*>(exp_avg_sqs[i]);
      args.vmax[k] = AMSGRAD ? reinterpret_cast<float*>(max_exp_avg_sqs[i]) : nullptr;
      args.step[k] = reinterpret_cast<const float*>(steps[i]);
    });
    const int grid = persistent_grid<kernel>(device, chunks);
    kernel<<<grid, kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH("adamw_kernel");
  }
}

}  // namespace
}  // namespace cuda

void adamw_cuda(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs,
                const PtrList& steps, const SizeList& numels, int dtype,
                const AdamWConfig& cfg, uintptr_t stream) {
  const size_t first = cuda::first_nonempty(numels);
  if (first == numels.size()) return;  // nothing to do (empty lists, zero-numel tensors)
  cuda::DeviceGuard guard(params[first]);
  const AdamWParams hp = cfg.params();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bools(cfg.amsgrad, cfg.maximize, [&](auto flags) {
      using F = decltype(flags);
      cuda::launch_adamw<T, F::first, F::second>(params, grads, exp_avgs, exp_avg_sqs,
                                                 max_exp_avg_sqs, steps, numels, hp,
                                                 guard.device(), cuda::as_stream(stream));
    });
  });
}

}  // namespace pyoptk
