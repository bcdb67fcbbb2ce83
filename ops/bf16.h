// bf16 storage: the high 16 bits of a float32. Widening is exact
// (widen_bf16, ops/lane_dot.h); narrowing rounds to nearest even and keeps
// a NaN a (quiet) NaN. Per-element code, the same on every backend.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/hd.h"
#include "core/tensor.h"
#include "ops/lane_dot.h"

namespace airmoe::inline ops {

AIRMOE_HD inline uint16_t narrow_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

AIRMOE_HD inline void store_float(float* p, int64_t i, float v) {
  p[i] = v;
}
AIRMOE_HD inline void store_float(uint16_t* p, int64_t i, float v) {
  p[i] = narrow_bf16(v);
}

// dst[i] = src[j] in dst's storage type: the same bits where the types
// agree (a NaN keeps its payload), else rounded as copy() rounds.
template <typename D, typename S>
AIRMOE_HD inline void convert_float(D* dst, int64_t i, const S* src, int64_t j) {
  if constexpr (std::is_same_v<D, S>)
    dst[i] = src[j];
  else
    store_float(dst, i, load_float(src, j));
}

// Calls fn(T{}) with T the storage type of a float tensor (f32: float,
// bf16: uint16_t).
template <typename Fn>
decltype(auto) with_float_type(const TensorView& v, Fn&& fn) {
  if (v.dtype == DType::kBF16) return fn(uint16_t{});
  return fn(float{});
}

// The same over two float tensors: fn(A{}, B{}).
template <typename Fn>
decltype(auto) with_float_types(const TensorView& a, const TensorView& b, Fn&& fn) {
  return with_float_type(
      a, [&](auto ta) { return with_float_type(b, [&](auto tb) { return fn(ta, tb); }); });
}

}  // namespace airmoe::inline ops
