#include "router/routes.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/checks.h"
#include "core/parallel_errors.h"
#include "router/scoring.h"

namespace airmoe::inline router {

const char* to_string(GateMode mode) {
  return mode == GateMode::kChosen ? "chosen" : "shortlist";
}

GateMode gate_mode_from_string(const std::string& name) {
  if (name == "chosen") return GateMode::kChosen;
  if (name == "shortlist") return GateMode::kShortlist;
  fail("gate mode '" + name + "' is unknown (expected 'chosen' or 'shortlist')");
}

Routes make_routes(int64_t tokens, int k, GateMode mode) {
  Routes r;
  r.tokens = tokens;
  r.k = k;
  r.gate_mode = mode;
  const auto n = static_cast<size_t>(tokens * k);
  r.experts.assign(n, -1);
  r.gates.assign(n, 0.0f);
  r.logits.assign(n, 0.0f);
  r.log_normalizer.assign(static_cast<size_t>(tokens), 0.0);
  r.shortlist_size.assign(static_cast<size_t>(tokens), 0);
  return r;
}

void finalize_gates(Routes& r) {
#pragma omp parallel for schedule(static) if (r.tokens > 256)
  for (int64_t t = 0; t < r.tokens; ++t) {
    const float* z = r.logits.data() + t * r.k;
    if (r.gate_mode == GateMode::kChosen) {
      LogSumExp lse;
      for (int j = 0; j < r.k; ++j) lse.add(z[j]);
      r.log_normalizer[t] = lse.value();
    }
    float* g = r.gates.data() + t * r.k;
    for (int j = 0; j < r.k; ++j)
      g[j] = static_cast<float>(std::exp(static_cast<double>(z[j]) - r.log_normalizer[t]));
  }
}

SparseRowGrad accumulate_rows(std::vector<RowContribution>& contributions, const float* x,
                              int64_t ldx, int64_t width) {
  std::sort(contributions.begin(), contributions.end(),
            [](const RowContribution& a, const RowContribution& b) {
              return a.row != b.row ? a.row < b.row : a.token < b.token;
            });
  SparseRowGrad out;
  std::vector<size_t> starts;
  for (size_t i = 0; i < contributions.size(); ++i) {
    if (i == 0 || contributions[i].row != contributions[i - 1].row) {
      out.rows.push_back(contributions[i].row);
      starts.push_back(i);
    }
  }
  starts.push_back(contributions.size());
  out.values = Matrix(static_cast<int64_t>(out.rows.size()), width);
  ParallelErrors errors;  // the buffer allocation may throw
#pragma omp parallel
  {
    std::vector<double> acc;
    const bool ready = errors.run([&] { acc.resize(static_cast<size_t>(width)); });
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < static_cast<int64_t>(out.rows.size()); ++r) {
      if (!ready) continue;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t i = starts[r]; i < starts[r + 1]; ++i) {
        const float* xi = x + static_cast<int64_t>(contributions[i].token) * ldx;
        for (int64_t c = 0; c < width; ++c) acc[c] += contributions[i].coef * xi[c];
      }
      for (int64_t c = 0; c < width; ++c) out.values(r, c) = static_cast<float>(acc[c]);
    }
  }
  errors.rethrow();
  return out;
}

void check_gate_grads(const Routes& routes, MatrixView tokens, MatrixView d_gates) {
  if (tokens.rows != routes.tokens)
    fail("backward: tokens has " + std::to_string(tokens.rows) + " rows but the routes hold " +
         std::to_string(routes.tokens));
  if (d_gates.rows != routes.tokens || d_gates.cols != routes.k)
    fail("backward: d_gates is [" + std::to_string(d_gates.rows) + ", " +
         std::to_string(d_gates.cols) + "], expected [" + std::to_string(routes.tokens) + ", " +
         std::to_string(routes.k) + "]");
  require_finite(d_gates, "d_gates");
}

RouterGradients center_router_backward(MatrixView tokens, const Routes& routes, MatrixView d_gates,
                                       const CenterLookup& center,
                                       const ShortlistVisitor& shortlist) {
  check_gate_grads(routes, tokens, d_gates);
  const int64_t T = routes.tokens, d = tokens.cols;
  const int k = routes.k;
  RouterGradients grads;
  grads.d_tokens = Matrix(T, d);
  std::vector<std::vector<RowContribution>> per_token(static_cast<size_t>(T));

  // One token: its dL/dh row and its (center row, token, coef) contributions.
  auto backward_token = [&](int64_t t, std::vector<double>& dh) {
    const int32_t* chosen = routes.experts_of(t);
    const float* g = routes.gates_of(t);
    const float* dg = d_gates.row(t);
    const float* h = tokens.row(t);
    double weighted = 0.0;  // sum_j g_j dL/dg_j
    for (int j = 0; j < k; ++j) weighted += static_cast<double>(g[j]) * dg[j];
    std::fill(dh.begin(), dh.end(), 0.0);
    auto& out = per_token[t];

    auto visit = [&](int32_t e, double z) {
      double own = 0.0;
      for (int j = 0; j < k; ++j)
        if (chosen[j] == e) own = dg[j];
      const double p = std::exp(z - routes.log_normalizer[t]);
      const double dz = p * (own - weighted);
      if (dz == 0.0) return;
      const float* w = center(e);
      for (int64_t c = 0; c < d; ++c) dh[c] += dz * w[c];
      out.push_back({e, static_cast<int32_t>(t), dz});
    };

    if (routes.gate_mode == GateMode::kChosen) {
      for (int j = 0; j < k; ++j) visit(chosen[j], routes.logits[t * k + j]);
    } else {
      shortlist(t, [&](int32_t e) { visit(e, score_one(center(e), h, d)); });
    }
    for (int64_t c = 0; c < d; ++c) grads.d_tokens(t, c) = static_cast<float>(dh[c]);
  };

  // Allocations and the caller's center/shortlist callbacks may throw.
  ParallelErrors errors;
#pragma omp parallel
  {
    std::vector<double> dh;
    const bool ready = errors.run([&] { dh.resize(static_cast<size_t>(d)); });
#pragma omp for schedule(dynamic, 8)
    for (int64_t t = 0; t < T; ++t) {
      if (!ready) continue;
      errors.run([&] { backward_token(t, dh); });
    }
  }
  errors.rethrow();

  std::vector<RowContribution> all;
  for (auto& v : per_token) all.insert(all.end(), v.begin(), v.end());
  grads.d_centers = accumulate_rows(all, tokens.data, tokens.cols, d);
  return grads;
}

}  // namespace airmoe::inline router
