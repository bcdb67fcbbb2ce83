#include "router/product_key_router.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/checks.h"

namespace airmoe::inline router {

ProductKeyRouter::ProductKeyRouter(MatrixView keys1, MatrixView keys2, Compute compute)
    : ProductKeyRouter(TensorView(keys1), TensorView(keys2), compute) {}

ProductKeyRouter::ProductKeyRouter(TensorView keys1, TensorView keys2, Compute compute)
    : compute_(compute) {
  if (keys1.rows < 1 || keys1.rows != keys2.rows)
    fail("product keys: keys1 has " + std::to_string(keys1.rows) + " rows and keys2 has " +
         std::to_string(keys2.rows) + "; both need the same n >= 1");
  if (keys1.cols < 1 || keys2.cols < 1 || keys2.cols - keys1.cols < 0 ||
      keys2.cols - keys1.cols > 1)
    fail("product keys: half widths " + std::to_string(keys1.cols) + " and " +
         std::to_string(keys2.cols) + " must be d / 2 and d - d / 2 with d >= 2");
  if (keys1.rows > 46340)
    fail("product keys: n = " + std::to_string(keys1.rows) + " gives more than 2^31 experts");
  for (const TensorView& keys : {keys1, keys2})
    if (keys.dtype != DType::kF32 && keys.dtype != DType::kBF16)
      fail(std::string("product keys are ") + to_string(keys.dtype) + ", expected f32 or bf16");
  keys1_ = compute_.ops->empty(keys1.dtype, keys1.rows, keys1.cols);
  keys2_ = compute_.ops->empty(keys2.dtype, keys2.rows, keys2.cols);
  compute_.ops->copy(keys1_, keys1, compute_.stream);
  compute_.ops->copy(keys2_, keys2, compute_.stream);
  key_norm_bound_ = require_finite_rows(compute_, keys1_, "keys1") +
                    require_finite_rows(compute_, keys2_, "keys2");
}

double ProductKeyRouter::flops_per_token(int k) const {
  return 2.0 * static_cast<double>(subkeys() * dim()) + static_cast<double>(k) * k;
}

void ProductKeyRouter::set_bias(TensorView bias) {
  bias_ = checked_bias(compute_, bias, experts());
}

namespace {

void require_chosen_gates(GateMode mode, const char* where) {
  if (mode == GateMode::kShortlist)
    fail(std::string("product keys: ") + where +
         " supports gate modes 'chosen' and 'sigmoid', not 'shortlist' (product keys score no "
         "shortlist)");
}

}  // namespace

Routes ProductKeyRouter::route(MatrixView tokens, int k, GateMode mode) const {
  return route(Staged(compute_, tokens).view(), k, mode).to_host(compute_);
}

DeviceRoutes ProductKeyRouter::route(TensorView tokens, int k, GateMode mode) const {
  require_chosen_gates(mode, "route");
  check_route_args(compute_, tokens, dim(), k, experts(), key_norm_bound_);
  const Ops& ops = *compute_.ops;
  const int kh = static_cast<int>(std::min<int64_t>(k, subkeys()));
  DeviceRoutes r = make_device_routes(compute_, tokens.rows, k, mode);
  ops.fill(r.shortlist_size, static_cast<double>(kh) * kh, compute_.stream);
  ops.product_topk(tokens, keys1_, keys2_, k, {r.logits, r.experts, {}, bias_}, compute_.stream);
  ops.finalize_gates(r.logits, TensorView(), r.log_normalizer, r.gates, gate_function(mode),
                     compute_.stream);
  return r;
}

ProductKeyGradients DeviceProductKeyGradients::to_host(const Compute& compute) const {
  ProductKeyGradients g;
  g.d_tokens = Matrix(d_tokens.rows(), d_tokens.cols());
  compute.ops->copy(
      TensorView(g.d_tokens.data(), DType::kF32, Device::host(), d_tokens.rows(), d_tokens.cols()),
      d_tokens, compute.stream);
  g.d_keys1 = router::to_host(compute, d_keys1);
  g.d_keys2 = router::to_host(compute, d_keys2);
  return g;
}

ProductKeyGradients ProductKeyRouter::backward(MatrixView tokens, const Routes& routes,
                                               MatrixView d_gates) const {
  return backward(Staged(compute_, tokens).view(), to_device(compute_, routes),
                  Staged(compute_, d_gates).view())
      .to_host(compute_);
}

namespace {

// (token, sub-key row, coefficient) contributions of one half, token after
// token in slot order (for dL/dh), and merged per (row, token) in row order
// within a token (for the sub-key gradients: a sub-key can serve several of
// a token's chosen pairs).
struct HalfContributions {
  std::vector<int32_t> token, row;
  std::vector<double> coef;

  void add(int32_t t, int32_t r, double c) {
    token.push_back(t);
    row.push_back(r);
    coef.push_back(c);
  }
  HalfContributions merged(int k) const {
    HalfContributions out;
    std::vector<size_t> order(static_cast<size_t>(k));
    for (size_t begin = 0; begin < token.size(); begin += static_cast<size_t>(k)) {
      for (int j = 0; j < k; ++j) order[j] = begin + static_cast<size_t>(j);
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t a, size_t b) { return row[a] < row[b]; });
      for (size_t i : order) {
        if (!out.row.empty() && out.row.back() == row[i] && out.token.back() == token[i])
          out.coef.back() += coef[i];
        else
          out.add(token[i], row[i], coef[i]);
      }
    }
    return out;
  }
};

RowGrads accumulate(const Compute& compute, TensorView tokens, TensorView keys,
                    const HalfContributions& c, TensorView d_tokens) {
  const Tensor token = device_vector(compute, c.token), row = device_vector(compute, c.row),
               coef = device_vector(compute, c.coef);
  return compute.ops->accumulate_row_grads(tokens, keys, {token, row, coef}, d_tokens,
                                           compute.stream);
}

// The sub-key gradients: every sub-key a chosen pair used is listed, zero
// coefficients included (k = 1 gives only those: its gate is 1).
RowGrads key_grads(const Compute& compute, TensorView tokens, TensorView keys,
                   const HalfContributions& merged) {
  const RowGrads g = accumulate(compute, tokens, keys, merged, TensorView());
  return to_device(compute, with_rows_hit(to_host(compute, g), merged.row));
}

}  // namespace

DeviceProductKeyGradients ProductKeyRouter::backward(TensorView tokens, const DeviceRoutes& routes,
                                                     TensorView d_gates) const {
  require_rows_of(compute_, tokens, dim(), "tokens");
  check_gate_grads(compute_, routes, tokens, d_gates);
  require_chosen_gates(routes.gate_mode, "backward");
  const GateFunction fn = gate_function(routes.gate_mode);
  const int64_t T = routes.tokens, n = subkeys(), d1 = half_dim(), d2 = keys2_.cols();
  const int k = routes.k;
  // dL/dz of each chosen pair from the float gates, as the softmax over the
  // chosen k gives it (times d log sigmoid(z) / dz for sigmoid gates).
  const OnHost gates(compute_, routes.gates), experts(compute_, routes.experts),
      logits(compute_, routes.logits);
  const Tensor dg32 = compute_.ops->empty(DType::kF32, T, k);
  compute_.ops->copy(dg32, d_gates, compute_.stream);
  const OnHost dg(compute_, dg32);
  HalfContributions c1, c2;
  for (int64_t t = 0; t < T; ++t) {
    const float* gt = gates.as<float>() + t * k;
    const float* dgt = dg.as<float>() + t * k;
    double weighted = 0.0;
    for (int j = 0; j < k; ++j) weighted += static_cast<double>(gt[j]) * dgt[j];
    for (int j = 0; j < k; ++j) {
      const double dz = static_cast<double>(gt[j]) * (dgt[j] - weighted) *
                        gate_input_slope(fn, logits.as<float>()[t * k + j]);
      const int32_t e = experts.as<int32_t>()[t * k + j];
      c1.add(static_cast<int32_t>(t), static_cast<int32_t>(e / n), dz);
      c2.add(static_cast<int32_t>(t), static_cast<int32_t>(e % n), dz);
    }
  }
  const TensorView h1 = tokens.block(0, T, 0, d1), h2 = tokens.block(0, T, d1, d2);
  DeviceProductKeyGradients g;
  g.d_tokens = compute_.ops->empty(DType::kF32, T, dim());
  const TensorView dh = g.d_tokens;
  accumulate(compute_, h1, keys1_, c1, dh.block(0, T, 0, d1));
  accumulate(compute_, h2, keys2_, c2, dh.block(0, T, d1, d2));
  g.d_keys1 = key_grads(compute_, h1, keys1_, c1.merged(k));
  g.d_keys2 = key_grads(compute_, h2, keys2_, c2.merged(k));
  return g;
}

}  // namespace airmoe::inline router
