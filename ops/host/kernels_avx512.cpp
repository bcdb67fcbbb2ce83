// The AVX-512 kernel set: lane_dot's eight lanes in one half of a zmm
// register, so one register holds two output entries (two rows of B) with
// eight lanes each; the same fused multiply-adds in the same order and the
// same reduction tree (ops/lane_dot.h), so it gives the portable set's bits.
//
// B is packed once per block into panels of eight rows (keys): for each
// chunk of eight depths, four 16-float groups [row 2s, p..p+7 | row 2s+1,
// p..p+7], zero past the depth and past the last row, so one aligned load
// feeds two entries. Each A row's eight floats are broadcast into both halves
// by a memory-operand vbroadcastf32x8 (a load, not a shuffle). A 6 x 8 tile
// keeps 24 accumulators in registers; its reduction runs lane_tree's adds on
// sixteen entries per register (two rows of eight) at the end.
#include "ops/host/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <new>

#include "ops/host/packed_tiles.h"
#include "ops/lane_dot.h"

namespace airmoe::inline ops::host {
namespace {

#define AIRMOE_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw")))

// GCC 12's _mm512_undefined_ps (inside the shuffle and broadcast
// intrinsics) initializes a variable with itself on purpose.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

constexpr int kPairs = 4;                    // zmm accumulators per tile row
constexpr int64_t kPanel = 2 * kPairs;       // B rows (output columns) per panel
constexpr int64_t kChunk = kPanel * kLanes;  // floats of one depth chunk of a panel
constexpr int kTileRows = 6;

int64_t chunks_of(int64_t k) {
  return (k + kLanes - 1) / kLanes;
}

__mmask8 first_lanes(int64_t count) {
  return static_cast<__mmask8>((1u << count) - 1u);
}

// Eight floats of a row under a mask (zero elsewhere): f32 as they are,
// bf16 widened exactly (its bits are the float's high half).
AIRMOE_AVX512 __m256 load8(const float* x, __mmask8 valid) {
  return _mm256_maskz_loadu_ps(valid, x);
}
AIRMOE_AVX512 __m256 load8(const uint16_t* x, __mmask8 valid) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(valid, x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Rows [0, n) of b (f32 or bf16) into float panels (see the file comment);
// `out` holds ceil(n / 8) * chunks_of(k) * kChunk floats. Written in order,
// chunk after chunk (eight rows read side by side), so every cache line of
// the panels is filled by consecutive stores and never reread half-written.
template <typename T>
AIRMOE_AVX512 void pack_b(const T* b, int64_t ldb, int64_t n, int64_t k, float* out) {
  const int64_t chunks = chunks_of(k);
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t rows = std::min(kPanel, n - j0);
    for (int64_t c = 0; c < chunks; ++c, out += kChunk) {
      const int64_t p = c * kLanes;
      const __mmask8 valid = first_lanes(std::min<int64_t>(kLanes, k - p));
      for (int64_t s = 0; s < kPanel; ++s)
        _mm256_storeu_ps(out + s * kLanes,
                         s < rows ? load8(b + (j0 + s) * ldb + p, valid) : _mm256_setzero_ps());
    }
  }
}

// lane_tree on two tile rows of four accumulators each (eight entries per
// row): 16 results, row r's eight columns then row r + 1's. Every add keeps
// lane_tree's operand order (lower lane first).
AIRMOE_AVX512 __m512 pair_sum(__m512 x, __m512 y) {
  // 128-bit quarters [x0 x1 | x2 x3] hold lanes 0-3, 4-7 of two entries.
  const __m512 lo = _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0));
  const __m512 hi = _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1));
  return _mm512_add_ps(lo, hi);  // per quarter: t0..t3 of one entry
}

AIRMOE_AVX512 __m512 half_sum(__m512 x, __m512 y) {
  const __m512 lo = _mm512_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 hi = _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2));
  return _mm512_add_ps(lo, hi);  // per quarter: t0+t2, t1+t3 of x's entry, then y's
}

AIRMOE_AVX512 __m512 reduce_rows(const __m512* r0, const __m512* r1) {
  const __m512 u0 = half_sum(pair_sum(r0[0], r0[1]), pair_sum(r0[2], r0[3]));
  const __m512 u1 = half_sum(pair_sum(r1[0], r1[1]), pair_sum(r1[2], r1[3]));
  const __m512 lo = _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0));
  const __m512 hi = _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1));
  // Quarter q now holds (r0, col q), (r0, col 4 + q), (r1, col q), (r1, col 4 + q).
  const __m512 sums = _mm512_add_ps(lo, hi);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// A tile's accumulators (rows padded to an even count) reduced and stored:
// c[r * ldc + j] for r < MR, j < nr.
template <int MR>
AIRMOE_AVX512 void store_tile(const __m512 (&acc)[MR + MR % 2][kPairs], float* c, int64_t ldc,
                              int64_t nr) {
  const __mmask8 cols = first_lanes(nr);
  for (int r = 0; r < MR; r += 2) {
    const __m512 sums = reduce_rows(acc[r], acc[r + 1]);
    _mm256_mask_storeu_ps(c + r * ldc, cols, _mm512_castps512_ps256(sums));
    // The odd row's lanes shuffled down in a register, then a masked vmovups:
    // an extract of them stored under the mask (vextractf32x8 to memory,
    // which compilers fuse the two into) does not suppress faults on its
    // masked lanes (Intel SDM exception class E6NF), so a tile's last row
    // ending within 32 bytes of an unmapped page faulted.
    const __m256 odd =
        _mm512_castps512_ps256(_mm512_shuffle_f32x4(sums, sums, _MM_SHUFFLE(3, 2, 3, 2)));
    if (r + 1 < MR) _mm256_mask_storeu_ps(c + (r + 1) * ldc, cols, odd);
  }
}

// MR rows of A against one packed panel: c[r * ldc + j] for r < MR, j < nr.
template <int MR>
AIRMOE_AVX512 void tile(const float* a, int64_t lda, const float* panel, int64_t k, float* c,
                        int64_t ldc, int64_t nr) {
  __m512 acc[MR + MR % 2][kPairs];
  for (auto& row : acc)
    for (__m512& v : row) v = _mm512_setzero_ps();
  const int64_t full = k / kLanes;
  const float* bp = panel;
  for (int64_t ch = 0; ch < full; ++ch, bp += kChunk) {
    __m512 bv[kPairs];
    for (int s = 0; s < kPairs; ++s) bv[s] = _mm512_loadu_ps(bp + s * 2 * kLanes);
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_broadcast_f32x8(_mm256_loadu_ps(a + r * lda + ch * kLanes));
      for (int s = 0; s < kPairs; ++s) acc[r][s] = _mm512_fmadd_ps(av, bv[s], acc[r][s]);
    }
  }
  if (full * kLanes < k) {
    // Lanes past k: A loads zero, B was packed as zero, so they add 0 * 0
    // exactly as lane_dot's do.
    const __mmask8 tail = first_lanes(k % kLanes);
    __m512 bv[kPairs];
    for (int s = 0; s < kPairs; ++s) bv[s] = _mm512_loadu_ps(bp + s * 2 * kLanes);
    for (int r = 0; r < MR; ++r) {
      const __m512 av =
          _mm512_broadcast_f32x8(_mm256_maskz_loadu_ps(tail, a + r * lda + full * kLanes));
      for (int s = 0; s < kPairs; ++s) acc[r][s] = _mm512_fmadd_ps(av, bv[s], acc[r][s]);
    }
  }
  store_tile<MR>(acc, c, ldc, nr);
}

// b's rows packed into panels, then every tile of the m x n block: row
// tiles outer, so six rows of A stay in L1 while the panels stream past
// them from L2. Throws std::bad_alloc where the panels cannot be allocated.
template <typename T>
void pack_and_run(const float* a, int64_t lda, const T* b, int64_t ldb, int64_t m, int64_t n,
                  int64_t k, float* c, int64_t ldc) {
  using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);
  static constexpr TileFn tiles[kTileRows] = {tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
  const int64_t panel_floats = chunks_of(k) * kChunk;
  float* panels = scratch<float>(kPanels, (n + kPanel - 1) / kPanel * panel_floats);
  pack_b(b, ldb, n, k, panels);
  for_each_tile(m, n, kTileRows, kPanel, [&](int64_t i, int64_t j, int64_t rows, int64_t cols) {
    tiles[rows - 1](a + i * lda, lda, panels + j / kPanel * panel_floats, k, c + i * ldc + j, ldc,
                    cols);
  });
}

void score_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k, float* c, int64_t ldc) {
  // Blocks too small to repay the packing are the AVX2 tiles' (same bits);
  // so is a block whose panels cannot be allocated.
  const HostKernels* avx2 = avx2_kernels();
  if (m < 2 || n < kPanel) return avx2->score_block(a, lda, b, ldb, m, n, k, c, ldc);
  try {
    pack_and_run(a, lda, b, ldb, m, n, k, c, ldc);
  } catch (const std::bad_alloc&) {
    avx2->score_block(a, lda, b, ldb, m, n, k, c, ldc);
  }
}

// Sixteen output entries per zmm, each with its own eight lanes (one zmm
// per lane), as the AVX2 set's contraction with twice the width; the last
// columns load and store under a mask.
AIRMOE_AVX512 void contract(const float* a, int64_t na, const float* b, int64_t nb, int64_t m,
                            float* out) {
  constexpr int64_t kWidth = 16;
  const int64_t tail = m % kLanes;
  for (int64_t i = 0; i < na; ++i) {
    float* o = out + i * nb;
    for (int64_t j = 0; j < nb; j += kWidth) {
      const __mmask16 cols =
          static_cast<__mmask16>(nb - j >= kWidth ? 0xffffu : (1u << (nb - j)) - 1u);
      __m512 acc[kLanes];
      for (__m512& v : acc) v = _mm512_setzero_ps();
      for (int64_t r0 = 0; r0 < m; r0 += kLanes)
        for (int l = 0; l < kLanes && r0 + l < m; ++l)
          acc[l] = _mm512_fmadd_ps(_mm512_set1_ps(a[(r0 + l) * na + i]),
                                   _mm512_maskz_loadu_ps(cols, b + (r0 + l) * nb + j), acc[l]);
      if (tail != 0)  // lanes past the depth add 0 * 0, as lane_dot's do
        for (int l = tail; l < kLanes; ++l) acc[l] = _mm512_add_ps(acc[l], _mm512_setzero_ps());
      const __m512 t0 = _mm512_add_ps(acc[0], acc[4]), t1 = _mm512_add_ps(acc[1], acc[5]);
      const __m512 t2 = _mm512_add_ps(acc[2], acc[6]), t3 = _mm512_add_ps(acc[3], acc[7]);
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(t0, t2), _mm512_add_ps(t1, t3));
      _mm512_mask_storeu_ps(o + j, cols, _mm512_add_ps(_mm512_setzero_ps(), sum));
    }
  }
}

// ---- bf16 rows ---------------------------------------------------------------
//
// bf16 x bf16 runs the float32 tiles on rows widened (exactly) as they are
// packed: no widened copy of the whole key matrix, half the memory traffic,
// the float32 kernel's bits by construction. AVX512-BF16's vdpbf16ps can be
// packed to keep lane_dot's order but reads denormals as zero, and on this
// project's Xeon it ran at two thirds of these tiles' rate (docs/routing.md);
// AMX tiles do not round lane_dot's way at all.

// Row i of `rows` bf16 rows (stride ld) widened into out[i * k .. i * k + k).
AIRMOE_AVX512 void widen_rows(const uint16_t* x, int64_t ld, int64_t rows, int64_t k, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t p = 0; p < k; p += kLanes) {
      const __mmask8 valid = first_lanes(std::min<int64_t>(kLanes, k - p));
      _mm256_mask_storeu_ps(out + r * k + p, valid, load8(x + r * ld + p, valid));
    }
}

void score_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m,
                int64_t n, int64_t k, float* c, int64_t ldc) {
  try {
    float* wide_a = scratch<float>(kWideA, m * k);
    widen_rows(a, lda, m, k, wide_a);
    if (m < 2 || n < kPanel) {  // too small to repay the packing, as score_block's
      float* wide_b = scratch<float>(kWideB, n * k);
      widen_rows(b, ldb, n, k, wide_b);
      return avx2_kernels()->score_block(wide_a, k, wide_b, k, m, n, k, c, ldc);
    }
    pack_and_run(wide_a, k, b, ldb, m, n, k, c, ldc);
  } catch (const std::bad_alloc&) {  // lane_dot itself needs no memory
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = lane_dot(a + i * lda, b + j * ldb, k);
  }
}

#pragma GCC diagnostic pop
#undef AIRMOE_AVX512

}  // namespace

const HostKernels* avx512_kernels() {
  static const bool supported = avx2_kernels() != nullptr && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512bw");
  // A blocks of about 1 MiB (half this CPU's L2) so that B is packed once
  // for many row tiles; B blocks small, for many tasks.
  static const HostKernels kernels{"host-avx512",
                                   score_block,
                                   contract,
                                   {kTileRows, kPanel, 1024 * 1024, 128 * 1024},
                                   score_bf16};
  return supported ? &kernels : nullptr;
}

}  // namespace airmoe::inline ops::host

#else  // not x86: no AVX-512

namespace airmoe::inline ops::host {

const HostKernels* avx512_kernels() {
  return nullptr;
}

}  // namespace airmoe::inline ops::host

#endif
