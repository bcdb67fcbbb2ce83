#include "router/dense_router.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/checks.h"
#include "ops/topk.h"
#include "router/scoring.h"

namespace airmoe::inline router {

void check_route_args(MatrixView tokens, int64_t dim, int k, int64_t experts,
                      double key_norm_bound) {
  require_cols(tokens, dim, "tokens");
  require_in_range(k, 1, experts, "k");
  require_finite(tokens, "tokens");
  require_finite_logits(tokens, key_norm_bound, "tokens");
}

DenseRouter::DenseRouter(MatrixView centers) {
  if (centers.rows < 1 || centers.cols < 1)
    fail("centers must be [E >= 1, d >= 1], got [" + std::to_string(centers.rows) + ", " +
         std::to_string(centers.cols) + "]");
  require_expert_count(centers.rows, "centers rows E");
  require_finite(centers, "centers");
  centers_ = Matrix(centers.rows, centers.cols);
  std::copy_n(centers.data, centers.rows * centers.cols, centers_.data());
  key_norm_bound_ = max_row_norm(centers_.view());
}

Routes DenseRouter::route(MatrixView tokens, int k, GateMode mode) const {
  check_route_args(tokens, dim(), k, experts(), key_norm_bound_);
  const int64_t T = tokens.rows, E = experts();
  Routes r = make_routes(T, k, mode);
  std::fill(r.shortlist_size.begin(), r.shortlist_size.end(), static_cast<int32_t>(E));
  // Score a block of tokens against all of W, then select per row: the block
  // is sized so its logits (about 16 MiB) stay far below T x E.
  const int64_t block = std::clamp<int64_t>((int64_t{4} << 20) / E / 3 * 3, 3, 384);
  std::vector<float> logits(static_cast<size_t>(std::min(block, T) * E));
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t n = std::min(block, T - t0);
    score_nt(tokens.row(t0), tokens.cols, centers_.data(), dim(), n, E, dim(), logits.data(), E);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      const float* z = logits.data() + i * E;
      TopK top(k, r.logits.data() + t * k, r.experts.data() + t * k);
      for (int64_t e = 0; e < E; ++e) top.push_ascending(z[e], static_cast<int32_t>(e));
      if (mode == GateMode::kShortlist) {
        LogSumExp lse;
        for (int64_t e = 0; e < E; ++e) lse.add(z[e]);
        r.log_normalizer[t] = lse.value();
      }
    }
  }
  finalize_gates(r);
  return r;
}

RouterGradients DenseRouter::backward(MatrixView tokens, const Routes& routes,
                                      MatrixView d_gates) const {
  require_cols(tokens, dim(), "tokens");
  const int64_t E = experts();
  return center_router_backward(
      tokens, routes, d_gates, [&](int32_t e) { return centers_.row(e); },
      [&](int64_t, const std::function<void(int32_t)>& visit) {
        for (int64_t e = 0; e < E; ++e) visit(static_cast<int32_t>(e));
      });
}

}  // namespace airmoe::inline router
