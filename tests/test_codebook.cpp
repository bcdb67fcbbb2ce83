// Spherical k-means codebook: normalization, assignment, Lloyd monotonicity,
// exact additivity of KMeansStats, empty-codeword repair, capped assignment.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "core/synthetic.h"
#include "ops/lane_dot.h"
#include "router/codebook.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::dot_double;
using test::gather_rows;

SyntheticData small_data(uint64_t seed = 7) {
  SyntheticConfig cfg = synthetic_preset("default");
  cfg.experts = 2048;
  cfg.dim = 48;
  cfg.tokens = 0;
  cfg.clusters = 16;
  cfg.seed = seed;
  return make_synthetic(cfg);
}

TEST(Codebook, NormalizeRowsGivesUnitRows) {
  const Matrix m = random_matrix(50, 13, 3.0, 4);
  const Matrix u = normalize_rows(m.view(), "rows");
  ASSERT_EQ(u.rows(), 50);
  ASSERT_EQ(u.cols(), 13);
  for (int64_t r = 0; r < u.rows(); ++r) {
    EXPECT_NEAR(dot_double(u.row(r), u.row(r), 13), 1.0, 1e-6);
    // Same direction as the input.
    const double cosine =
        dot_double(u.row(r), m.row(r), 13) / std::sqrt(dot_double(m.row(r), m.row(r), 13));
    EXPECT_NEAR(cosine, 1.0, 1e-6);
  }
}

TEST(Codebook, ConstructorNormalizesCodewords) {
  const Matrix w = random_matrix(5, 7, 10.0, 3);
  const Codebook cb(w.view());
  EXPECT_EQ(cb.size(), 5);
  EXPECT_EQ(cb.dim(), 7);
  for (int64_t c = 0; c < 5; ++c)
    EXPECT_NEAR(dot_double(cb.codewords().row(c), cb.codewords().row(c), 7), 1.0, 1e-6);
}

// assign() is the argmax of the inner product, ties to the lower index.
TEST(Codebook, AssignIsNearestCodewordWithTiesToLowerIndex) {
  Matrix w = random_matrix(12, 9, 1.0, 5);
  std::copy_n(w.row(3), 9, w.row(10));  // codeword 10 duplicates codeword 3
  const Codebook cb(w.view());
  const Matrix rows = normalize_rows(random_matrix(500, 9, 1.0, 6).view(), "rows");
  const std::vector<int32_t> got = cb.assign(rows.view());
  ASSERT_EQ(got.size(), 500u);
  const MatrixView cw = cb.codewords();
  for (int64_t r = 0; r < 500; ++r) {
    int32_t best = 0;
    for (int32_t c = 1; c < 12; ++c)
      if (dot_double(rows.row(r), cw.row(c), 9) > dot_double(rows.row(r), cw.row(best), 9))
        best = c;
    EXPECT_EQ(got[r], best) << "row " << r;
    EXPECT_NE(got[r], 10) << "the duplicate must never win";
  }
}

TEST(Codebook, LloydObjectiveNeverDecreases) {
  const SyntheticData data = small_data();
  for (const uint64_t seed : {1ull, 99ull}) {
    KMeansReport report;
    const Codebook cb = train_codebook(data.centers.view(), {64, 15, seed}, &report);
    EXPECT_EQ(cb.size(), 64);
    ASSERT_EQ(report.objective.size(), 15u);
    for (size_t i = 0; i < report.objective.size(); ++i) {
      EXPECT_GT(report.objective[i], -1.0);
      EXPECT_LE(report.objective[i], 1.0 + 1e-9);
      if (i > 0) {
        EXPECT_GE(report.objective[i], report.objective[i - 1] - 1e-6) << "iteration " << i;
      }
    }
    // Lloyd does something: the last pass is better than the first.
    EXPECT_GT(report.objective.back(), report.objective.front());
  }
}

TEST(Codebook, TrainingIsDeterministic) {
  const SyntheticData data = small_data();
  const Codebook a = train_codebook(data.centers.view(), {32, 5, 17});
  const Codebook b = train_codebook(data.centers.view(), {32, 5, 17});
  ASSERT_EQ(a.size(), b.size());
  const MatrixView ca = a.codewords(), cb = b.codewords();
  EXPECT_TRUE(std::equal(ca.data, ca.data + ca.rows * ca.cols, cb.data));
}

void expect_stats_equal(const KMeansStats& a, const KMeansStats& b) {
  EXPECT_EQ(a.codewords, b.codewords);
  EXPECT_EQ(a.dim, b.dim);
  EXPECT_EQ(a.sums, b.sums);
  EXPECT_EQ(a.counts, b.counts);
  EXPECT_EQ(a.objective, b.objective);
  EXPECT_EQ(a.farthest_cos, b.farthest_cos);
  EXPECT_EQ(a.farthest_expert, b.farthest_expert);
}

TEST(Codebook, StatsOfDisjointHalvesAddUpExactly) {
  const SyntheticData data = small_data();
  const Matrix unit = normalize_rows(data.centers.view(), "centers");
  const int64_t E = unit.rows();
  const Codebook cb = train_codebook(data.centers.view(), {40, 3, 5});
  const KMeansStats all = cb.compute_stats(unit.view());
  EXPECT_EQ(all.experts(), E);

  // Two splits: contiguous halves and interleaved (even / odd ids).
  std::vector<std::vector<int64_t>> firsts(2), seconds(2);
  for (int64_t e = 0; e < E; ++e) {
    (e < E / 2 + 3 ? firsts[0] : seconds[0]).push_back(e);
    (e % 2 == 0 ? firsts[1] : seconds[1]).push_back(e);
  }
  for (int split = 0; split < 2; ++split) {
    SCOPED_TRACE("split " + std::to_string(split));
    auto stats_of = [&](const std::vector<int64_t>& ids) {
      const Matrix rows = gather_rows(unit.view(), ids);
      std::vector<int32_t> ids32(ids.begin(), ids.end());
      return cb.compute_stats(rows.view(), ids32.data());
    };
    const KMeansStats a = stats_of(firsts[split]);
    const KMeansStats b = stats_of(seconds[split]);
    EXPECT_EQ(a.experts() + b.experts(), E);
    KMeansStats ab = a;
    ab += b;
    KMeansStats ba = b;
    ba += a;
    expect_stats_equal(ab, all);
    expect_stats_equal(ba, all);
    // Starting from empty stats is the identity.
    KMeansStats zero(cb.size(), cb.dim());
    zero += all;
    expect_stats_equal(zero, all);
  }
}

TEST(Codebook, StatsMatchADirectComputation) {
  const SyntheticData data = small_data();
  const Matrix unit = normalize_rows(data.centers.view(), "centers");
  const Codebook cb = train_codebook(data.centers.view(), {20, 2, 5});
  const KMeansStats s = cb.compute_stats(unit.view());
  const std::vector<int32_t> assign = cb.assign(unit.view());
  std::vector<int64_t> counts(20, 0);
  double objective = 0.0;
  for (int64_t e = 0; e < unit.rows(); ++e) {
    ++counts[assign[e]];
    objective += dot_double(unit.row(e), cb.codewords().row(assign[e]), unit.cols());
  }
  EXPECT_EQ(s.counts, counts);
  EXPECT_NEAR(s.mean_objective(), objective / unit.rows(), 1e-6);
  for (int64_t c = 0; c < 20; ++c) {
    if (counts[c] == 0) continue;
    // The farthest member has the lowest cosine to its codeword.
    double lowest = 2.0;
    for (int64_t e = 0; e < unit.rows(); ++e)
      if (assign[e] == c)
        lowest = std::min(lowest, dot_double(unit.row(e), cb.codewords().row(c), unit.cols()));
    const int32_t far = s.farthest_expert[c];
    ASSERT_GE(far, 0);
    EXPECT_EQ(assign[far], c);
    EXPECT_NEAR(dot_double(unit.row(far), cb.codewords().row(c), unit.cols()), lowest, 1e-6);
  }
}

TEST(Codebook, ApplyRepairsAnEmptyCodeword) {
  const SyntheticData data = small_data();
  const Matrix unit = normalize_rows(data.centers.view(), "centers");
  const Codebook trained = train_codebook(data.centers.view(), {8, 3, 5});
  // Codewords 8 and 9 duplicate codewords 0 and 1: ties go to the lower
  // index, so they get no member.
  Matrix words(10, unit.cols());
  for (int64_t c = 0; c < 8; ++c)
    std::copy_n(trained.codewords().row(c), unit.cols(), words.row(c));
  std::copy_n(trained.codewords().row(0), unit.cols(), words.row(8));
  std::copy_n(trained.codewords().row(1), unit.cols(), words.row(9));
  Codebook cb(words.view());

  const KMeansStats before = cb.compute_stats(unit.view());
  ASSERT_EQ(before.counts[8], 0);
  ASSERT_EQ(before.counts[9], 0);
  // The largest cluster's farthest member is where the first empty codeword goes.
  int32_t donor = 0;
  for (int32_t c = 1; c < 10; ++c)
    if (before.counts[c] > before.counts[donor]) donor = c;
  const int32_t moved_to = before.farthest_expert[donor];

  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit.row(e), unit.cols(), out); };
  const int64_t repaired = cb.apply(before, 1.0, lookup);
  EXPECT_EQ(repaired, 2);
  for (int64_t j = 0; j < unit.cols(); ++j) EXPECT_EQ(cb.codewords()(8, j), unit(moved_to, j));

  const KMeansStats after = cb.compute_stats(unit.view());
  EXPECT_GT(after.counts[8], 0);
  EXPECT_GT(after.counts[9], 0);
  EXPECT_GE(after.mean_objective(), before.mean_objective());
}

// One adaptive_update is compute_stats + apply on the normalized centers.
TEST(Codebook, AdaptiveUpdateIsStatsPlusApply) {
  const SyntheticData data = small_data();
  const Matrix unit = normalize_rows(data.centers.view(), "centers");
  const Codebook start = train_codebook(data.centers.view(), {16, 1, 3});
  for (const double step : {1.0, 0.3}) {
    Codebook a = start, b = start;
    adaptive_update(a, data.centers.view(), step, 2);
    auto lookup = [&](int32_t e, float* out) { std::copy_n(unit.row(e), unit.cols(), out); };
    for (int u = 0; u < 2; ++u) b.apply(b.compute_stats(unit.view()), step, lookup);
    const MatrixView ca = a.codewords(), cb = b.codewords();
    EXPECT_TRUE(std::equal(ca.data, ca.data + ca.rows * ca.cols, cb.data)) << "step " << step;
    // And it moved the codebook.
    EXPECT_FALSE(std::equal(ca.data, ca.data + ca.rows * ca.cols, start.codewords().data));
  }
}

// A partial step moves each codeword part of the way: the EMA result lies
// between the old codeword and the cluster mean direction.
TEST(Codebook, PartialStepInterpolates) {
  const SyntheticData data = small_data();
  const Matrix unit = normalize_rows(data.centers.view(), "centers");
  const Codebook start = train_codebook(data.centers.view(), {16, 1, 3});
  const KMeansStats stats = start.compute_stats(unit.view());
  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit.row(e), unit.cols(), out); };
  Codebook full = start, half = start;
  full.apply(stats, 1.0, lookup);
  half.apply(stats, 0.5, lookup);
  const int64_t d = unit.cols();
  for (int64_t c = 0; c < 16; ++c) {
    if (stats.counts[c] == 0) continue;
    const double old_new = dot_double(start.codewords().row(c), full.codewords().row(c), d);
    const double half_new = dot_double(half.codewords().row(c), full.codewords().row(c), d);
    const double half_old = dot_double(half.codewords().row(c), start.codewords().row(c), d);
    EXPECT_GE(half_new, old_new - 1e-6) << c;
    EXPECT_GE(half_old, old_new - 1e-6) << c;
  }
}

TEST(Codebook, CappedAssignmentRespectsTheCap) {
  const SyntheticData data = small_data();
  const Matrix unit = normalize_rows(data.centers.view(), "centers");
  const int64_t E = unit.rows(), C = 32;
  const Codebook cb = train_codebook(data.centers.view(), {C, 4, 8});
  const std::vector<int32_t> free = cb.assign(unit.view());
  std::vector<int64_t> free_sizes(C, 0);
  for (int32_t c : free) ++free_sizes[c];
  const int64_t largest = *std::max_element(free_sizes.begin(), free_sizes.end());

  for (const int64_t cap : {E / C, E / C + 5, largest - 1}) {
    SCOPED_TRACE("cap " + std::to_string(cap));
    ASSERT_LT(cap, largest) << "the cap must bind for this test to mean anything";
    const std::vector<int32_t> got = cb.assign_capped(unit.view(), cap);
    ASSERT_EQ(static_cast<int64_t>(got.size()), E);
    std::vector<int64_t> sizes(C, 0);
    for (int32_t c : got) {
      ASSERT_GE(c, 0);
      ASSERT_LT(c, C);
      ++sizes[c];
    }
    for (int64_t c = 0; c < C; ++c) EXPECT_LE(sizes[c], cap) << "list " << c;
    // An expert leaves its nearest list only when that list is full, and then
    // takes its best list that had room: every list it prefers ended up full.
    int64_t moved = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (got[e] == free[e]) continue;
      ++moved;
      const float own = lane_dot(unit.row(e), cb.codewords().row(got[e]), unit.cols());
      for (int32_t c = 0; c < C; ++c) {
        const float z = lane_dot(unit.row(e), cb.codewords().row(c), unit.cols());
        if (z > own || (z == own && c < got[e])) {
          EXPECT_EQ(sizes[c], cap) << "expert " << e << " skipped list " << c << " with room";
        }
      }
    }
    EXPECT_GT(moved, 0);
  }
  // A cap that does not bind is plain assignment; cap 0 means no cap.
  EXPECT_EQ(cb.assign_capped(unit.view(), largest), free);
  EXPECT_EQ(cb.assign_capped(unit.view(), 0), free);
  // cap * C < E cannot hold every expert.
  AIRMOE_EXPECT_THROW_MSG(cb.assign_capped(unit.view(), E / C - 1), std::invalid_argument,
                          "cannot hold");
  EXPECT_NO_THROW(cb.assign_capped(unit.view(), E / C));  // E is a multiple of C here
}

TEST(Codebook, TrainingRejectsBadArguments) {
  const Matrix centers = random_matrix(10, 4, 1.0, 2);
  AIRMOE_EXPECT_THROW_MSG(train_codebook(centers.view(), {11, 2, 1}), std::invalid_argument,
                          "codewords C = 11");
  AIRMOE_EXPECT_THROW_MSG(train_codebook(centers.view(), {0, 2, 1}), std::invalid_argument,
                          "codewords C = 0");
  AIRMOE_EXPECT_THROW_MSG(train_codebook(centers.view(), {4, -1, 1}), std::invalid_argument,
                          "iterations");
  Matrix zero = centers;
  std::fill_n(zero.row(6), 4, 0.0f);
  AIRMOE_EXPECT_THROW_MSG(train_codebook(zero.view(), {4, 2, 1}), std::invalid_argument,
                          "centers row 6 has zero norm");
  // C = E works: every expert can be its own codeword.
  const Codebook cb = train_codebook(centers.view(), {10, 3, 1});
  const KMeansStats s = cb.compute_stats(normalize_rows(centers.view(), "c").view());
  for (int64_t c = 0; c < 10; ++c) EXPECT_EQ(s.counts[c], 1);
}

TEST(Codebook, StatsAndApplyRejectMismatches) {
  const Matrix centers = random_matrix(30, 4, 1.0, 2);
  const Matrix unit = normalize_rows(centers.view(), "centers");
  Codebook cb = train_codebook(centers.view(), {5, 2, 1});
  KMeansStats s = cb.compute_stats(unit.view());
  const KMeansStats other(6, 4);
  AIRMOE_EXPECT_THROW_MSG(s += other, std::invalid_argument, "KMeansStats");
  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit.row(e), 4, out); };
  AIRMOE_EXPECT_THROW_MSG(cb.apply(other, 1.0, lookup), std::invalid_argument, "[6, 4]");
  AIRMOE_EXPECT_THROW_MSG(cb.apply(s, 0.0, lookup), std::invalid_argument, "step");
  AIRMOE_EXPECT_THROW_MSG(cb.apply(s, 1.5, lookup), std::invalid_argument, "step");
  const Matrix wrong = random_matrix(3, 5, 1.0, 1);
  AIRMOE_EXPECT_THROW_MSG(cb.compute_stats(wrong.view()), std::invalid_argument, "5 columns");
  AIRMOE_EXPECT_THROW_MSG(cb.assign(wrong.view()), std::invalid_argument, "5 columns");
}

}  // namespace
}  // namespace airmoe
