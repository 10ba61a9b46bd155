// Chunking and OpenMP helpers of the CPU backend (private to csrc/cpu).
//
// Every CPU op splits all tensors of the call into chunks of kChunkSize elements and
// runs the chunks in one OpenMP loop, so many small tensors do not serialize and one
// big tensor spreads over all threads. Reductions keep one partial per chunk (in
// double) and combine them afterwards in chunk order: results do not depend on the
// number of threads or on scheduling.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef PYOPTK_WITH_OPENMP
#include <omp.h>
#endif

#include "pyoptk/api.h"
#include "pyoptk/common.h"

namespace pyoptk {
namespace cpu {

struct Chunk {
  int32_t tensor;  // index into the call's lists
  int64_t begin;   // first element
  int64_t len;     // elements (1..kChunkSize)
};

// All chunks of all tensors, tensor by tensor. first_chunk (optional) receives, per
// tensor, the index of its first chunk (size numels.size() + 1).
inline std::vector<Chunk> make_chunks(const SizeList& numels,
                                      std::vector<int64_t>* first_chunk = nullptr) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : numels) total += num_chunks(n);
  chunks.reserve(static_cast<size_t>(total));
  if (first_chunk) first_chunk->assign(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) {
    if (first_chunk) (*first_chunk)[t] = static_cast<int64_t>(chunks.size());
    for (int64_t b = 0; b < numels[t]; b += kChunkSize) {
      chunks.push_back(Chunk{static_cast<int32_t>(t), b, std::min(kChunkSize, numels[t] - b)});
    }
  }
  if (first_chunk) (*first_chunk)[numels.size()] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// f(i) for i in [0, n), in parallel when there is more than one item. Dynamic
// scheduling balances chunks of different sizes; f must not throw.
template <typename F>
inline void parallel_for(int64_t n, F&& f) {
  if (n <= 0) return;
#ifdef PYOPTK_WITH_OPENMP
  if (n > 1 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) f(i);
}

template <typename T>
inline T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace cpu
}  // namespace pyoptk
