#include "router/scoring.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AIRMOE_X86 1
#endif

namespace airmoe::inline router {
namespace {

constexpr int kLanes = 8;

// Portable twin of the AVX2 kernel: the same eight lanes, the same fused
// multiply-adds in the same order, the same reduction tree. Keeping the two
// bit-identical means a machine without AVX2 routes exactly like one with it.
float dot_portable(const float* a, const float* b, int64_t k) {
  float lane[kLanes] = {};
  for (int64_t base = 0; base < k; base += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t idx = base + l;
      const float x = idx < k ? a[idx] : 0.0f;
      const float y = idx < k ? b[idx] : 0.0f;
      lane[l] = std::fma(x, y, lane[l]);
    }
  }
  const float t0 = lane[0] + lane[4], t1 = lane[1] + lane[5];
  const float t2 = lane[2] + lane[6], t3 = lane[3] + lane[7];
  return (t0 + t2) + (t1 + t3);
}

void block_portable(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                    int64_t k, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = dot_portable(a + i * lda, b + j * ldb, k);
}

#ifdef AIRMOE_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// An MR x NR tile of dot products over the full depth k, accumulators in
// registers (3 x 4 tiles use 12 accumulators + 3 A rows + 1 B row = 16 ymm).
template <int MR, int NR>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* a, int64_t lda, const float* b,
                                                   int64_t ldb, int64_t k, float* c, int64_t ldc) {
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NR; ++s) acc[r][s] = _mm256_setzero_ps();
  const int64_t full = k - k % kLanes;
  for (int64_t p = 0; p < full; p += kLanes) {
    __m256 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm256_loadu_ps(a + r * lda + p);
    for (int s = 0; s < NR; ++s) {
      const __m256 bv = _mm256_loadu_ps(b + s * ldb + p);
      for (int r = 0; r < MR; ++r) acc[r][s] = _mm256_fmadd_ps(av[r], bv, acc[r][s]);
    }
  }
  if (full < k) {
    // Lanes past k load zero and add 0*0, exactly as the portable kernel does.
    alignas(32) int mask_bits[kLanes];
    for (int l = 0; l < kLanes; ++l) mask_bits[l] = (full + l < k) ? -1 : 0;
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(mask_bits));
    __m256 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm256_maskload_ps(a + r * lda + full, mask);
    for (int s = 0; s < NR; ++s) {
      const __m256 bv = _mm256_maskload_ps(b + s * ldb + full, mask);
      for (int r = 0; r < MR; ++r) acc[r][s] = _mm256_fmadd_ps(av[r], bv, acc[r][s]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NR; ++s) c[r * ldc + s] = hsum(acc[r][s]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <int MR>
TileFn pick_nr(int64_t nr) {
  switch (nr) {
    case 4:
      return tile_avx2<MR, 4>;
    case 3:
      return tile_avx2<MR, 3>;
    case 2:
      return tile_avx2<MR, 2>;
    default:
      return tile_avx2<MR, 1>;
  }
}

TileFn pick_tile(int64_t mr, int64_t nr) {
  switch (mr) {
    case 3:
      return pick_nr<3>(nr);
    case 2:
      return pick_nr<2>(nr);
    default:
      return pick_nr<1>(nr);
  }
}

constexpr int64_t kMR = 3;
constexpr int64_t kNR = 4;

void block_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                int64_t k, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += kNR) {
    const int64_t nr = std::min(kNR, n - j);
    for (int64_t i = 0; i < m; i += kMR) {
      const int64_t mr = std::min(kMR, m - i);
      pick_tile(mr, nr)(a + i * lda, lda, b + j * ldb, ldb, k, c + i * ldc + j, ldc);
    }
  }
}

bool has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                         float*, int64_t);

BlockFn block_kernel() {
#ifdef AIRMOE_X86
  if (has_avx2_fma()) return block_avx2;
#endif
  return block_portable;
}

}  // namespace

const char* scoring_kernel_name() {
#ifdef AIRMOE_X86
  if (has_avx2_fma()) return "avx2-fma";
#endif
  return "portable";
}

float score_one(const float* a, const float* b, int64_t k) {
  float out = 0.0f;
  block_kernel()(a, k, b, k, 1, 1, k, &out, 1);
  return out;
}

void score_nt(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
              int64_t k, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const BlockFn block = block_kernel();
  // Blocks sized so one block of B (the keys) stays in L2 while every A tile
  // of the row block streams past it.
  const int64_t row_bytes = std::max<int64_t>(k, 1) * static_cast<int64_t>(sizeof(float));
  const int64_t nb = std::max<int64_t>(kNR, (192 * 1024 / row_bytes) / kNR * kNR);
  const int64_t mb = std::max<int64_t>(kMR, (96 * 1024 / row_bytes) / kMR * kMR);
  const int64_t row_blocks = (m + mb - 1) / mb;
  const int64_t col_blocks = (n + nb - 1) / nb;
  const int64_t tasks = row_blocks * col_blocks;
  const bool parallel = !omp_in_parallel() && tasks > 1 && static_cast<double>(m) * n * k > 4.0e6;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) {
    // Column-major over tasks: consecutive tasks share a B block.
    const int64_t cb = t / row_blocks, rb = t % row_blocks;
    const int64_t i0 = rb * mb, j0 = cb * nb;
    block(a + i0 * lda, lda, b + j0 * ldb, ldb, std::min(mb, m - i0), std::min(nb, n - j0), k,
          c + i0 * ldc + j0, ldc);
  }
}

}  // namespace airmoe::inline router
