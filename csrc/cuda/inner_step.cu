// Differentiable inner steps (SGD, MetaSGD, Adam) on CUDA: forward and fused backward.
// Indexing, chunking and launch only; the element math is pyoptk/inner_step_math.h.
//
// One launch per table of up to kInnerMaxTensors tensors. A persistent grid strides over
// the table's chunks; a block finds its chunk's tensor by binary search and sweeps the
// chunk with coalesced scalar accesses (the arrays of one call are float or double). The
// backward's sum for d_lr is one deterministic block reduction per chunk, written to
// partials[chunk_base + chunk]; the Python launcher adds the partials in chunk order.
#include "cuda_util.cuh"
#include "pyoptk/inner_step_math.h"

namespace pyoptk {
namespace cuda {
namespace {

constexpr int kInnerMaxTensors = 256;
constexpr int kInnerRoles = 9;  // the most pointer roles of any kernel (Adam backward)

struct InnerArgs {
  const void* in[kInnerRoles - 3][kInnerMaxTensors];  // inputs, by role
  void* out[3][kInnerMaxTensors];                     // outputs, by role
  int64_t numel[kInnerMaxTensors];
  int32_t chunk_start[kInnerMaxTensors + 1];
  int32_t ntensors;
  int32_t nchunks;
  int32_t chunk_base;  // global index of this table's first chunk (partials)
  void* partials;      // T[n_chunks of the call] or nullptr
  const void* lr_ptr;  // T scalar on device or nullptr
  double lr, beta1, beta2, eps;
  int64_t step;
};
static_assert(sizeof(InnerArgs) <= kMaxKernelParamBytes, "inner-step table exceeds kernel params");

enum class Kind { kSgd, kMetaSgd, kAdam };

template <typename T>
__device__ __forceinline__ T lr_of(const InnerArgs& a) {
  return a.lr_ptr != nullptr ? *static_cast<const T*>(a.lr_ptr) : static_cast<T>(a.lr);
}

template <typename T>
__device__ __forceinline__ InnerAdamScalars<T> adam_scalars_of(const InnerArgs& a) {
  const double lr = a.lr_ptr != nullptr ? static_cast<double>(*static_cast<const T*>(a.lr_ptr))
                                        : a.lr;
  return inner_adam_scalars<T>(lr, a.lr_ptr != nullptr, a.beta1, a.beta2, a.eps, a.step);
}

// Forward: SGD/MetaSGD in = (p, g[, a]), out = (p'); Adam in = (p, g, m, v),
// out = (p', m', v').
template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads) inner_forward_kernel(const __grid_constant__ InnerArgs args) {
  const T lr = K == Kind::kSgd ? lr_of<T>(args) : T(0);
  InnerAdamScalars<T> s{};
  if (K == Kind::kAdam) s = adam_scalars_of<T>(args);
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const int t = find_slot(args.chunk_start, args.ntensors, c);
    const int64_t begin = static_cast<int64_t>(c - args.chunk_start[t]) * kChunkSize;
    const int64_t rest = args.numel[t] - begin;
    const int n = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
    const T* __restrict__ p = static_cast<const T*>(args.in[0][t]) + begin;
    const T* __restrict__ g = static_cast<const T*>(args.in[1][t]) + begin;
    T* __restrict__ po = static_cast<T*>(args.out[0][t]) + begin;
    if (K == Kind::kAdam) {
      const T* __restrict__ m = static_cast<const T*>(args.in[2][t]) + begin;
      const T* __restrict__ v = static_cast<const T*>(args.in[3][t]) + begin;
      T* __restrict__ mo = static_cast<T*>(args.out[1][t]) + begin;
      T* __restrict__ vo = static_cast<T*>(args.out[2][t]) + begin;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        T m2, v2;
        po[i] = inner_adam_element(p[i], g[i], m[i], v[i], s, m2, v2);
        mo[i] = m2;
        vo[i] = v2;
      }
    } else if (K == Kind::kMetaSgd) {
      const T* __restrict__ a = static_cast<const T*>(args.in[2][t]) + begin;
      for (int i = threadIdx.x; i < n; i += kThreads) po[i] = inner_sgd_element(p[i], g[i], a[i]);
    } else {
      for (int i = threadIdx.x; i < n; i += kThreads) po[i] = inner_sgd_element(p[i], g[i], lr);
    }
  }
}

// Backward: SGD in = (g, d_p), out = (d_g), partial sum(d_p*g); MetaSGD in = (g, a, d_p),
// out = (d_g, d_a); Adam in = (g, m, v, d_p, d_m', d_v'), out = (d_g, d_m, d_v), partial
// sum(d_p*(m'/d)); d_m', d_v' may be absent (zero).
template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads) inner_backward_kernel(const __grid_constant__ InnerArgs args) {
  __shared__ T red[kWarps];
  const T lr = K == Kind::kSgd ? lr_of<T>(args) : T(0);
  InnerAdamScalars<T> s{};
  if (K == Kind::kAdam) s = adam_scalars_of<T>(args);
  T* partials = static_cast<T*>(args.partials);
  for (int32_t c = blockIdx.x; c < args.nchunks; c += gridDim.x) {
    const int t = find_slot(args.chunk_start, args.ntensors, c);
    const int64_t begin = static_cast<int64_t>(c - args.chunk_start[t]) * kChunkSize;
    const int64_t rest = args.numel[t] - begin;
    const int n = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
    const T* __restrict__ g = static_cast<const T*>(args.in[0][t]) + begin;
    T* __restrict__ dg = static_cast<T*>(args.out[0][t]) + begin;
    T acc = T(0);
    if (K == Kind::kAdam) {
      const T* __restrict__ m = static_cast<const T*>(args.in[1][t]) + begin;
      const T* __restrict__ v = static_cast<const T*>(args.in[2][t]) + begin;
      const T* __restrict__ dp = static_cast<const T*>(args.in[3][t]) + begin;
      // Absent output cotangents (empty lists) are zero.
      const T* __restrict__ dm =
          args.in[4][t] != nullptr ? static_cast<const T*>(args.in[4][t]) + begin : nullptr;
      const T* __restrict__ dv =
          args.in[5][t] != nullptr ? static_cast<const T*>(args.in[5][t]) + begin : nullptr;
      T* __restrict__ dmo = static_cast<T*>(args.out[1][t]) + begin;
      T* __restrict__ dvo = static_cast<T*>(args.out[2][t]) + begin;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        T a, b, e;
        acc += inner_adam_vjp_element(g[i], m[i], v[i], dp[i], dm != nullptr ? dm[i] : T(0),
                                      dv != nullptr ? dv[i] : T(0), s, a, b, e);
        dg[i] = a;
        dmo[i] = b;
        dvo[i] = e;
      }
    } else if (K == Kind::kMetaSgd) {
      const T* __restrict__ a = static_cast<const T*>(args.in[1][t]) + begin;
      const T* __restrict__ dp = static_cast<const T*>(args.in[2][t]) + begin;
      T* __restrict__ da = static_cast<T*>(args.out[1][t]) + begin;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        dg[i] = inner_sgd_d_grad(a[i], dp[i]);
        da[i] = inner_metasgd_d_lr(g[i], dp[i]);
      }
    } else {
      const T* __restrict__ dp = static_cast<const T*>(args.in[1][t]) + begin;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        dg[i] = inner_sgd_d_grad(lr, dp[i]);
        acc += dp[i] * g[i];
      }
    }
    if (K != Kind::kMetaSgd && partials != nullptr) {  // uniform across the block
      const T r = block_reduce(acc, SumOp{}, red);
      if (threadIdx.x == 0) partials[args.chunk_base + c] = r;
    }
  }
}

template <typename T, Kind K, bool BACKWARD>
void launch(const std::vector<const InnerPtrList*>& ins, const std::vector<const InnerPtrList*>& outs,
            const InnerSizeList& numels, const InnerStepConfig& cfg, uintptr_t partials,
            int device, cudaStream_t stream) {
  constexpr auto kernel = BACKWARD ? inner_backward_kernel<T, K> : inner_forward_kernel<T, K>;
  int32_t chunk_base = 0;
  // Chunks of zero-numel tensors do not exist, so the global chunk index of a table's
  // first chunk is the running count over the previous tables.
  for (const auto& table : plan_tables(numels, kInnerMaxTensors)) {
    InnerArgs args{};
    args.chunk_base = chunk_base;
    args.partials = reinterpret_cast<void*>(partials);
    args.lr_ptr = reinterpret_cast<const void*>(cfg.lr_ptr);
    args.lr = cfg.lr;
    args.beta1 = cfg.beta1;
    args.beta2 = cfg.beta2;
    args.eps = cfg.eps;
    args.step = cfg.step;
    const int64_t chunks = fill_chunk_table(args, table, [&](size_t k, size_t i) {
      for (size_t r = 0; r < ins.size(); ++r) {  // an empty list: absent (zero cotangent)
        args.in[r][k] = ins[r]->empty() ? nullptr : reinterpret_cast<const void*>((*ins[r])[i]);
      }
      for (size_t r = 0; r < outs.size(); ++r) args.out[r][k] = reinterpret_cast<void*>((*outs[r])[i]);
    });
    const int grid = persistent_grid<kernel>(device, chunks);
    kernel<<<grid, kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH(BACKWARD ? "inner_backward_kernel" : "inner_forward_kernel");
    chunk_base += static_cast<int32_t>(chunks);
  }
}

// Calls launch<T, K, BACKWARD> with the device of the first non-empty tensor current.
template <Kind K, bool BACKWARD>
void run(const std::vector<const InnerPtrList*>& ins, const std::vector<const InnerPtrList*>& outs,
         const InnerSizeList& numels, bool f64, const InnerStepConfig& cfg, uintptr_t partials,
         uintptr_t stream) {
  const size_t first = first_nonempty(numels);
  if (first == numels.size()) return;
  DeviceGuard guard((*ins[0])[first]);
  if (f64) {
    launch<double, K, BACKWARD>(ins, outs, numels, cfg, partials, guard.device(), as_stream(stream));
  } else {
    launch<float, K, BACKWARD>(ins, outs, numels, cfg, partials, guard.device(), as_stream(stream));
  }
}

}  // namespace
}  // namespace cuda

void inner_sgd_cuda(const InnerPtrList& params, const InnerPtrList& grads, const InnerPtrList& lrs,
                    const InnerPtrList& out, const InnerSizeList& numels, bool f64,
                    const InnerStepConfig& cfg, uintptr_t stream) {
  if (lrs.empty()) {
    cuda::run<cuda::Kind::kSgd, false>({&params, &grads}, {&out}, numels, f64, cfg, 0, stream);
  } else {
    cuda::run<cuda::Kind::kMetaSgd, false>({&params, &grads, &lrs}, {&out}, numels, f64, cfg, 0,
                                           stream);
  }
}

void inner_sgd_backward_cuda(const InnerPtrList& grads, const InnerPtrList& lrs,
                             const InnerPtrList& d_params, const InnerPtrList& d_grads,
                             const InnerPtrList& d_lrs, const InnerSizeList& numels, bool f64,
                             const InnerStepConfig& cfg, uintptr_t partials, uintptr_t stream) {
  if (lrs.empty()) {
    cuda::run<cuda::Kind::kSgd, true>({&grads, &d_params}, {&d_grads}, numels, f64, cfg, partials,
                                      stream);
  } else {
    cuda::run<cuda::Kind::kMetaSgd, true>({&grads, &lrs, &d_params}, {&d_grads, &d_lrs}, numels,
                                          f64, cfg, 0, stream);
  }
}

void inner_adam_cuda(const InnerPtrList& params, const InnerPtrList& grads,
                     const InnerPtrList& exp_avgs, const InnerPtrList& exp_avg_sqs,
                     const InnerPtrList& params_out, const InnerPtrList& exp_avgs_out,
                     const InnerPtrList& exp_avg_sqs_out, const InnerSizeList& numels, bool f64,
                     const InnerStepConfig& cfg, uintptr_t stream) {
  cuda::run<cuda::Kind::kAdam, false>({&params, &grads, &exp_avgs, &exp_avg_sqs},
                                      {&params_out, &exp_avgs_out, &exp_avg_sqs_out}, numels, f64,
                                      cfg, 0, stream);
}

void inner_adam_backward_cuda(const InnerPtrList& grads, const InnerPtrList& exp_avgs,
                              const InnerPtrList& exp_avg_sqs, const InnerPtrList& d_params,
                              const InnerPtrList& d_exp_avgs, const InnerPtrList& d_exp_avg_sqs,
                              const InnerPtrList& d_grads_out, const InnerPtrList& d_exp_avgs_out,
                              const InnerPtrList& d_exp_avg_sqs_out, const InnerSizeList& numels,
                              bool f64, const InnerStepConfig& cfg, uintptr_t partials,
                              uintptr_t stream) {
  cuda::run<cuda::Kind::kAdam, true>(
      {&grads, &exp_avgs, &exp_avg_sqs, &d_params, &d_exp_avgs, &d_exp_avg_sqs},
      {&d_grads_out, &d_exp_avgs_out, &d_exp_avg_sqs_out}, numels, f64, cfg, partials, stream);
}

}  // namespace pyoptk
