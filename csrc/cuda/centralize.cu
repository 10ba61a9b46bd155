// Gradient centralization on CUDA: one launch per call (per table of up to
// kCentralizeMaxTensors grads), no workspace, deterministic. Indexing and launch only;
// the math is pyoptk/centralize_math.h.
//
// Rows of all grads are enumerated by a prefix sum over "units":
//   cols >= kBlockRowCols : a unit is one row, reduced by the whole block;
//   cols <  kBlockRowCols : a unit is a group of rows, one warp per row.
// A unit reads its rows (sum, fp32 per thread then a fixed shuffle/tree order), then
// subtracts the fp32 mean; each element is read and written by the same thread.
#include "cuda_util.cuh"
#include "pyoptk/centralize_math.h"

namespace pyoptk {
namespace cuda {
namespace {

constexpr int kCentralizeMaxTensors = 1024;
constexpr int64_t kBlockRowCols = 1024;

struct CentralizeArgs {
  void* g[kCentralizeMaxTensors];
  int64_t rows[kCentralizeMaxTensors];
  int64_t cols[kCentralizeMaxTensors];
  int32_t unit_start[kCentralizeMaxTensors + 1];  // prefix sum of units
  int32_t ntensors;
  int32_t nunits;
};
static_assert(sizeof(CentralizeArgs) <= kMaxKernelParamBytes,
              "centralize table exceeds kernel params");

// Rows per unit: 1 (block per row) for long rows, else a multiple of the warp count
// sized to about kChunkSize elements.
__host__ __device__ __forceinline__ int64_t rows_per_unit(int64_t cols) {
  if (cols >= kBlockRowCols) return 1;
  const int64_t per_warp = kChunkSize / (kWarps * cols);
  return kWarps * (per_warp > 0 ? per_warp : 1);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    centralize_kernel(const __grid_constant__ CentralizeArgs args) {
  __shared__ float red[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int32_t u = blockIdx.x; u < args.nunits; u += gridDim.x) {
    const int t = find_slot(args.unit_start, args.ntensors, u);
    const int64_t cols = args.cols[t];
    const int64_t local = u - args.unit_start[t];
    T* __restrict__ g = static_cast<T*>(args.g[t]);
    if (cols >= kBlockRowCols) {  // block-uniform branch
      T* __restrict__ row = g + local * cols;
      float acc = 0.0f;
      for (int64_t i = threadIdx.x; i < cols; i += kThreads) acc += load_f32(row[i]);
      const float sum = block_reduce(acc, SumOp{}, red);  // all reads precede all writes
      const float mean = centralize_mean(static_cast<double>(sum), cols);
      for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
        row[i] = store_from_f32<T>(centralize_apply(load_f32(row[i]), mean));
      }
    } else {
      const int64_t per = rows_per_unit(cols);
      const int64_t r0 = local * per;
      const int64_t r1 = r0 + per < args.rows[t] ? r0 + per : args.rows[t];
      for (int64_t r = r0 + warp; r < r1; r += kWarps) {
        T* __restrict__ row = g + r * cols;
        float acc = 0.0f;
        for (int64_t i = lane; i < cols; i += 32) acc += load_f32(row[i]);
        const float sum = warp_reduce(acc, SumOp{});
        const float mean = centralize_mean(static_cast<double>(sum), cols);
        for (int64_t i = lane; i < cols; i += 32) {
          row[i] = store_from_f32<T>(centralize_apply(load_f32(row[i]), mean));
        }
      }
    }
  }
}

template <typename T>
void launch_centralize(const PtrList& grads, const SizeList& rows, const SizeList& cols,
                       int device, cudaStream_t stream) {
  constexpr auto kernel = centralize_kernel<T>;
  SizeList sizes(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    sizes[i] = (rows[i] > 0 && cols[i] > 0) ? rows[i] * cols[i] : 0;
  }
  for (const auto& table : plan_tables(sizes, kCentralizeMaxTensors)) {
    CentralizeArgs args;
    args.ntensors = static_cast<int32_t>(table.size());
    int64_t units = 0;
    for (size_t k = 0; k < table.size(); ++k) {
      const size_t i = static_cast<size_t>(table[k].index);
      args.g[k] = reinterpret_cast<void*>(grads[i]);
      args.rows[k] = rows[i];
      args.cols[k] = cols[i];
      args.unit_start[k] = static_cast<int32_t>(units);
      const int64_t per = rows_per_unit(cols[i]);
      units += (rows[i] + per - 1) / per;
      check_chunk_count(units);
    }
    args.unit_start[table.size()] = static_cast<int32_t>(units);
    args.nunits = static_cast<int32_t>(units);
    kernel<<<persistent_grid<kernel>(device, units), kThreads, 0, stream>>>(args);
    PYOPTK_CUDA_CHECK_LAUNCH("centralize_kernel");
  }
}

}  // namespace
}  // namespace cuda

void centralize_cuda(const PtrList& grads, const SizeList& rows, const SizeList& cols,
                     int dtype, uintptr_t stream) {
  size_t first = 0;
  while (first < grads.size() && !(rows[first] > 0 && cols[first] > 0)) ++first;
  if (first == grads.size()) return;
  cuda::DeviceGuard guard(grads[first]);
  dispatch_dtype(dtype, [&](auto tag) {
    cuda::launch_centralize<decltype(tag)>(grads, rows, cols, guard.device(),
                                           cuda::as_stream(stream));
  });
}

}  // namespace pyoptk
