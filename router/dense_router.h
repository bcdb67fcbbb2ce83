// Exact top-k routing: every token scored against every expert center.
// The reference the other routers are measured against, and the baseline
// they must beat. Runs on the ops it is built with (host by default); its
// TensorView API keeps tokens, routes and gradients on their device.
#pragma once

#include <cstdint>

#include "core/matrix.h"
#include "ops/boundary.h"
#include "router/routes.h"

namespace airmoe::inline router {

class DenseRouter {
 public:
  // centers: [E, d], finite; copied to the ops' device. As a tensor: f32 or
  // bf16 (kept in its dtype), on the host or the ops' device.
  explicit DenseRouter(MatrixView centers, Compute compute = host_compute());
  DenseRouter(TensorView centers, Compute compute);

  int64_t experts() const { return centers_.rows(); }
  int64_t dim() const { return centers_.cols(); }
  const Compute& compute() const { return compute_; }
  // Later calls run on `stream` (the caller's CUDA stream; the host ignores it).
  void set_stream(Stream stream) { compute_.stream = stream; }
  // The centers on the ops' device; as a MatrixView only with host ops.
  TensorView keys() const { return centers_; }
  MatrixView centers() const { return centers_.view().matrix(); }

  // The selection bias b (router/routes.h checked_bias: E finite entries):
  // experts are selected by z + b, gates formed from the unbiased z. A copy
  // and a check; nothing else is rebuilt, so it may change every step.
  void set_bias(TensorView bias);
  void clear_bias() { bias_ = Tensor(); }
  TensorView bias() const { return bias_; }  // f32 [E, 1] on the ops' device; empty: none

  // tokens: [T, d]. With GateMode::kShortlist the softmax runs over all E.
  Routes route(MatrixView tokens, int k, GateMode mode = GateMode::kChosen) const;
  DeviceRoutes route(TensorView tokens, int k, GateMode mode = GateMode::kChosen) const;
  RouterGradients backward(MatrixView tokens, const Routes& routes, MatrixView d_gates) const;
  DeviceRouterGradients backward(TensorView tokens, const DeviceRoutes& routes,
                                 TensorView d_gates) const;

  double flops_per_token() const { return 2.0 * static_cast<double>(experts() * dim()); }
  // Largest center norm: what check_route_args needs to refuse overflowing logits.
  double key_norm_bound() const { return key_norm_bound_; }

 private:
  Compute compute_;
  Tensor centers_;
  Tensor bias_;  // empty: none
  double key_norm_bound_ = 0.0;
};

}  // namespace airmoe::inline router
