// Product-key routing (PEER): E = n^2 experts, expert (i, j) has the logit
// <K1_i, h[:d1]> + <K2_j, h[d1:]>, d1 = d / 2. The exact top-k over all n^2
// sums lies within the top-k of each half, so a token costs 2 n (d/2) + k^2
// instead of E d. The structured baseline AIR is compared against.
#pragma once

#include <cstdint>

#include "core/matrix.h"
#include "ops/boundary.h"
#include "router/routes.h"

namespace airmoe::inline router {

struct ProductKeyGradients {
  Matrix d_tokens;        // [T, d]
  SparseRowGrad d_keys1;  // rows of K1 [n, d1]
  SparseRowGrad d_keys2;  // rows of K2 [n, d - d1]
};

struct DeviceProductKeyGradients {
  Tensor d_tokens;   // f32 [T, d]
  RowGrads d_keys1;  // rows of K1
  RowGrads d_keys2;  // rows of K2
  ProductKeyGradients to_host(const Compute& compute) const;
};

class ProductKeyRouter {
 public:
  // keys1: [n, d1], keys2: [n, d2], both finite, d1, d2 >= 1; copied to the
  // ops' device. As tensors: f32 or bf16 (kept in their dtype), on the host
  // or the ops' device.
  ProductKeyRouter(MatrixView keys1, MatrixView keys2, Compute compute = host_compute());
  ProductKeyRouter(TensorView keys1, TensorView keys2, Compute compute);

  int64_t subkeys() const { return keys1_.rows(); }
  int64_t experts() const { return subkeys() * subkeys(); }
  int64_t dim() const { return keys1_.cols() + keys2_.cols(); }
  int64_t half_dim() const { return keys1_.cols(); }
  const Compute& compute() const { return compute_; }
  // Later calls run on `stream` (the caller's CUDA stream; the host ignores it).
  void set_stream(Stream stream) { compute_.stream = stream; }
  // The sub-keys; as MatrixViews only with host ops.
  MatrixView keys1() const { return keys1_.view().matrix(); }
  MatrixView keys2() const { return keys2_.view().matrix(); }
  // The sub-keys on the ops' device, in their dtype.
  TensorView keys1_tensor() const { return keys1_; }
  TensorView keys2_tensor() const { return keys2_; }

  // The selection bias b (router/routes.h checked_bias: E = n^2 finite
  // entries), which enters after the sub-key stage: the top min(k, n)
  // sub-keys of each half come from the unbiased half logits, then their
  // pairs are ranked by z + b (so an expert outside that grid is never
  // chosen, whatever its bias); gates are formed from the unbiased z. A copy
  // and a check; nothing else is rebuilt, so it may change every step.
  void set_bias(TensorView bias);
  void clear_bias() { bias_ = Tensor(); }
  TensorView bias() const { return bias_; }  // f32 [E, 1] on the ops' device; empty: none

  // Expert id of sub-key pair (i, j) is i * n + j. Gates: softmax over the
  // chosen k (kChosen) or their renormalized sigmoids (kSigmoid); product
  // keys score no shortlist, so kShortlist is refused.
  Routes route(MatrixView tokens, int k, GateMode mode = GateMode::kChosen) const;
  DeviceRoutes route(TensorView tokens, int k, GateMode mode = GateMode::kChosen) const;
  ProductKeyGradients backward(MatrixView tokens, const Routes& routes, MatrixView d_gates) const;
  DeviceProductKeyGradients backward(TensorView tokens, const DeviceRoutes& routes,
                                     TensorView d_gates) const;

  double flops_per_token(int k) const;

 private:
  Compute compute_;
  Tensor keys1_;
  Tensor keys2_;
  Tensor bias_;  // empty: none
  // max |K1_i| + max |K2_j|: bounds |<K1_i, h1> + <K2_j, h2>| / |h|.
  double key_norm_bound_ = 0.0;
};

}  // namespace airmoe::inline router
