#include "router/dense_router.h"

#include <string>
#include <vector>

#include "core/checks.h"

namespace airmoe::inline router {

DenseRouter::DenseRouter(MatrixView centers, Compute compute)
    : DenseRouter(TensorView(centers), compute) {}

DenseRouter::DenseRouter(TensorView centers, Compute compute) : compute_(compute) {
  if (centers.rows < 1 || centers.cols < 1)
    fail("centers must be [E >= 1, d >= 1], got [" + std::to_string(centers.rows) + ", " +
         std::to_string(centers.cols) + "]");
  require_expert_count(centers.rows, "centers rows E");
  if (centers.dtype != DType::kF32 && centers.dtype != DType::kBF16)
    fail(std::string("centers are ") + to_string(centers.dtype) + ", expected f32 or bf16");
  centers_ = compute_.ops->empty(centers.dtype, centers.rows, centers.cols);
  compute_.ops->copy(centers_, centers, compute_.stream);
  key_norm_bound_ = require_finite_rows(compute_, centers_, "centers");
}

void DenseRouter::set_bias(TensorView bias) {
  bias_ = checked_bias(compute_, bias, experts());
}

Routes DenseRouter::route(MatrixView tokens, int k, GateMode mode) const {
  return route(Staged(compute_, tokens).view(), k, mode).to_host(compute_);
}

DeviceRoutes DenseRouter::route(TensorView tokens, int k, GateMode mode) const {
  check_route_args(compute_, tokens, dim(), k, experts(), key_norm_bound_);
  const Ops& ops = *compute_.ops;
  const int64_t T = tokens.rows;
  DeviceRoutes r = make_device_routes(compute_, T, k, mode);
  ops.fill(r.shortlist_size, static_cast<double>(experts()), compute_.stream);
  Tensor lse;  // with kShortlist, the softmax's denominator over all E
  if (mode == GateMode::kShortlist) lse = ops.empty(DType::kF64, T, 2);
  ops.dense_topk(tokens, centers_, k, {r.logits, r.experts, lse, bias_}, compute_.stream);
  ops.finalize_gates(r.logits, lse, r.log_normalizer, r.gates, gate_function(mode),
                     compute_.stream);
  return r;
}

RouterGradients DenseRouter::backward(MatrixView tokens, const Routes& routes,
                                      MatrixView d_gates) const {
  return backward(Staged(compute_, tokens).view(), to_device(compute_, routes),
                  Staged(compute_, d_gates).view())
      .to_host(compute_);
}

DeviceRouterGradients DenseRouter::backward(TensorView tokens, const DeviceRoutes& routes,
                                            TensorView d_gates) const {
  require_rows_of(compute_, tokens, dim(), "tokens");
  ShortlistEntries all;  // with kShortlist, every expert normalizes every token
  if (routes.gate_mode == GateMode::kShortlist)
    for (int64_t t = 0; t < routes.tokens; ++t)
      for (int64_t e = 0; e < experts(); ++e) {
        all.token.push_back(static_cast<int32_t>(t));
        all.expert.push_back(static_cast<int32_t>(e));
      }
  return center_router_backward(compute_, tokens, routes, d_gates, centers_, &all);
}

}  // namespace airmoe::inline router
