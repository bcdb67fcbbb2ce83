// Exact top-k routing: every token scored against every expert center.
// The reference the other routers are measured against, and the baseline
// they must beat.
#pragma once

#include <cstdint>

#include "core/matrix.h"
#include "router/routes.h"

namespace airmoe::inline router {

class DenseRouter {
 public:
  // centers: [E, d], finite; copied.
  explicit DenseRouter(MatrixView centers);

  int64_t experts() const { return centers_.rows(); }
  int64_t dim() const { return centers_.cols(); }
  MatrixView centers() const { return centers_.view(); }

  // tokens: [T, d]. With GateMode::kShortlist the softmax runs over all E.
  Routes route(MatrixView tokens, int k, GateMode mode = GateMode::kChosen) const;
  RouterGradients backward(MatrixView tokens, const Routes& routes, MatrixView d_gates) const;

  double flops_per_token() const { return 2.0 * static_cast<double>(experts() * dim()); }
  // Largest center norm: what check_route_args needs to refuse overflowing logits.
  double key_norm_bound() const { return key_norm_bound_; }

 private:
  Matrix centers_;
  double key_norm_bound_ = 0.0;
};

// Shared argument checks of route(): tokens [T, d] finite, 1 <= k <= E, and
// no token whose logits could overflow float32 against keys of norm at most
// key_norm_bound (require_finite_logits): finite inputs give finite gates.
void check_route_args(MatrixView tokens, int64_t dim, int k, int64_t experts,
                      double key_norm_bound);

}  // namespace airmoe::inline router
