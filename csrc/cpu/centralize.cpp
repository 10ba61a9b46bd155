// Gradient centralization on CPU. Work is split into segments of about kChunkSize
// elements across all tensors: a segment of a tensor with short rows holds whole rows
// (mean and subtraction done in the segment); a tensor whose rows are >= kChunkSize
// long is split into row pieces: pass 1 keeps a double partial sum per piece, pass 2
// sums a row's partials in piece order (deterministic) and subtracts the mean.
// The element math is pyoptk/centralize_math.h, shared with the CUDA kernel.
#include <algorithm>
#include <vector>

#include "cpu_util.h"
#include "pyoptk/api.h"
#include "pyoptk/centralize_math.h"

namespace pyoptk {
namespace {

struct Segment {
  int32_t tensor;
  bool piece;      // false: rows [row, row+count) whole; true: piece `count` of row `row`
  int64_t row;
  int64_t count;
  int64_t first_piece;  // piece mode: index of the row's first piece in the partials
};

template <typename T>
struct RowSum {  // double sum with a fixed association (see cpu::kLanes)
  PYOPTK_LOOP double run(const T* PYOPTK_RESTRICT g, int64_t n) {
    double acc[cpu::kLanes] = {};
    const int64_t nb = n - n % cpu::kLanes;
    for (int64_t b = 0; b < nb; b += cpu::kLanes) {
#pragma omp simd
      for (int k = 0; k < cpu::kLanes; ++k) acc[k] += static_cast<double>(load_f32(g[b + k]));
    }
    for (int64_t i = nb; i < n; ++i) acc[i - nb] += static_cast<double>(load_f32(g[i]));
    return cpu::combine_lanes(acc);
  }
};

template <typename T>
struct Subtract {
  PYOPTK_LOOP void run(T* PYOPTK_RESTRICT g, int64_t n, float mean) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] = store_from_f32<T>(centralize_apply(load_f32(g[i]), mean));
    }
  }
};

// Whole rows: mean and subtraction per row.
template <typename T>
struct WholeRows {
  PYOPTK_LOOP void run(T* g, int64_t count, int64_t cols) {
    for (int64_t r = 0; r < count; ++r) {
      T* row = g + r * cols;
      Subtract<T>::run(row, cols, centralize_mean(RowSum<T>::run(row, cols), cols));
    }
  }
};

template <typename T>
void centralize_impl(const PtrList& grads, const SizeList& rows, const SizeList& cols) {
  std::vector<Segment> segs;
  int64_t npieces = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    const int64_t R = rows[t], C = cols[t];
    if (R <= 0 || C <= 0) continue;
    if (C < kChunkSize) {
      const int64_t per = std::max<int64_t>(1, kChunkSize / C);
      for (int64_t r = 0; r < R; r += per)
        segs.push_back(Segment{static_cast<int32_t>(t), false, r, std::min(per, R - r), 0});
    } else {
      const int64_t pieces = num_chunks(C);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t k = 0; k < pieces; ++k)
          segs.push_back(Segment{static_cast<int32_t>(t), true, r, k, npieces});
        npieces += pieces;
      }
    }
  }
  std::vector<double> partials(static_cast<size_t>(npieces), 0.0);
  const int64_t ns = static_cast<int64_t>(segs.size());

  // Pass 1: whole-row segments finish; pieces record their partial sums.
  cpu::parallel_for(ns, [&](int64_t i) {
    const Segment& s = segs[static_cast<size_t>(i)];
    const int64_t C = cols[static_cast<size_t>(s.tensor)];
    T* base = cpu::as_ptr<T>(grads[static_cast<size_t>(s.tensor)]) + s.row * C;
    if (!s.piece) {
      cpu::run_loop<WholeRows<T>>(base, s.count, C);
    } else {
      const int64_t begin = s.count * kChunkSize;
      partials[static_cast<size_t>(s.first_piece + s.count)] =
          cpu::run_loop<RowSum<T>>(static_cast<const T*>(base + begin),
                                   std::min(kChunkSize, C - begin));
    }
  });
  if (npieces == 0) return;

  // Pass 2: pieces subtract their row's mean.
  cpu::parallel_for(ns, [&](int64_t i) {
    const Segment& s = segs[static_cast<size_t>(i)];
    if (!s.piece) return;
    const int64_t C = cols[static_cast<size_t>(s.tensor)];
    const int64_t pieces = num_chunks(C);
    double sum = 0.0;
    for (int64_t k = 0; k < pieces; ++k) sum += partials[static_cast<size_t>(s.first_piece + k)];
    T* base = cpu::as_ptr<T>(grads[static_cast<size_t>(s.tensor)]) + s.row * C;
    const int64_t begin = s.count * kChunkSize;
    cpu::run_loop<Subtract<T>>(base + begin, std::min(kChunkSize, C - begin),
                               centralize_mean(sum, C));
  });
}

}  // namespace

void centralize_cpu(const PtrList& grads, const SizeList& rows, const SizeList& cols,
                    int dtype) {
  if (grads.empty()) return;
  dispatch_dtype(dtype, [&](auto tag) { centralize_impl<decltype(tag)>(grads, rows, cols); });
}

}  // namespace pyoptk
