// The shared pieces of routes.h: log-sum-exp, gate finalization and the
// deterministic row accumulation of the backward pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/synthetic.h"
#include "router/routes.h"
#include "test_util.h"

namespace airmoe {
namespace {

double direct_lse(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  double s = 0.0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

TEST(Routes, LogSumExpAddAndMerge) {
  std::mt19937_64 rng(1);
  std::normal_distribution<double> normal(0.0, 5.0);
  std::vector<double> z(101);
  for (double& v : z) v = normal(rng);
  LogSumExp all;
  for (double v : z) all.add(v);
  EXPECT_NEAR(all.value(), direct_lse(z), 1e-12);

  LogSumExp a, b, empty;
  for (size_t i = 0; i < z.size(); ++i) (i % 3 == 0 ? a : b).add(z[i]);
  LogSumExp ab = a;
  ab.merge(b);
  LogSumExp ba = b;
  ba.merge(a);
  EXPECT_NEAR(ab.value(), all.value(), 1e-12);
  EXPECT_NEAR(ba.value(), all.value(), 1e-12);
  // Merging empty accumulators changes nothing, on either side.
  LogSumExp with_empty = a;
  with_empty.merge(empty);
  EXPECT_EQ(with_empty.value(), a.value());
  LogSumExp from_empty;
  from_empty.merge(a);
  EXPECT_EQ(from_empty.value(), a.value());
  // No overflow for large logits, no underflow for very negative ones.
  LogSumExp big;
  big.add(1000.0);
  big.add(1000.0);
  EXPECT_NEAR(big.value(), 1000.0 + std::log(2.0), 1e-12);
  LogSumExp small;
  small.add(-2000.0);
  small.add(-2001.0);
  EXPECT_NEAR(small.value(), -2000.0 + std::log1p(std::exp(-1.0)), 1e-12);
}

TEST(Routes, MakeRoutesShapes) {
  const Routes r = make_routes(7, 3, GateMode::kShortlist);
  EXPECT_EQ(r.tokens, 7);
  EXPECT_EQ(r.k, 3);
  EXPECT_EQ(r.gate_mode, GateMode::kShortlist);
  EXPECT_EQ(r.experts.size(), 21u);
  EXPECT_EQ(r.gates.size(), 21u);
  EXPECT_EQ(r.logits.size(), 21u);
  EXPECT_EQ(r.log_normalizer.size(), 7u);
  EXPECT_EQ(r.shortlist_size.size(), 7u);
  for (int32_t e : r.experts) EXPECT_EQ(e, -1);
  EXPECT_EQ(r.experts_of(2), r.experts.data() + 6);
  EXPECT_EQ(r.gates_of(6), r.gates.data() + 18);
}

TEST(Routes, FinalizeGates) {
  Routes chosen = make_routes(2, 3, GateMode::kChosen);
  chosen.logits = {3.0f, 1.0f, -2.0f, 0.5f, 0.5f, 0.5f};
  finalize_gates(chosen);
  const double den = std::exp(3.0) + std::exp(1.0) + std::exp(-2.0);
  EXPECT_NEAR(chosen.gates[0], std::exp(3.0) / den, 1e-7);
  EXPECT_NEAR(chosen.gates[1], std::exp(1.0) / den, 1e-7);
  EXPECT_NEAR(chosen.gates[2], std::exp(-2.0) / den, 1e-7);
  EXPECT_NEAR(chosen.log_normalizer[0], std::log(den), 1e-12);
  for (int j = 3; j < 6; ++j) EXPECT_FLOAT_EQ(chosen.gates[j], 1.0f / 3.0f);

  // kShortlist keeps the router's normalizer (a larger set than the k).
  Routes wide = make_routes(1, 2, GateMode::kShortlist);
  wide.logits = {2.0f, 1.0f};
  wide.log_normalizer = {std::log(std::exp(2.0) + std::exp(1.0) + std::exp(0.0))};
  finalize_gates(wide);
  const double total = std::exp(2.0) + std::exp(1.0) + 1.0;
  EXPECT_NEAR(wide.gates[0], std::exp(2.0) / total, 1e-7);
  EXPECT_NEAR(wide.gates[1], std::exp(1.0) / total, 1e-7);
  EXPECT_LT(wide.gates[0] + wide.gates[1], 1.0f);
}

}  // namespace
}  // namespace airmoe
