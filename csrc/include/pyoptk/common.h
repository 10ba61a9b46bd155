// pyoptk native library: definitions shared by the C++ CPU loops and the CUDA kernels.
//
// Everything here is usable from host code compiled by the C++ compiler and from
// device code compiled by nvcc. The per-element math headers (adamw_math.h, ...) build
// on it, so the CPU backend runs exactly the arithmetic the GPU kernels run.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PYOPTK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// always_inline: the CPU loops only vectorize when the math is inlined into them.
#define PYOPTK_HD inline __attribute__((always_inline))
#else
#define PYOPTK_HD inline
#endif

// True while compiling the device side of a .cu file.
#if defined(__CUDA_ARCH__)
#define PYOPTK_ON_DEVICE 1
#else
#define PYOPTK_ON_DEVICE 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYOPTK_RESTRICT __restrict__
#else
#define PYOPTK_RESTRICT
#endif

namespace pyoptk {

// Elements per chunk: the unit of parallel work on CPU and GPU, and the granularity of
// the partial sums that the reductions (LAMB norms, gradient norm) keep in their
// workspace. A multiple of every vector width used (16 bytes of any dtype).
constexpr int64_t kChunkSize = 16384;

// dtype codes of params/grads (optimizer states are always float32).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// 16-bit storage types. Distinct types so templates can dispatch on them; layout is
// exactly the 2-byte IEEE/bfloat16 pattern torch stores.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};
static_assert(sizeof(bf16_t) == 2 && sizeof(f16_t) == 2, "16-bit storage types");

PYOPTK_HD uint32_t float_as_bits(float f) {
#if PYOPTK_ON_DEVICE
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

PYOPTK_HD float bits_as_float(uint32_t u) {
#if PYOPTK_ON_DEVICE
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- bfloat16 <-> float, float16 <-> float (host) ------------------------------------
// Written without branches: every case is computed and the result picked with integer
// masks. Conditional selects would let the compiler sink the fp32 operations into
// branches, which it may not speculate back (trapping math), and the CPU loops would
// not vectorize. Device code uses the CUDA intrinsics instead (see load_f32 below).
// Verified exhaustively against independent references for all 2^32 float inputs.

// Selects a where mask is all ones, b where it is zero.
PYOPTK_HD int32_t select_mask(int32_t mask, int32_t a, int32_t b) { return (a & mask) | (b & ~mask); }
PYOPTK_HD int32_t mask_if(bool c) { return -static_cast<int32_t>(c); }

PYOPTK_HD float bf16_bits_to_float(uint16_t h) {
  return bits_as_float(static_cast<uint32_t>(h) << 16);
}

// Round to nearest even. NaN stays NaN (quietened, sign and top payload bits kept);
// Inf stays Inf; finite values above the largest bf16 round to Inf as IEEE requires;
// subnormals round like any other value (bf16 has float's exponent range).
PYOPTK_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const int32_t rounded = static_cast<int32_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  const int32_t nan = static_cast<int32_t>((u >> 16) | 0x0040u);
  const bool is_nan = static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000;
  return static_cast<uint16_t>(select_mask(mask_if(is_nan), nan, rounded));
}

PYOPTK_HD float f16_bits_to_float(uint16_t h) {
  const int32_t em = h & 0x7FFF;  // exponent and mantissa
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  // Normal: shift into place and rebias the exponent (15 -> 127); Inf/NaN (exponent 31)
  // get the exponent 255 by a second rebias; the payload is kept.
  int32_t bits = (em << 13) + 0x38000000;
  bits += select_mask(mask_if(em >= 0x7C00), 0x38000000, 0);
  // Zero and subnormals: em * 2^-24 is exact in float (em < 2^10).
  const int32_t sub = static_cast<int32_t>(
      float_as_bits(static_cast<float>(em) * 5.9604644775390625e-8f));
  bits = select_mask(mask_if(em < 0x0400), sub, bits);
  return bits_as_float(static_cast<uint32_t>(bits) | sign);
}

// Round to nearest even, IEEE semantics: NaN -> quiet NaN (sign and top payload bits
// kept), +-Inf -> +-Inf, |x| >= 65520 -> +-Inf, results below 2^-14 become
// subnormals (or signed zero) with correct rounding.
PYOPTK_HD uint16_t float_to_f16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t a = static_cast<int32_t>(u & 0x7FFFFFFFu);
  // Normal range [2^-14, 65520): rebias (127 -> 15) and round the 13 dropped bits; the
  // carry of a mantissa round-up moves into the exponent, which is correct.
  const int32_t nb = a - 0x38000000;  // (112 << 23)
  const int32_t normal = (nb + 0x0FFF + ((nb >> 13) & 1)) >> 13;
  // Subnormal range (< 2^-14): adding 0.5 (ulp 2^-24, the half subnormal step) rounds
  // the value to the subnormal grid with the FPU's own round-to-nearest-even.
  const int32_t subnormal =
      static_cast<int32_t>(float_as_bits(bits_as_float(static_cast<uint32_t>(a)) + 0.5f)) -
      0x3F000000;  // bits of 0.5
  const int32_t nan = 0x7E00 | ((a >> 13) & 0x3FF);
  int32_t r = select_mask(mask_if(a >= 0x38800000), normal, subnormal);
  r = select_mask(mask_if(a >= 0x477FF000), 0x7C00, r);  // >= 65520 (and Inf) -> Inf
  r = select_mask(mask_if(a > 0x7F800000), nan, r);
  return static_cast<uint16_t>(static_cast<uint32_t>(r) | sign);
}

// ---- typed load/store --------------------------------------------------------------
// load_f32 / store_from_f32 turn a stored element into the fp32 the math runs in and
// back (round-to-nearest-even). Device code uses the CUDA intrinsics.

PYOPTK_HD float load_f32(float x) { return x; }
PYOPTK_HD float load_f32(bf16_t x) {
#if PYOPTK_ON_DEVICE
  return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
  return bf16_bits_to_float(x.bits);
#endif
}
PYOPTK_HD float load_f32(f16_t x) {
#if PYOPTK_ON_DEVICE
  return __half2float(__ushort_as_half(x.bits));
#else
  return f16_bits_to_float(x.bits);
#endif
}

template <typename T>
PYOPTK_HD T store_from_f32(float x);

template <>
PYOPTK_HD float store_from_f32<float>(float x) {
  return x;
}
template <>
PYOPTK_HD bf16_t store_from_f32<bf16_t>(float x) {
#if PYOPTK_ON_DEVICE
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  return bf16_t{float_to_bf16_bits(x)};
#endif
}
template <>
PYOPTK_HD f16_t store_from_f32<f16_t>(float x) {
#if PYOPTK_ON_DEVICE
  return f16_t{__half_as_ushort(__float2half_rn(x))};
#else
  return f16_t{float_to_f16_bits(x)};
#endif
}

// NaN-propagating maximum (like torch.maximum): NaN if either input is NaN.
PYOPTK_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// ---- dispatch ----------------------------------------------------------------------

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    default: return "unknown";
  }
}

// Calls f(T{}) with T the storage type of `code` (float, bf16_t or f16_t).
template <typename F>
inline void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); return;
    case kBFloat16: f(bf16_t{}); return;
    case kFloat16: f(f16_t{}); return;
    default:
      throw std::invalid_argument("pyoptk._C: dtype code must be 0 (float32), 1 (bfloat16) "
                                  "or 2 (float16), got " + std::to_string(code));
  }
}

// Calls f(std::integral_constant<bool, A>{}, std::integral_constant<bool, B>{}).
template <bool A, bool B>
struct BoolPair {
  static constexpr bool first = A;
  static constexpr bool second = B;
};
template <typename F>
inline void dispatch_bools(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(BoolPair<true, true>{}); else f(BoolPair<true, false>{});
  } else {
    if (b) f(BoolPair<false, true>{}); else f(BoolPair<false, false>{});
  }
}

inline int64_t num_chunks(int64_t numel) {
  return numel <= 0 ? 0 : (numel + kChunkSize - 1) / kChunkSize;
}

}  // namespace pyoptk
