// Recall at the default benchmark shape (E = 65536, d = 512, k = 8, C = 256),
// with 1024 tokens. Each preset's data, dense routes and AIR index are built
// once per suite. Not built in sanitizer builds; runs as one ctest entry.
#include <gtest/gtest.h>

#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/metrics.h"

namespace airmoe {
namespace {

constexpr int kK = 8;

struct Prepared {
  SyntheticData data;
  std::unique_ptr<AirRouter> air;
  Routes exact;
  std::vector<double> recall_by_m;  // for m = 1, 2, 4, 8, 16
};

const std::vector<int> kProbes = {1, 2, 4, 8, 16};

std::unique_ptr<Prepared> build(const std::string& preset) {
  auto s = std::make_unique<Prepared>();
  SyntheticConfig cfg = synthetic_preset(preset);
  cfg.tokens = 1024;
  EXPECT_EQ(cfg.experts, 65536);
  EXPECT_EQ(cfg.dim, 512);
  s->data = make_synthetic(cfg);
  s->air = std::make_unique<AirRouter>(s->data.centers.view(), AirConfig{256, 10, 1234, 0});
  s->exact = DenseRouter(s->data.centers.view()).route(s->data.tokens.view(), kK);
  for (const int m : kProbes) {
    const Routes r = s->air->route(s->data.tokens.view(), kK, m);
    s->recall_by_m.push_back(recall_at_k(r, s->exact));
    const ShortlistStats st = shortlist_stats(r);
    std::cout << "[" << preset << "] m=" << m << " recall@8=" << s->recall_by_m.back()
              << " mass=" << mass_recall(r, s->exact) << " shortlist mean=" << st.mean
              << " p99=" << st.p99 << std::endl;
  }
  return s;
}

class HeavyDefault : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { setup_ = build("default"); }
  static void TearDownTestSuite() { setup_.reset(); }
  static std::unique_ptr<Prepared> setup_;
};
std::unique_ptr<Prepared> HeavyDefault::setup_;

class HeavyHard : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { setup_ = build("hard"); }
  static void TearDownTestSuite() { setup_.reset(); }
  static std::unique_ptr<Prepared> setup_;
};
std::unique_ptr<Prepared> HeavyHard::setup_;

void expect_non_decreasing(const std::vector<double>& recall) {
  ASSERT_EQ(recall.size(), kProbes.size());
  for (size_t i = 1; i < recall.size(); ++i)
    EXPECT_GE(recall[i], recall[i - 1]) << "m=" << kProbes[i];
}

TEST_F(HeavyDefault, RecallRisesWithProbes) {
  expect_non_decreasing(setup_->recall_by_m);
}

// The documented recommendation: 4 probes of 256 keep 95% of the exact top-8.
TEST_F(HeavyDefault, FourProbesReachRecall95) {
  EXPECT_GE(setup_->recall_by_m[2], 0.95);
}

TEST_F(HeavyDefault, ShortlistIsAFractionOfTheExperts) {
  const Routes r = setup_->air->route(setup_->data.tokens.view(), kK, 4);
  const ShortlistStats st = shortlist_stats(r);
  EXPECT_GE(st.mean, kK);
  // 4 of 256 lists: on the order of 4 / 256 of E, far below E.
  EXPECT_LT(st.mean, 0.1 * 65536);
}

TEST_F(HeavyHard, RecallRisesWithProbes) {
  expect_non_decreasing(setup_->recall_by_m);
}

// "hard" is defined by one probe missing most of the top-8.
TEST_F(HeavyHard, OneProbeRecallIsBelowHalf) {
  EXPECT_LT(setup_->recall_by_m[0], 0.5);
}

TEST_F(HeavyHard, SixteenProbesReachRecall95) {
  EXPECT_GE(setup_->recall_by_m[4], 0.95);
}

}  // namespace
}  // namespace airmoe
