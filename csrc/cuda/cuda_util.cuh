// Launch plumbing shared by the CUDA kernels (private to csrc/cuda): error checks, the
// device guard, grid sizing, multi-tensor tables, vector loads and deterministic block
// reductions. No optimizer math lives here (that is csrc/include/pyoptk/*_math.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pyoptk/api.h"
#include "pyoptk/common.h"

// Kernel arguments above 4 KB (the multi-tensor tables) need CUDA 12.1+.
#if CUDART_VERSION < 12010
#error "pyoptk's CUDA kernels need CUDA 12.1 or newer (kernel parameters up to 32764 bytes)"
#endif

namespace pyoptk {
namespace cuda {

// Largest kernel-parameter block (CUDA 12.1+, Volta+: 32764 bytes). Every argument
// struct is checked against it with a static_assert.
constexpr size_t kMaxKernelParamBytes = 32764;

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 4;  // elements per vector access (16 bytes of fp32 states)
static_assert(kChunkSize % (kVec * kThreads) == 0, "chunks are whole vector sweeps");

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file,
                                    int line) {
  throw std::runtime_error(std::string("pyoptk._C CUDA error in ") + what + " (" + file + ":" +
                           std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

#define PYOPTK_CUDA_CHECK(expr)                                              \
  do {                                                                       \
    const cudaError_t pyoptk_err_ = (expr);                                  \
    if (pyoptk_err_ != cudaSuccess) {                                        \
      ::pyoptk::cuda::throw_cuda(pyoptk_err_, #expr, __FILE__, __LINE__);    \
    }                                                                        \
  } while (0)

// After every <<<...>>>: launch-configuration errors (and earlier sticky errors).
#define PYOPTK_CUDA_CHECK_LAUNCH(name) \
  ::pyoptk::cuda::check_launch(name, __FILE__, __LINE__)

inline void check_launch(const char* name, const char* file, int line) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(err, name, file, line);
}

// Makes the device that owns `any_ptr` current for the scope (and restores the
// previous one), so a call for tensors on cuda:1 works whatever the current device is.
// Also rejects host pointers with a clear error instead of an illegal-address fault.
class DeviceGuard {
 public:
  explicit DeviceGuard(uintptr_t any_ptr) {
    cudaPointerAttributes attr{};
    PYOPTK_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(any_ptr)));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      throw std::invalid_argument(
          "pyoptk._C: a *_cuda function was given a pointer that is not CUDA device memory");
    }
    device_ = attr.device;
    PYOPTK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_) PYOPTK_CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);  // no throw from a destructor
  }
  int device() const { return device_; }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_ = 0;
  int previous_ = 0;
};

inline int sm_count(int device) {
  int n = 0;
  PYOPTK_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n > 0 ? n : 1;
}

// Resident blocks per SM of `Kernel` at kThreads threads (cached per kernel; only a
// grid-size heuristic, never needed for correctness).
template <auto Kernel>
inline int blocks_per_sm() {
  static const int cached = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0) != cudaSuccess) {
      cudaGetLastError();  // clear it; fall back to a safe guess
      n = 2;
    }
    return n > 0 ? n : 1;
  }();
  return cached;
}

// Persistent grid: enough blocks to fill the device, never more than work items.
template <auto Kernel>
inline int persistent_grid(int device, int64_t work_items) {
  const int64_t full = static_cast<int64_t>(sm_count(device)) * blocks_per_sm<Kernel>();
  const int64_t g = work_items < full ? work_items : full;
  return static_cast<int>(g > 0 ? g : 1);
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// ---- multi-tensor tables -------------------------------------------------------------
// Tensors of a call are packed into fixed-capacity tables passed by value as the kernel
// argument (__grid_constant__, read in place from the parameter bank). Zero-numel
// tensors are skipped. A call with more tensors than one table holds is split into
// consecutive tables (one launch each); kernels that use a workspace get the global
// chunk / tensor offset of their table so workspace slots stay global.
struct TableEntry {
  int32_t index;  // position in the call's lists
  int64_t numel;  // > 0
};

// Splits [0, numels.size()) into groups of at most `capacity` non-empty tensors.
inline std::vector<std::vector<TableEntry>> plan_tables(const SizeList& numels, int capacity) {
  std::vector<std::vector<TableEntry>> groups;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] <= 0) continue;
    if (groups.empty() || static_cast<int>(groups.back().size()) == capacity) groups.emplace_back();
    groups.back().push_back(TableEntry{static_cast<int32_t>(i), numels[i]});
  }
  return groups;
}

inline void check_chunk_count(int64_t chunks) {
  if (chunks > (int64_t{1} << 30)) {
    throw std::invalid_argument("pyoptk._C: too many elements in one call (more than 2^30 chunks)");
  }
}

// Fills the chunk layout of one table in a kernel argument block (`ntensors`, `numel`,
// `chunk_start` with its end sentinel, `nchunks`), calling `set_ptrs(k, i)` to store
// the pointers of the call's tensor i in table slot k. Returns the table's chunk count.
template <typename Args, typename SetPtrs>
inline int64_t fill_chunk_table(Args& args, const std::vector<TableEntry>& table,
                                SetPtrs&& set_ptrs) {
  args.ntensors = static_cast<int32_t>(table.size());
  int64_t chunks = 0;
  for (size_t k = 0; k < table.size(); ++k) {
    set_ptrs(k, static_cast<size_t>(table[k].index));
    args.numel[k] = table[k].numel;
    args.chunk_start[k] = static_cast<int32_t>(chunks);
    chunks += num_chunks(table[k].numel);
    check_chunk_count(chunks);
  }
  args.chunk_start[table.size()] = static_cast<int32_t>(chunks);
  args.nchunks = static_cast<int32_t>(chunks);
  return chunks;
}

// Index of the first tensor with elements (numels.size() when none has any): the one
// whose device the launches make current.
template <typename Sizes>
inline size_t first_nonempty(const Sizes& numels) {
  size_t first = 0;
  while (first < numels.size() && numels[first] == 0) ++first;
  return first;
}

// Binary search: the table slot t with chunk_start[t] <= c < chunk_start[t + 1].
__device__ __forceinline__ int find_slot(const int32_t* chunk_start, int n, int32_t c) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---- vector access -------------------------------------------------------------------
// kVec (= 4) consecutive elements as fp32: one 16-byte access for float, one 8-byte
// access for bf16/f16. Callers check alignment first.
__device__ __forceinline__ void unpack4(float4 r, float (&x)[kVec]) {
  x[0] = r.x; x[1] = r.y; x[2] = r.z; x[3] = r.w;
}
__device__ __forceinline__ float4 pack4(const float (&x)[kVec]) {
  return make_float4(x[0], x[1], x[2], x[3]);
}

template <typename T>
__device__ __forceinline__ void load4(const T* ptr, float (&x)[kVec]) {
  if constexpr (std::is_same<T, float>::value) {
    unpack4(*reinterpret_cast<const float4*>(ptr), x);
  } else {
    const uint2 r = *reinterpret_cast<const uint2*>(ptr);
    x[0] = load_f32(T{static_cast<uint16_t>(r.x & 0xFFFFu)});
    x[1] = load_f32(T{static_cast<uint16_t>(r.x >> 16)});
    x[2] = load_f32(T{static_cast<uint16_t>(r.y & 0xFFFFu)});
    x[3] = load_f32(T{static_cast<uint16_t>(r.y >> 16)});
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* ptr, const float (&x)[kVec]) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float4*>(ptr) = pack4(x);
  } else {
    uint2 r;
    r.x = static_cast<uint32_t>(store_from_f32<T>(x[0]).bits) |
          (static_cast<uint32_t>(store_from_f32<T>(x[1]).bits) << 16);
    r.y = static_cast<uint32_t>(store_from_f32<T>(x[2]).bits) |
          (static_cast<uint32_t>(store_from_f32<T>(x[3]).bits) << 16);
    *reinterpret_cast<uint2*>(ptr) = r;
  }
}

template <typename T>
__device__ __forceinline__ bool aligned_for_vec(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T))) == 0;
}

// ---- deterministic block reductions ---------------------------------------------------
// Fixed shuffle/tree order: the same inputs always give the same bits. `shared` must
// hold kWarps values; every thread of the block must call; the result is valid in all
// threads. Callers separate consecutive uses with the __syncthreads inside.
template <typename R, typename Op>
__device__ __forceinline__ R warp_reduce(R v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  return v;
}

template <typename R, typename Op>
__device__ __forceinline__ R block_reduce(R v, Op op, R* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  R r = shared[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, shared[w]);
  return r;
}

struct SumOp {
  template <typename R>
  __device__ __forceinline__ R operator()(R a, R b) const { return a + b; }
};
struct NanMaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const {
    return (a > b || a != a) ? a : b;
  }
};

// Effective learning rate: the device scalar when given, else the float.
__device__ __forceinline__ double effective_lr(double lr, const float* lr_ptr) {
  return lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr;
}

}  // namespace cuda
}  // namespace pyoptk
