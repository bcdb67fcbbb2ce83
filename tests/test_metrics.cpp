// recall_at_k, mass_recall and shortlist_stats on hand-built routes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/synthetic.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "test_util.h"

namespace airmoe {
namespace {

Routes hand_routes(const std::vector<int32_t>& experts, const std::vector<float>& logits, int k) {
  Routes r = make_routes(static_cast<int64_t>(experts.size()) / k, k, GateMode::kChosen);
  r.experts = experts;
  r.logits = logits;
  return r;
}

TEST(Metrics, ExactRoutesScorePerfectly) {
  const Matrix centers = random_matrix(300, 16, 1.0, 1);
  const Matrix tokens = random_matrix(50, 16, 1.0, 2);
  const Routes exact = DenseRouter(centers.view()).route(tokens.view(), 8);
  EXPECT_DOUBLE_EQ(recall_at_k(exact, exact), 1.0);
  EXPECT_DOUBLE_EQ(mass_recall(exact, exact), 1.0);
}

TEST(Metrics, HandBuiltExample) {
  // Token 0: exact {3, 1}, got {1, 5}: one hit. Token 1: the same set in
  // another order: two hits.
  const Routes exact = hand_routes({3, 1, 0, 2}, {2.0f, 1.0f, 0.5f, 0.0f}, 2);
  const Routes got = hand_routes({1, 5, 2, 0}, {1.0f, 0.2f, 0.0f, 0.5f}, 2);
  EXPECT_DOUBLE_EQ(recall_at_k(got, exact), 0.75);
  const double m0 = (std::exp(1.0 - 2.0) + std::exp(0.2 - 2.0)) / (1.0 + std::exp(-1.0));
  EXPECT_NEAR(mass_recall(got, exact), (m0 + 1.0) / 2.0, 1e-7);
  EXPECT_LT(mass_recall(got, exact), 1.0);
  // Recall counts set membership, not position (token 1 is in another order).
  EXPECT_DOUBLE_EQ(recall_at_k(exact, got), 0.75);

  // An empty slot (-1) counts as a miss and contributes no mass.
  const Routes partial = hand_routes({3, -1, 0, 2}, {2.0f, 0.0f, 0.5f, 0.0f}, 2);
  EXPECT_DOUBLE_EQ(recall_at_k(partial, exact), 0.75);
  const double p0 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT_NEAR(mass_recall(partial, exact), (p0 + 1.0) / 2.0, 1e-7);

  // Nothing in common.
  const Routes miss = hand_routes({7, 8, 9, 10}, {-5.0f, -6.0f, -5.0f, -6.0f}, 2);
  EXPECT_DOUBLE_EQ(recall_at_k(miss, exact), 0.0);
}

TEST(Metrics, EmptyRoutes) {
  const Routes a = make_routes(0, 4, GateMode::kChosen);
  EXPECT_DOUBLE_EQ(recall_at_k(a, a), 1.0);
  EXPECT_DOUBLE_EQ(mass_recall(a, a), 1.0);
  const ShortlistStats s = shortlist_stats(a);
  EXPECT_EQ(s.mean, 0.0);
  EXPECT_EQ(s.p99, 0.0);
  EXPECT_EQ(s.max, 0);
}

TEST(Metrics, MismatchedShapesThrow) {
  const Routes a = make_routes(3, 4, GateMode::kChosen);
  const Routes b = make_routes(3, 5, GateMode::kChosen);
  const Routes c = make_routes(2, 4, GateMode::kChosen);
  AIRMOE_EXPECT_THROW_MSG(recall_at_k(a, b), std::invalid_argument, "metrics");
  AIRMOE_EXPECT_THROW_MSG(mass_recall(a, c), std::invalid_argument, "metrics");
}

TEST(Metrics, ShortlistStats) {
  std::vector<int32_t> sizes(100);
  std::iota(sizes.begin(), sizes.end(), 1);
  std::shuffle(sizes.begin(), sizes.end(), std::mt19937(4));
  Routes r = make_routes(100, 1, GateMode::kChosen);
  r.shortlist_size = sizes;
  ShortlistStats s = shortlist_stats(r);
  EXPECT_DOUBLE_EQ(s.mean, 50.5);
  EXPECT_DOUBLE_EQ(s.p99, 99.0);
  EXPECT_EQ(s.max, 100);

  Routes big = make_routes(200, 1, GateMode::kChosen);
  big.shortlist_size.resize(200);
  std::iota(big.shortlist_size.begin(), big.shortlist_size.end(), 1);
  s = shortlist_stats(big);
  EXPECT_DOUBLE_EQ(s.mean, 100.5);
  EXPECT_DOUBLE_EQ(s.p99, 198.0);
  EXPECT_EQ(s.max, 200);

  // One outlier among many equal sizes: p99 ignores it, max does not.
  Routes outlier = make_routes(1000, 1, GateMode::kChosen);
  outlier.shortlist_size.assign(1000, 64);
  outlier.shortlist_size[517] = 4000;
  s = shortlist_stats(outlier);
  EXPECT_DOUBLE_EQ(s.mean, (999.0 * 64 + 4000) / 1000.0);
  EXPECT_DOUBLE_EQ(s.p99, 64.0);
  EXPECT_EQ(s.max, 4000);

  Routes one = make_routes(1, 1, GateMode::kChosen);
  one.shortlist_size = {3};
  s = shortlist_stats(one);
  EXPECT_DOUBLE_EQ(s.mean, 3.0);
  EXPECT_DOUBLE_EQ(s.p99, 3.0);
  EXPECT_EQ(s.max, 3);
}

}  // namespace
}  // namespace airmoe
