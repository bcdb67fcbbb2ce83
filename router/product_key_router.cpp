#include "router/product_key_router.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/checks.h"
#include "core/parallel_errors.h"
#include "ops/topk.h"
#include "router/dense_router.h"
#include "router/scoring.h"

namespace airmoe::inline router {

ProductKeyRouter::ProductKeyRouter(MatrixView keys1, MatrixView keys2) {
  if (keys1.rows < 1 || keys1.rows != keys2.rows)
    fail("product keys: keys1 has " + std::to_string(keys1.rows) + " rows and keys2 has " +
         std::to_string(keys2.rows) + "; both need the same n >= 1");
  if (keys1.cols < 1 || keys2.cols < 1 || keys2.cols - keys1.cols < 0 ||
      keys2.cols - keys1.cols > 1)
    fail("product keys: half widths " + std::to_string(keys1.cols) + " and " +
         std::to_string(keys2.cols) + " must be d / 2 and d - d / 2 with d >= 2");
  if (keys1.rows > 46340)
    fail("product keys: n = " + std::to_string(keys1.rows) + " gives more than 2^31 experts");
  require_finite(keys1, "keys1");
  require_finite(keys2, "keys2");
  keys1_ = Matrix(keys1.rows, keys1.cols);
  keys2_ = Matrix(keys2.rows, keys2.cols);
  std::copy_n(keys1.data, keys1.rows * keys1.cols, keys1_.data());
  std::copy_n(keys2.data, keys2.rows * keys2.cols, keys2_.data());
  key_norm_bound_ = max_row_norm(keys1_.view()) + max_row_norm(keys2_.view());
}

double ProductKeyRouter::flops_per_token(int k) const {
  return 2.0 * static_cast<double>(subkeys() * dim()) + static_cast<double>(k) * k;
}

Routes ProductKeyRouter::route(MatrixView tokens, int k) const {
  check_route_args(tokens, dim(), k, experts(), key_norm_bound_);
  const int64_t T = tokens.rows, n = subkeys(), d1 = half_dim(), d2 = keys2_.cols();
  const int kh = static_cast<int>(std::min<int64_t>(k, n));
  Routes r = make_routes(T, k, GateMode::kChosen);
  std::fill(r.shortlist_size.begin(), r.shortlist_size.end(), kh * kh);
  const int64_t block = 1024;
  std::vector<float> s1(static_cast<size_t>(std::min(block, T) * n));
  std::vector<float> s2(s1.size());
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t m = std::min(block, T - t0);
    score_nt(tokens.row(t0), tokens.cols, keys1_.data(), d1, m, n, d1, s1.data(), n);
    score_nt(tokens.row(t0) + d1, tokens.cols, keys2_.data(), d2, m, n, d2, s2.data(), n);
    ParallelErrors errors;  // buffer allocations may throw
#pragma omp parallel
    {
      std::vector<float> z1, z2;
      std::vector<int32_t> i1, i2;
      const bool ready = errors.run([&] {
        z1.resize(static_cast<size_t>(kh));
        z2.resize(static_cast<size_t>(kh));
        i1.resize(static_cast<size_t>(kh));
        i2.resize(static_cast<size_t>(kh));
      });
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; ++i) {
        if (!ready) continue;
        const int64_t t = t0 + i;
        TopK top1(kh, z1.data(), i1.data()), top2(kh, z2.data(), i2.data());
        for (int64_t j = 0; j < n; ++j) {
          top1.push_ascending(s1[i * n + j], static_cast<int32_t>(j));
          top2.push_ascending(s2[i * n + j], static_cast<int32_t>(j));
        }
        TopK top(k, r.logits.data() + t * k, r.experts.data() + t * k);
        for (int a = 0; a < kh; ++a)
          for (int b = 0; b < kh; ++b)
            top.push(z1[a] + z2[b], static_cast<int32_t>(i1[a] * n + i2[b]));
      }
    }
    errors.rethrow();
  }
  finalize_gates(r);
  return r;
}

ProductKeyGradients ProductKeyRouter::backward(MatrixView tokens, const Routes& routes,
                                               MatrixView d_gates) const {
  require_cols(tokens, dim(), "tokens");
  check_gate_grads(routes, tokens, d_gates);
  if (routes.gate_mode != GateMode::kChosen)
    fail("product keys: backward supports only gate mode 'chosen'");
  const int64_t T = routes.tokens, n = subkeys(), d1 = half_dim(), d2 = keys2_.cols();
  const int k = routes.k;
  ProductKeyGradients g;
  g.d_tokens = Matrix(T, dim());
  std::vector<std::vector<RowContribution>> c1(static_cast<size_t>(T)), c2(static_cast<size_t>(T));
  ParallelErrors errors;  // allocations may throw
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t)
    errors.run([&] {
      const float* gt = routes.gates_of(t);
      const float* dg = d_gates.row(t);
      double weighted = 0.0;
      for (int j = 0; j < k; ++j) weighted += static_cast<double>(gt[j]) * dg[j];
      std::vector<double> dh(static_cast<size_t>(dim()), 0.0);
      for (int j = 0; j < k; ++j) {
        const double dz = static_cast<double>(gt[j]) * (dg[j] - weighted);
        const int32_t e = routes.experts_of(t)[j];
        const int32_t a = static_cast<int32_t>(e / n), b = static_cast<int32_t>(e % n);
        for (int64_t c = 0; c < d1; ++c) dh[c] += dz * keys1_(a, c);
        for (int64_t c = 0; c < d2; ++c) dh[d1 + c] += dz * keys2_(b, c);
        c1[t].push_back({a, static_cast<int32_t>(t), dz});
        c2[t].push_back({b, static_cast<int32_t>(t), dz});
      }
      for (int64_t c = 0; c < dim(); ++c) g.d_tokens(t, c) = static_cast<float>(dh[c]);
    });
  errors.rethrow();
  // The same sub-key can serve several chosen pairs of a token: merge those
  // before accumulating, so each (row, token) appears once.
  auto flatten = [](std::vector<std::vector<RowContribution>>& per_token) {
    std::vector<RowContribution> all;
    for (auto& v : per_token) {
      std::stable_sort(v.begin(), v.end(), [](auto& x, auto& y) { return x.row < y.row; });
      for (const auto& c : v) {
        if (!all.empty() && all.back().row == c.row && all.back().token == c.token)
          all.back().coef += c.coef;
        else
          all.push_back(c);
      }
    }
    return all;
  };
  auto all1 = flatten(c1);
  auto all2 = flatten(c2);
  g.d_keys1 = accumulate_rows(all1, tokens.data, tokens.cols, d1);
  g.d_keys2 = accumulate_rows(all2, tokens.data + d1, tokens.cols, d2);
  return g;
}

}  // namespace airmoe::inline router
