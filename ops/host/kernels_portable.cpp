// The portable kernel set: lane_dot (ops/lane_dot.h) entry by entry.
#include "ops/host/kernels.h"
#include "ops/lane_dot.h"

namespace airmoe::inline ops::host {
namespace {

void score_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = lane_dot(a + i * lda, b + j * ldb, k);
}

void contract(const float* a, int64_t na, const float* b, int64_t nb, int64_t m, float* out) {
  for (int64_t i = 0; i < na; ++i)
    for (int64_t j = 0; j < nb; ++j) out[i * nb + j] = 0.0f + lane_dot(a + i, na, b + j, nb, m);
}

}  // namespace

const HostKernels& portable_kernels() {
  static const HostKernels kernels{"host-portable", score_block, contract, kPortableBlocks,
                                   nullptr};
  return kernels;
}

}  // namespace airmoe::inline ops::host
