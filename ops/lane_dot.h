// The one inner product of airmoe. Every logit, probe score and expert
// product is this sum, on every backend, so that an entry depends only on
// its two rows (not on the batch, the tile, the threads or the rank) and
// the backends agree bit for bit:
//   lane l (0..7) accumulates a[i] * b[i] for i = l, l + 8, ... in order with
//   fused multiply-adds; lanes past a partial last block of eight add
//   0 * 0 (which turns a -0 lane into +0); then
//   ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
// Why not a BLAS sgemm: BLAS picks kernels and summation orders by shape,
// so the same token and expert would score differently in a batch of 4,096
// and in a list group of 3 (docs/architecture.md).
// The SIMD kernels (ops/host/) keep exactly this structure; this scalar
// form is their reference and the device backends' kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/hd.h"

namespace airmoe::inline ops {

constexpr int kLanes = 8;

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
AIRMOE_HD inline float widen_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

AIRMOE_HD inline float load_float(const float* p, int64_t i) { return p[i]; }
AIRMOE_HD inline float load_float(const uint16_t* p, int64_t i) { return widen_bf16(p[i]); }

AIRMOE_HD inline float lane_tree(const float* lane) {
  const float t0 = lane[0] + lane[4], t1 = lane[1] + lane[5];
  const float t2 = lane[2] + lane[6], t3 = lane[3] + lane[7];
  return (t0 + t2) + (t1 + t3);
}

// sum over i < k of a[i * sa] * b[i * sb] in the lane order (strides in
// elements; 1 for rows, the row length for a column of a row-major matrix).
template <typename A, typename B>
AIRMOE_HD inline float lane_dot(const A* a, int64_t sa, const B* b, int64_t sb, int64_t k) {
  float lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < k; ++i)
    lane[i % kLanes] = fmaf(load_float(a, i * sa), load_float(b, i * sb), lane[i % kLanes]);
  if (k % kLanes != 0)
    for (int64_t l = k % kLanes; l < kLanes; ++l) lane[l] = fmaf(0.0f, 0.0f, lane[l]);
  return lane_tree(lane);
}

template <typename A, typename B>
AIRMOE_HD inline float lane_dot(const A* a, const B* b, int64_t k) {
  return lane_dot(a, 1, b, 1, k);
}

}  // namespace airmoe::inline ops
