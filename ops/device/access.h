// What a functor of the device composition holds: typed row and vector
// accessors over memory of the op's device, and the per-element conversions
// (bf16 storage, sort keys). Plain structs of pointers and strides, so the
// same functor runs under g++ on host memory and under nvcc on a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/hd.h"
#include "core/tensor.h"
#include "ops/bf16.h"
#include "ops/lane_dot.h"
#include "ops/op_args.h"

namespace airmoe::inline ops::device {

// bf16 as stored: the high half of a float32 (widen_bf16 in lane_dot.h,
// narrow_bf16, store_float and with_float_type in bf16.h).
using bf16 = uint16_t;

// Rows of a 2-D tensor: element (r, c) at data[r * ld + c].
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t ld = 0;

  AIRMOE_HD T* row(int64_t r) const { return data + r * ld; }
  AIRMOE_HD T& operator()(int64_t r, int64_t c) const { return data[r * ld + c]; }
};

// A vector: an [n, 1] tensor (stride ld) or a [1, n] one (stride 1).
template <typename T>
struct Vec {
  T* data = nullptr;
  int64_t stride = 1;

  AIRMOE_HD T& operator[](int64_t i) const { return data[i * stride]; }
};

template <typename T>
Rows<T> rows_of(const TensorView& v) {
  return {static_cast<T*>(v.data), v.ld};
}

template <typename T>
Vec<T> vec_of(const TensorView& v) {
  return {static_cast<T*>(v.data), vector_stride(v)};
}

// A 32-bit key whose unsigned order is the float order (-0 and +0 equal),
// and its complement for a descending sort.
AIRMOE_HD inline uint32_t ascending_key(float f) {
  if (f == 0.0f) f = 0.0f;  // -0 ranks as +0, as a float compare does
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
AIRMOE_HD inline uint32_t descending_key(float f) {
  return ~ascending_key(f);
}

// One rounded float product and one rounded sum, never contracted into an
// fma, whatever the compiler's flags: the intrinsics under nvcc's device
// pass, plain operators elsewhere (the host builds use -ffp-contract=off).
AIRMOE_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AIRMOE_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

}  // namespace airmoe::inline ops::device
