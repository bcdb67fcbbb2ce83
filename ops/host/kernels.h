// The SIMD kernel sets of the host backends: what differs between
// host-avx512, host-avx2 and host-portable, and nothing else does (ops/host/host_ops.h
// is written once over a kernel set). Both keep lane_dot's structure
// (ops/lane_dot.h) for every entry, so all give the same bits.
#pragma once

#include <cstdint>

namespace airmoe::inline ops::host {

// How HostOps cuts a scoring call into blocks for score_block: whole tiles,
// A (row) blocks of about a_bytes and B (key) blocks of about b_bytes.
// Only the speed depends on it: every entry is lane_dot of its two rows.
struct ScoreBlocks {
  int64_t tile_rows, tile_cols;
  int64_t a_bytes, b_bytes;
};

struct HostKernels {
  const char* name;  // the backend's name: "host-avx512", "host-avx2", "host-portable"
  // c[i * ldc + j] = lane_dot(a row i, b row j) over k, for i < m, j < n.
  void (*score_block)(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
                      int64_t n, int64_t k, float* c, int64_t ldc);
  // out[i * nb + j] = 0 + lane_dot over r < m of a[r * na + i] * b[r * nb + j]
  // (a: [m, na], b: [m, nb], out: [na, nb]): a contraction over the rows,
  // as the experts' parameter gradients need it (the 0 + turns a -0 sum
  // into +0, as accumulating into zeros does).
  void (*contract)(const float* a, int64_t na, const float* b, int64_t nb, int64_t m, float* out);
  ScoreBlocks blocks;
  // score_block on bf16 rows (a and b both bf16): the bits of score_block on
  // their exact float32 widening; nullptr where the set has none (HostOps
  // then widens the rows and runs score_block).
  void (*score_bf16)(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m,
                     int64_t n, int64_t k, float* c, int64_t ldc);
};

// The portable set's blocks (A in L1/L2, B in L2).
constexpr ScoreBlocks kPortableBlocks{3, 4, 96 * 1024, 192 * 1024};

// lane_dot itself, entry by entry: runs on every CPU.
const HostKernels& portable_kernels();
// AVX2 + FMA register tiles (one entry of eight lanes per ymm), B packed
// into panels; nullptr where the CPU lacks AVX2 or FMA (the one place the
// CPU is asked).
const HostKernels* avx2_kernels();
// AVX-512 F/VL/DQ/BW register tiles (two entries of eight lanes per zmm),
// bf16 rows widened as they are packed; nullptr where the CPU lacks them or
// AVX2 (its small blocks are AVX2's).
const HostKernels* avx512_kernels();

}  // namespace airmoe::inline ops::host
