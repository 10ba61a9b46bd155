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
#include <cstdlib>
#include <cstring>
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

// ---- instruction-set dispatch --------------------------------------------------------
// The wheel targets baseline x86-64 (SSE2), where the 32 -> 16 bit packing of the
// bf16/fp16 stores is slow and vectors are 4 floats wide. Every inner loop (a kernel
// struct K with a static, always-inlined run()) is therefore compiled three times, for
// baseline, AVX2+FMA and AVX-512 (512-bit vectors), and the best copy the CPU has runs.
// Implicit FMA contraction is off for all of csrc/cpu (-ffp-contract=off in
// CMakeLists.txt): a*b+c stays two roundings in every copy, and the fused multiply-adds
// that are wanted (the learned MLP's) are explicit fmaf calls — an instruction in the
// AVX2/AVX-512 copies, a correctly rounded library call in the baseline one. Every copy
// does the same IEEE operations in the same order: results are bit-identical whatever
// the instruction set.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PYOPTK_X86_DISPATCH 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYOPTK_LOOP static inline __attribute__((always_inline))
#else
#define PYOPTK_LOOP static inline
#endif

#ifdef PYOPTK_X86_DISPATCH
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the loops use: the best the CPU has, capped by the environment
// variable PYOPTK_CPU_ISA=baseline|avx2|avx512 (read once; tests run each copy and
// compare them bit for bit).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
    const char* cap = std::getenv("PYOPTK_CPU_ISA");
    Isa limit = Isa::kAvx512;
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) limit = Isa::kBaseline;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) limit = Isa::kAvx2;
    return static_cast<int>(best) < static_cast<int>(limit) ? best : limit;
  }();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

template <typename K, typename... A>
__attribute__((target("avx2,fma"))) auto run_avx2(A... a) -> decltype(K::run(a...)) {
  return K::run(a...);
}

template <typename K, typename... A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
auto run_avx512(A... a) -> decltype(K::run(a...)) {
  return K::run(a...);
}
#else
inline const char* cpu_isa_name() { return "baseline"; }
#endif

template <typename K, typename... A>
auto run_baseline(A... a) -> decltype(K::run(a...)) {
  return K::run(a...);
}

// K::run(a...) with the best instruction set available.
template <typename K, typename... A>
inline auto run_loop(A... a) -> decltype(K::run(a...)) {
#ifdef PYOPTK_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512: return run_avx512<K>(a...);
    case Isa::kAvx2: return run_avx2<K>(a...);
    default: break;
  }
#endif
  return run_baseline<K>(a...);
}

// ---- sums with a fixed association ---------------------------------------------------
// Sums inside a chunk use kLanes independent double accumulators (element i goes to
// lane i % kLanes) combined by a fixed tree: the compiler vectorizes the lanes without
// reassociating anything, so the result is the same for every instruction set, vector
// width and thread count.
constexpr int kLanes = 8;

#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))
#endif
inline double combine_lanes(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

template <typename T>
inline T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace cpu
}  // namespace pyoptk
