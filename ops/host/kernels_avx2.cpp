// The AVX2 + FMA kernel set: lane_dot's eight lanes held in the eight floats
// of a ymm register, the same fused multiply-adds in the same order, the same
// reduction tree (ops/lane_dot.h), so it gives the portable set's bits.
//
// Blocks of at least a tile pack B once into panels of four rows (keys): for
// each chunk of eight depths, the four rows' eight floats one after another,
// zero past the depth and past the last row, so a panel streams as one
// sequential read. A 3 x 4 tile keeps 12 accumulators, three A rows and one
// panel row in the 16 ymm registers; row tiles run outer, so three rows of A
// stay in L1 while the panels stream past them from L2, and the tile's twelve
// entries are reduced together (lane_tree's adds, transposed) at the end.
// Smaller blocks (score_pairs' single entries) run the same tile on B's rows
// where they lie.
#include "ops/host/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <new>

#include "ops/host/packed_tiles.h"
#include "ops/lane_dot.h"

namespace airmoe::inline ops::host {
namespace {

#define AIRMOE_AVX2 __attribute__((target("avx2,fma")))

constexpr int kTileRows = 3;
constexpr int64_t kPanel = 4;                // B rows (output columns) per panel and tile
constexpr int64_t kChunk = kPanel * kLanes;  // floats of one depth chunk of a panel

// All ones in the lanes below `count`, zero above.
AIRMOE_AVX2 __m256i first_lanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Where a tile reads row s of B at depth p: where the rows lie, or in a
// packed panel (p a multiple of eight).
struct RowsB {
  const float* b;
  int64_t ldb;
  const float* at(int s, int64_t p) const { return b + s * ldb + p; }
};
struct PanelB {
  const float* panel;
  const float* at(int s, int64_t p) const { return panel + p * kPanel + s * kLanes; }
};

// lane_tree's first two levels on two entries x, y: per 128-bit half,
// u = [x: l0 + l4, l1 + l5, l2 + l6, l3 + l7 | y: the same] (t0..t3).
AIRMOE_AVX2 __m256 quarter_sum(__m256 x, __m256 y) {
  return _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
}
// Then t0 + t2, t1 + t3 of u's entry and of v's, per half.
AIRMOE_AVX2 __m256 half_sum(__m256 u, __m256 v) {
  return _mm256_add_ps(_mm256_shuffle_ps(u, v, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm256_shuffle_ps(u, v, _MM_SHUFFLE(3, 2, 3, 2)));
}

// lane_tree of two tile rows of four entries each: row r's four sums, then
// row r + 1's. Every add keeps lane_tree's operand order (lower lane first).
AIRMOE_AVX2 __m256 reduce_rows(const __m256* r0, const __m256* r1) {
  // Low half: column 0's (t0 + t2, t1 + t3), column 2's; high half: 1's, 3's.
  const __m256 w0 = half_sum(quarter_sum(r0[0], r0[1]), quarter_sum(r0[2], r0[3]));
  const __m256 w1 = half_sum(quarter_sum(r1[0], r1[1]), quarter_sum(r1[2], r1[3]));
  // Low half: (r0, col 0), (r0, col 2), (r1, col 0), (r1, col 2); high: cols 1, 3.
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm256_shuffle_ps(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

AIRMOE_AVX2 void store_row(float* c, __m128 sums, int64_t nr) {
  if (nr == kPanel)
    _mm_storeu_ps(c, sums);
  else
    _mm_maskstore_ps(c, _mm256_castsi256_si128(first_lanes(nr)), sums);
}

// An MR x NR tile of dot products over the full depth k, accumulators in
// registers (3 x 4: 12 accumulators + 3 A rows + 1 B row = 16 ymm), rows
// padded to an even count and columns to four for the reduction; stores
// c[r * ldc + j] for r < MR, j < nr.
template <int MR, int NR, typename B>
AIRMOE_AVX2 void tile(const float* a, int64_t lda, B b, int64_t k, float* c, int64_t ldc,
                      int64_t nr) {
  __m256 acc[MR + MR % 2][kPanel];
  for (auto& row : acc)
    for (__m256& v : row) v = _mm256_setzero_ps();
  const int64_t full = k - k % kLanes;
  for (int64_t p = 0; p < full; p += kLanes) {
    __m256 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm256_loadu_ps(a + r * lda + p);
    for (int s = 0; s < NR; ++s) {
      const __m256 bv = _mm256_loadu_ps(b.at(s, p));
      for (int r = 0; r < MR; ++r) acc[r][s] = _mm256_fmadd_ps(av[r], bv, acc[r][s]);
    }
  }
  if (full < k) {
    // Lanes past k load zero and add 0*0, exactly as lane_dot does.
    const __m256i mask = first_lanes(k - full);
    __m256 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm256_maskload_ps(a + r * lda + full, mask);
    for (int s = 0; s < NR; ++s) {
      const __m256 bv = _mm256_maskload_ps(b.at(s, full), mask);
      for (int r = 0; r < MR; ++r) acc[r][s] = _mm256_fmadd_ps(av[r], bv, acc[r][s]);
    }
  }
  for (int r = 0; r < MR; r += 2) {
    const __m256 sums = reduce_rows(acc[r], acc[r + 1]);
    store_row(c + r * ldc, _mm256_castps256_ps128(sums), nr);
    if (r + 1 < MR) store_row(c + (r + 1) * ldc, _mm256_extractf128_ps(sums, 1), nr);
  }
}

// ---- B where it lies: blocks too small to repay the packing ------------------

using RowsTile = void (*)(const float*, int64_t, RowsB, int64_t, float*, int64_t, int64_t);

template <int MR>
RowsTile pick_nr(int64_t nr) {
  switch (nr) {
    case 4:
      return tile<MR, 4, RowsB>;
    case 3:
      return tile<MR, 3, RowsB>;
    case 2:
      return tile<MR, 2, RowsB>;
    default:
      return tile<MR, 1, RowsB>;
  }
}

RowsTile pick_tile(int64_t mr, int64_t nr) {
  switch (mr) {
    case 3:
      return pick_nr<3>(nr);
    case 2:
      return pick_nr<2>(nr);
    default:
      return pick_nr<1>(nr);
  }
}

void score_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                int64_t k, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += kPanel) {
    const int64_t nr = std::min(kPanel, n - j);
    for (int64_t i = 0; i < m; i += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, m - i);
      pick_tile(mr, nr)(a + i * lda, lda, RowsB{b + j * ldb, ldb}, k, c + i * ldc + j, ldc, nr);
    }
  }
}

// ---- packed panels ---------------------------------------------------------

int64_t chunks_of(int64_t k) {
  return (k + kLanes - 1) / kLanes;
}

// Rows [0, n) of b into panels (see the file comment); `out` holds
// ceil(n / 4) * chunks_of(k) * kChunk floats. Written in order, chunk after
// chunk (four rows read side by side), so every cache line of the panels is
// filled by consecutive stores and never reread half-written.
AIRMOE_AVX2 void pack_b(const float* b, int64_t ldb, int64_t n, int64_t k, float* out) {
  const int64_t chunks = chunks_of(k), full = k / kLanes;
  const __m256i tail = first_lanes(k - full * kLanes);
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t rows = std::min(kPanel, n - j0);
    for (int64_t ch = 0; ch < chunks; ++ch, out += kChunk) {
      const float* row = b + j0 * ldb + ch * kLanes;
      for (int64_t s = 0; s < kPanel; ++s, row += ldb) {
        __m256 v = _mm256_setzero_ps();
        if (s < rows) v = ch < full ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, tail);
        _mm256_store_ps(out + s * kLanes, v);
      }
    }
  }
}

// b's rows packed into panels, then every tile of the m x n block. Throws std::bad_alloc where the
// panels cannot be allocated.
void score_packed(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                  int64_t k, float* c, int64_t ldc) {
  using PanelTile = void (*)(const float*, int64_t, PanelB, int64_t, float*, int64_t, int64_t);
  static constexpr PanelTile tiles[kTileRows] = {tile<1, kPanel, PanelB>, tile<2, kPanel, PanelB>,
                                                 tile<3, kPanel, PanelB>};
  const int64_t panel_floats = chunks_of(k) * kChunk;
  float* panels = scratch<float>(kPanels, (n + kPanel - 1) / kPanel * panel_floats);
  pack_b(b, ldb, n, k, panels);
  for_each_tile(m, n, kTileRows, kPanel, [&](int64_t i, int64_t j, int64_t rows, int64_t cols) {
    tiles[rows - 1](a + i * lda, lda, PanelB{panels + j / kPanel * panel_floats}, k,
                    c + i * ldc + j, ldc, cols);
  });
}

void score_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k, float* c, int64_t ldc) {
  // Same bits either way: the packing only pays where a panel meets several
  // rows; a block whose panels cannot be allocated needs none.
  if (m < 2 || n < kPanel) return score_rows(a, lda, b, ldb, m, n, k, c, ldc);
  try {
    score_packed(a, lda, b, ldb, m, n, k, c, ldc);
  } catch (const std::bad_alloc&) {
    score_rows(a, lda, b, ldb, m, n, k, c, ldc);
  }
}

// Eight output entries at once, each with its own eight lanes (one ymm per
// lane, one float per entry), so a contraction over an expert's few pairs
// needs no horizontal sum per entry. Columns past a multiple of eight are
// lane_dot's, entry by entry.
AIRMOE_AVX2 void contract(const float* a, int64_t na, const float* b, int64_t nb, int64_t m,
                          float* out) {
  const int64_t tail = m % kLanes, nv = nb - nb % kLanes;
  for (int64_t i = 0; i < na; ++i) {
    float* o = out + i * nb;
    for (int64_t j = 0; j < nv; j += kLanes) {
      __m256 acc[kLanes];
      for (int l = 0; l < kLanes; ++l) acc[l] = _mm256_setzero_ps();
      for (int64_t r0 = 0; r0 < m; r0 += kLanes)
        for (int l = 0; l < kLanes; ++l)
          if (r0 + l < m)
            acc[l] = _mm256_fmadd_ps(_mm256_set1_ps(a[(r0 + l) * na + i]),
                                     _mm256_loadu_ps(b + (r0 + l) * nb + j), acc[l]);
      if (tail != 0)  // lanes past the depth add 0 * 0, as lane_dot's do
        for (int l = tail; l < kLanes; ++l) acc[l] = _mm256_add_ps(acc[l], _mm256_setzero_ps());
      const __m256 t0 = _mm256_add_ps(acc[0], acc[4]), t1 = _mm256_add_ps(acc[1], acc[5]);
      const __m256 t2 = _mm256_add_ps(acc[2], acc[6]), t3 = _mm256_add_ps(acc[3], acc[7]);
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(t0, t2), _mm256_add_ps(t1, t3));
      _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_setzero_ps(), sum));
    }
    for (int64_t j = nv; j < nb; ++j) o[j] = 0.0f + lane_dot(a + i, na, b + j, nb, m);
  }
}

#undef AIRMOE_AVX2

}  // namespace

const HostKernels* avx2_kernels() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // A blocks of about 1 MiB, so that B is packed once for many row tiles
  // (only a tile's three rows need to stay in L1); B blocks (their panels)
  // of 64 KiB, in L2 on every AVX2 CPU, small for many tasks.
  static const HostKernels kernels{
      "host-avx2", score_block, contract, {kTileRows, kPanel, 1024 * 1024, 64 * 1024}, nullptr};
  return supported ? &kernels : nullptr;
}

}  // namespace airmoe::inline ops::host

#else  // not x86: no AVX2

namespace airmoe::inline ops::host {

const HostKernels* avx2_kernels() {
  return nullptr;
}

}  // namespace airmoe::inline ops::host

#endif
