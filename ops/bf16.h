// bf16 storage: the high 16 bits of a float32. Widening is exact
// (widen_bf16, ops/lane_dot.h); narrowing rounds to nearest even and keeps
// a NaN a (quiet) NaN. Per-element code, the same on every backend.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/hd.h"
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

}  // namespace airmoe::inline ops
