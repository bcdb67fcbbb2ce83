// The AVX2 + FMA kernel set: lane_dot's eight lanes held in the eight floats
// of a ymm register, the same fused multiply-adds in the same order, the same
// reduction tree (ops/lane_dot.h), so it gives the portable set's bits.
#include "ops/host/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>

#include "ops/lane_dot.h"

namespace airmoe::inline ops::host {
namespace {

// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), lane_tree's order.
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// An MR x NR tile of dot products over the full depth k, accumulators in
// registers (3 x 4 tiles use 12 accumulators + 3 A rows + 1 B row = 16 ymm).
template <int MR, int NR>
__attribute__((target("avx2,fma"))) void tile(const float* a, int64_t lda, const float* b,
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
    // Lanes past k load zero and add 0*0, exactly as lane_dot does.
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
      return tile<MR, 4>;
    case 3:
      return tile<MR, 3>;
    case 2:
      return tile<MR, 2>;
    default:
      return tile<MR, 1>;
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

void score_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += kNR) {
    const int64_t nr = std::min(kNR, n - j);
    for (int64_t i = 0; i < m; i += kMR) {
      const int64_t mr = std::min(kMR, m - i);
      pick_tile(mr, nr)(a + i * lda, lda, b + j * ldb, ldb, k, c + i * ldc + j, ldc);
    }
  }
}

// Eight output entries at once, each with its own eight lanes (one ymm per
// lane, one float per entry), so a contraction over an expert's few pairs
// needs no horizontal sum per entry. Columns past a multiple of eight are
// lane_dot's, entry by entry.
__attribute__((target("avx2,fma"))) void contract(const float* a, int64_t na, const float* b,
                                                  int64_t nb, int64_t m, float* out) {
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

}  // namespace

const HostKernels* avx2_kernels() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const HostKernels kernels{"host-avx2", score_block, contract, kAvx2Blocks, nullptr};
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
