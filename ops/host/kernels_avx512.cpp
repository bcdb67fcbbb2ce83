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
#include <vector>

#include "ops/lane_dot.h"

namespace airmoe::inline ops::host {
namespace {

#define AIRMOE_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq")))

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

// Rows [0, n) of b into panels (see the file comment); `out` holds
// ceil(n / 8) * chunks_of(k) * kChunk floats.
AIRMOE_AVX512 void pack_b(const float* b, int64_t ldb, int64_t n, int64_t k, float* out) {
  const int64_t chunks = chunks_of(k), panels = (n + kPanel - 1) / kPanel;
  const int64_t full = k / kLanes;
  const __mmask8 tail = first_lanes(k % kLanes);
  for (int64_t j = 0; j < panels * kPanel; ++j) {
    const int64_t q = j / kPanel, s = (j % kPanel) / 2, h = j % 2;
    float* o = out + q * chunks * kChunk + s * 2 * kLanes + h * kLanes;
    if (j >= n) {
      for (int64_t c = 0; c < chunks; ++c) _mm256_storeu_ps(o + c * kChunk, _mm256_setzero_ps());
      continue;
    }
    const float* row = b + j * ldb;
    for (int64_t c = 0; c < full; ++c)
      _mm256_storeu_ps(o + c * kChunk, _mm256_loadu_ps(row + c * kLanes));
    if (full < chunks)
      _mm256_storeu_ps(o + full * kChunk, _mm256_maskz_loadu_ps(tail, row + full * kLanes));
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
    if (r + 1 < MR) _mm256_mask_storeu_ps(c + (r + 1) * ldc, cols, _mm512_extractf32x8_ps(sums, 1));
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

// A block's packed or widened rows, per thread and per use: grown,
// never shrunk, so a thread packs without allocating once it has seen its
// largest block; 64-byte aligned.
enum Scratch { kPanels, kRows, kWideA, kWideB, kScratchUses };
template <typename T>
T* scratch(Scratch use, int64_t count) {
  constexpr size_t kAlign = 64;
  thread_local std::vector<unsigned char> buffers[kScratchUses];
  std::vector<unsigned char>& buffer = buffers[use];
  const size_t bytes = static_cast<size_t>(count) * sizeof(T) + kAlign;
  if (buffer.size() < bytes) buffer.resize(bytes);
  const auto at = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>(buffer.data() + (kAlign - at % kAlign) % kAlign);
}

// Every tile of an m x n block: row tiles outer, so six rows of A stay in L1
// while the packed panels (`panel_size` elements each) stream past them
// from L2. The tiles are the instances for 1..6 rows.
template <typename Tile, typename In, typename Panel>
void run_tiles(Tile t1, Tile t2, Tile t3, Tile t4, Tile t5, Tile t6, const In* a, int64_t lda,
               const Panel* panels, int64_t panel_size, int64_t m, int64_t n, int64_t k, float* c,
               int64_t ldc) {
  const Tile tiles[kTileRows] = {t1, t2, t3, t4, t5, t6};
  for (int64_t i = 0; i < m; i += kTileRows) {
    const Tile run = tiles[std::min<int64_t>(kTileRows, m - i) - 1];
    for (int64_t j = 0; j < n; j += kPanel)
      run(a + i * lda, lda, panels + j / kPanel * panel_size, k, c + i * ldc + j, ldc,
          std::min(kPanel, n - j));
  }
}

void score_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k, float* c, int64_t ldc) {
  // Blocks too small to repay the packing are the AVX2 tiles' (same bits);
  // so is a block whose panels cannot be allocated.
  const HostKernels* avx2 = avx2_kernels();
  if (m < 2 || n < kPanel) return avx2->score_block(a, lda, b, ldb, m, n, k, c, ldc);
  const int64_t panel_floats = chunks_of(k) * kChunk;
  float* panels = nullptr;
  try {
    panels = scratch<float>(kPanels, (n + kPanel - 1) / kPanel * panel_floats);
  } catch (const std::bad_alloc&) {
    return avx2->score_block(a, lda, b, ldb, m, n, k, c, ldc);
  }
  pack_b(b, ldb, n, k, panels);
  run_tiles(tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, a, lda, panels, panel_floats, m,
            n, k, c, ldc);
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

// ---- bf16 x bf16: AVX512-BF16 ----------------------------------------------
//
// vdpbf16ps adds to each float lane the product of the odd bf16 pair member,
// then that of the even one, each product exact and each add rounded once
// (two fused multiply-adds), reading denormal inputs as zero and flushing
// denormal results. Packing x[16q + l] into the odd (high) half and
// x[16q + 8 + l] into the even (low) half of lane l's slot keeps lane_dot's
// order: lane l adds l, l + 8, l + 16, ... So the bits are lane_dot's of the
// widened rows as long as no input, product or lane sum is denormal or
// underflows. That holds when every nonzero entry has |x| >= 2^-51: entries
// are then multiples of 2^-58, so every product and every lane sum is a
// multiple of 2^-116, far above the denormals (and a lane, never underflowing,
// is never -0, so the zero padding past k adds +0 without effect). Inf and
// NaN are left out too (NaN payloads follow other rules). A block with any
// other entry is scored on its widened rows instead: the same bits, at the
// float32 rate.
#define AIRMOE_BF16 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16")))

constexpr uint16_t kSmallestFast = 76 << 7;  // |x| >= 2^-51: biased exponent >= 127 - 51
constexpr uint16_t kInfBits = 0x7f80;
constexpr int64_t kPairDepth = 2 * kLanes;  // depth of one packed chunk (two per lane)

int64_t pair_chunks(int64_t k) {
  return (k + kPairDepth - 1) / kPairDepth;
}

// The entries of `v` (bf16 bits) outside the fast range.
AIRMOE_BF16 __mmask8 outside_fast(__m128i v) {
  const __m128i mag = _mm_and_si128(v, _mm_set1_epi16(0x7fff));
  const __mmask8 tiny =
      _mm_cmplt_epu16_mask(mag, _mm_set1_epi16(kSmallestFast)) & _mm_test_epi16_mask(mag, mag);
  return tiny | _mm_cmpge_epu16_mask(mag, _mm_set1_epi16(static_cast<short>(kInfBits)));
}

// One row into lane pairs: chunk q (at out + q * stride) holds, for l < 8,
// x[16q + l] in the high half and x[16q + 8 + l] in the low half of slot l;
// zero past k. Whether every entry is in the fast range.
AIRMOE_BF16 bool pack_pairs(const uint16_t* x, int64_t k, uint32_t* out, int64_t stride) {
  __mmask8 outside = 0;
  for (int64_t q = 0, p = 0; p < k; ++q, p += kPairDepth) {
    const __m128i first =
        _mm_maskz_loadu_epi16(first_lanes(std::min<int64_t>(kLanes, k - p)), x + p);
    const __m128i second = _mm_maskz_loadu_epi16(
        first_lanes(std::clamp<int64_t>(k - p - kLanes, 0, kLanes)), x + p + kLanes);
    outside |= outside_fast(first) | outside_fast(second);
    auto* o = reinterpret_cast<__m128i*>(out + q * stride);
    _mm_storeu_si128(o, _mm_unpacklo_epi16(second, first));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(second, first));
  }
  return outside == 0;
}

// Rows [0, n) of b as panels of lane pairs, laid out as pack_b's floats
// (chunk q of a panel: [row 2s | row 2s + 1] per 64-byte group).
AIRMOE_BF16 bool pack_key_pairs(const uint16_t* b, int64_t ldb, int64_t n, int64_t k,
                                uint32_t* out) {
  const int64_t chunks = pair_chunks(k), panels = (n + kPanel - 1) / kPanel;
  bool fast = true;
  for (int64_t j = 0; j < panels * kPanel; ++j) {
    uint32_t* o = out + j / kPanel * chunks * kChunk + j % kPanel * kLanes;
    if (j < n) {
      fast = pack_pairs(b + j * ldb, k, o, kChunk) && fast;
    } else {
      for (int64_t q = 0; q < chunks; ++q)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + q * kChunk), _mm256_setzero_si256());
    }
  }
  return fast;
}

// MR rows of packed A (row stride lda slots) against one packed panel.
template <int MR>
AIRMOE_BF16 void tile_bf16(const uint32_t* a, int64_t lda, const uint32_t* panel, int64_t k,
                           float* c, int64_t ldc, int64_t nr) {
  __m512 acc[MR + MR % 2][kPairs];
  for (auto& row : acc)
    for (__m512& v : row) v = _mm512_setzero_ps();
  const int64_t chunks = pair_chunks(k);
  for (int64_t q = 0; q < chunks; ++q) {
    const uint32_t* bp = panel + q * kChunk;
    __m512bh bv[kPairs];
    for (int s = 0; s < kPairs; ++s) bv[s] = (__m512bh)_mm512_load_si512(bp + s * 2 * kLanes);
    for (int r = 0; r < MR; ++r) {
      const auto* ap = reinterpret_cast<const __m256i*>(a + r * lda + q * kLanes);
      const __m512bh av = (__m512bh)_mm512_broadcast_i32x8(_mm256_loadu_si256(ap));
      for (int s = 0; s < kPairs; ++s) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], av, bv[s]);
    }
  }
  store_tile<MR>(acc, c, ldc, nr);
}

// The block on vdpbf16ps; false (nothing written) where an entry is outside
// the fast range, the block is too small to repay the packing, or its
// packed rows cannot be allocated.
bool score_pairs_block(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m,
                       int64_t n, int64_t k, float* c, int64_t ldc) {
  if (m < 2 || n < kPanel) return false;
  const int64_t chunks = pair_chunks(k), panel_size = chunks * kChunk, row_size = chunks * kLanes;
  uint32_t *panels = nullptr, *rows = nullptr;
  try {
    panels = scratch<uint32_t>(kPanels, (n + kPanel - 1) / kPanel * panel_size);
    rows = scratch<uint32_t>(kRows, m * row_size);
  } catch (const std::bad_alloc&) {
    return false;
  }
  bool fast = pack_key_pairs(b, ldb, n, k, panels);
  for (int64_t r = 0; r < m && fast; ++r)
    fast = pack_pairs(a + r * lda, k, rows + r * row_size, kLanes);
  if (!fast) return false;
  run_tiles(tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>, tile_bf16<5>, tile_bf16<6>,
            rows, row_size, panels, panel_size, m, n, k, c, ldc);
  return true;
}

// `count` rows of bf16 widened into float rows of k.
float* widen_rows(Scratch use, const uint16_t* x, int64_t ld, int64_t count, int64_t k) {
  float* out = scratch<float>(use, count * k);
  for (int64_t r = 0; r < count; ++r)
    for (int64_t i = 0; i < k; ++i) out[r * k + i] = widen_bf16(x[r * ld + i]);
  return out;
}

void score_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m,
                int64_t n, int64_t k, float* c, int64_t ldc) {
  if (score_pairs_block(a, lda, b, ldb, m, n, k, c, ldc)) return;
  try {
    const float* wa = widen_rows(kWideA, a, lda, m, k);
    const float* wb = widen_rows(kWideB, b, ldb, n, k);
    score_block(wa, k, wb, k, m, n, k, c, ldc);
  } catch (const std::bad_alloc&) {  // lane_dot itself needs no memory
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = lane_dot(a + i * lda, b + j * ldb, k);
  }
}

#undef AIRMOE_BF16
#pragma GCC diagnostic pop
#undef AIRMOE_AVX512

}  // namespace

const HostKernels* avx512_kernels() {
  static const bool supported = avx2_kernels() != nullptr && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512dq");
  static const bool bf16 =
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  // A blocks of about 1 MiB (half this CPU's L2) so that B is packed once
  // for many row tiles; B blocks small, for many tasks.
  constexpr ScoreBlocks blocks{kTileRows, kPanel, 1024 * 1024, 128 * 1024};
  static const HostKernels with_bf16{"host-avx512", score_block, contract, blocks, score_bf16};
  static const HostKernels without_bf16{"host-avx512", score_block, contract, blocks, nullptr};
  if (!supported) return nullptr;
  return bf16 ? &with_bf16 : &without_bf16;
}

}  // namespace airmoe::inline ops::host

#else  // not x86: no AVX-512

namespace airmoe::inline ops::host {

const HostKernels* avx512_kernels() {
  return nullptr;
}

}  // namespace airmoe::inline ops::host

#endif
