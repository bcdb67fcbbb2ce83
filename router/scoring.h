// Inner-product scoring of many queries against many keys: C = A · Bᵀ.
//
// Why not plain sgemm: BLAS libraries pick different kernels and summation
// orders by matrix shape, so the same token against the same expert can score
// differently in a 4096-token batch and in a 3-token list group (we measured
// a third of the entries differing in OpenBLAS 0.3.21). Routing must not
// depend on how tokens were batched, grouped or spread over ranks, so every
// logit in airmoe comes from this kernel, whose result for an entry depends
// only on the two rows: 8 FMA lanes over k in order, then a fixed lane tree.
#pragma once

#include <cstdint>

#include "core/matrix.h"

namespace airmoe::inline router {

// C[i * ldc + j] = <A row i, B row j> for i < m, j < n, over k columns.
// Runs multi-threaded when called outside an OpenMP parallel region and the
// work is large enough; single-threaded inside one (the grouped scorer calls
// it per inverted list from its own parallel loop).
void score_nt(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
              int64_t k, float* c, int64_t ldc);

inline void score_nt(MatrixView a, MatrixView b, float* c) {
  score_nt(a.data, a.cols, b.data, b.cols, a.rows, b.rows, a.cols, c, b.rows);
}

// The same value score_nt computes for one pair, for code that scores a
// handful of pairs (rescoring, references that must agree bit for bit).
float score_one(const float* a, const float* b, int64_t k);

// Which implementation score_nt uses on this CPU ("avx2-fma" or "portable");
// both give identical bits.
const char* scoring_kernel_name();

}  // namespace airmoe::inline router
