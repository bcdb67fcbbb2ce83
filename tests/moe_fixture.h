// A single-process reference for the MoE layer tests: the same routes the
// single-process routers give, every expert in one shard, the same math.
#pragma once

#include <cmath>
#include <vector>

#include "router/air_router.h"
#include "router/dense_router.h"
#include "runtime/experts.h"
#include "runtime/moe_layer.h"
#include "runtime_fixture.h"

namespace airmoe::test {

struct ReferenceResult {
  Matrix out;
  Matrix d_tokens;
  runtime::DenseExpertGrads experts;  // all experts, ids 0..E-1
  SparseRowGrad d_centers;
  Routes routes;
};

inline ReferenceResult reference_layer(const GlobalData& g, runtime::Strategy strategy,
                                       const runtime::MoEConfig& cfg, uint64_t seed,
                                       MatrixView d_out, MatrixView bias = {}) {
  ReferenceResult ref;
  const MatrixView X = g.data.tokens.view();
  AirRouter air(g.data.centers.view(), g.codebook);
  DenseRouter dense(g.data.centers.view());
  if (bias.rows > 0) {  // selection by z + b, gates from z (the routers' own rule)
    air.set_bias(bias);
    dense.set_bias(bias);
  }
  ref.routes =
      strategy == runtime::Strategy::kAir ? air.route(X, cfg.k, cfg.probes) : dense.route(X, cfg.k);
  std::vector<int32_t> all(static_cast<size_t>(g.data.centers.rows()));
  for (size_t e = 0; e < all.size(); ++e) all[e] = static_cast<int32_t>(e);
  const runtime::ExpertShard shard = runtime::ExpertShard::random(cfg.expert, all, seed);
  runtime::ExpertPairs pairs;
  for (int64_t t = 0; t < X.rows; ++t)
    for (int j = 0; j < cfg.k; ++j) {
      pairs.token.push_back(static_cast<int32_t>(t));
      pairs.expert.push_back(ref.routes.experts_of(t)[j]);
      pairs.gate.push_back(ref.routes.gates_of(t)[j]);
    }
  ref.out = Matrix(X.rows, X.cols);
  const runtime::ExpertCache cache = shard.forward(X, pairs, ref.out);
  std::vector<float> d_gate;
  Matrix dx(X.rows, X.cols);
  ref.experts = shard.zero_grads();
  shard.backward(X, pairs, cache, d_out, d_gate, dx, ref.experts);
  const Matrix dg_matrix = [&] {
    Matrix m(X.rows, cfg.k);
    std::copy(d_gate.begin(), d_gate.end(), m.data());
    return m;
  }();
  const RouterGradients rg = strategy == runtime::Strategy::kAir
                                 ? air.backward(X, ref.routes, dg_matrix.view())
                                 : dense.backward(X, ref.routes, dg_matrix.view());
  ref.d_tokens = Matrix(X.rows, X.cols);
  for (int64_t t = 0; t < X.rows; ++t)
    for (int64_t c = 0; c < X.cols; ++c) ref.d_tokens(t, c) = dx(t, c) + rg.d_tokens(t, c);
  ref.d_centers = rg.d_centers;
  return ref;
}

// max |a - b| / max(1, max |b|): relative to the reference's scale.
inline double rel_error(const float* a, const float* b, size_t n) {
  double diff = 0.0, scale = 1e-30;
  for (size_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

}  // namespace airmoe::test
