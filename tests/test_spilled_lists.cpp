// Spilled and balanced lists: SOAR spill choice, segments that scan each
// probed expert once, AIR with spills exact at m = C, shortlist and FLOPs
// counting distinct experts, caps.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "core/threads.h"
#include "router/air_defaults.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/spilled_lists.h"
#include "test_util.h"

namespace airmoe {
namespace {

// The SOAR loss of codeword c for unit row x, in double, from its definition.
double soar_loss(MatrixView words, const float* x, const std::vector<int32_t>& taken, int32_t c,
                 double lambda) {
  const int64_t d = words.cols;
  std::vector<double> rc(static_cast<size_t>(d));
  double loss = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    rc[j] = double(x[j]) - double(words.row(c)[j]);
    loss += rc[j] * rc[j];
  }
  for (int32_t t : taken) {
    double dot = 0.0, norm2 = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double r = double(x[j]) - double(words.row(t)[j]);
      dot += r * rc[j];
      norm2 += r * r;
    }
    if (norm2 >= 1e-12) loss += lambda * dot * dot / norm2;
  }
  return loss;
}

// Each expert's lists, primary first, as AirRouter builds them.
std::vector<std::vector<int32_t>> lists_of(const AirRouter& air) {
  const Matrix unit = normalize_rows(air.centers(), "centers");
  const std::vector<int32_t>& primary = air.lists().assignment();
  const ListOptions& o = air.list_options();
  const std::vector<int32_t> spilled = soar_spills(
      air.codebook(), unit.view(), primary, {o.spills, o.spill_lambda, o.spills * o.list_cap});
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(air.experts()));
  for (int64_t e = 0; e < air.experts(); ++e) {
    out[e].push_back(primary[e]);
    for (int s = 0; s < o.spills; ++s) out[e].push_back(spilled[e * o.spills + s]);
  }
  return out;
}

TEST(SoarSpills, EachSpillMinimizesTheSoarLoss) {
  const Matrix words = random_matrix(12, 6, 1.0, 11);
  const Codebook cb(words.view());
  const Matrix unit = normalize_rows(random_matrix(300, 6, 1.0, 12).view(), "rows");
  const std::vector<int32_t> primary = cb.assign(unit.view());
  for (const int spills : {1, 3})
    for (const double lambda : {0.0, 1.0, 4.0}) {
      SCOPED_TRACE("spills=" + std::to_string(spills) + " lambda=" + std::to_string(lambda));
      const std::vector<int32_t> got = soar_spills(cb, unit.view(), primary, {spills, lambda, 0});
      ASSERT_EQ(got.size(), primary.size() * spills);
      for (int64_t i = 0; i < unit.rows(); ++i) {
        std::vector<int32_t> taken{primary[i]};
        for (int s = 0; s < spills; ++s) {
          const int32_t c = got[i * spills + s];
          ASSERT_EQ(std::count(taken.begin(), taken.end(), c), 0) << "row " << i;
          double best = std::numeric_limits<double>::infinity();
          for (int32_t o = 0; o < cb.size(); ++o)
            if (std::count(taken.begin(), taken.end(), o) == 0)
              best = std::min(best, soar_loss(cb.codewords(), unit.row(i), taken, o, lambda));
          EXPECT_LE(soar_loss(cb.codewords(), unit.row(i), taken, c, lambda), best + 1e-5)
              << "row " << i;
          taken.push_back(c);
        }
      }
    }
}

TEST(SoarSpills, WithoutPenaltyTheSpillIsTheSecondNearest) {
  const Matrix words = random_matrix(9, 5, 1.0, 21);
  const Codebook cb(words.view());
  const Matrix unit = normalize_rows(random_matrix(200, 5, 1.0, 22).view(), "rows");
  const std::vector<int32_t> primary = cb.assign(unit.view());
  const std::vector<int32_t> got = soar_spills(cb, unit.view(), primary, {1, 0.0, 0});
  for (int64_t i = 0; i < unit.rows(); ++i) {
    int32_t second = -1;
    for (int32_t c = 0; c < cb.size(); ++c)
      if (c != primary[i] &&
          (second < 0 || test::dot_double(unit.row(i), cb.codewords().row(c), 5) >
                             test::dot_double(unit.row(i), cb.codewords().row(second), 5)))
        second = c;
    EXPECT_EQ(got[i], second) << "row " << i;
  }
}

TEST(SoarSpills, CapBoundsSpilledEntriesPerList) {
  const Matrix words = random_matrix(10, 4, 1.0, 31);
  const Codebook cb(words.view());
  const Matrix unit = normalize_rows(random_matrix(400, 4, 1.0, 32).view(), "rows");
  const std::vector<int32_t> primary = cb.assign(unit.view());
  for (const int spills : {1, 2}) {
    const int64_t cap = (400 * spills + 9 - spills) / (10 - spills);  // the least the check allows
    const std::vector<int32_t> got = soar_spills(cb, unit.view(), primary, {spills, 1.0, cap});
    std::vector<int64_t> fill(10, 0);
    for (int64_t i = 0; i < 400; ++i) {
      std::set<int32_t> mine{primary[i]};
      for (int s = 0; s < spills; ++s) {
        ++fill[got[i * spills + s]];
        mine.insert(got[i * spills + s]);
      }
      EXPECT_EQ(mine.size(), size_t(1 + spills)) << "row " << i;
    }
    for (int64_t c = 0; c < 10; ++c) EXPECT_LE(fill[c], cap) << "list " << c;
  }
  AIRMOE_EXPECT_THROW_MSG(soar_spills(cb, unit.view(), primary, {1, 1.0, 40}),
                          std::invalid_argument, "spill cap 40");
  AIRMOE_EXPECT_THROW_MSG(soar_spills(cb, unit.view(), primary, {10, 1.0, 0}),
                          std::invalid_argument, "spills must be in");
  AIRMOE_EXPECT_THROW_MSG(soar_spills(cb, unit.view(), primary, {1, -1.0, 0}),
                          std::invalid_argument, "lambda");
}

// For any set of probes, the scanned segments hold each expert of the probed
// lists exactly once.
TEST(ListSegments, ProbedExpertsAreScannedExactlyOnce) {
  const int64_t E = 300, C = 11;
  for (const int per : {1, 2, 3}) {
    SCOPED_TRACE("lists per expert " + std::to_string(per));
    std::vector<int32_t> of(static_cast<size_t>(E * per));
    uint64_t state = 99 + per;
    const auto next = [&] {
      return (state = state * 6364136223846793005ULL + 1442695040888963407ULL) >> 33;
    };
    for (int64_t e = 0; e < E; ++e)
      for (int r = 0; r < per; ++r) {
        int32_t c;
        do c = static_cast<int32_t>(next() % C);
        while (std::find(of.begin() + e * per, of.begin() + e * per + r, c) !=
               of.begin() + e * per + r);
        of[e * per + r] = c;
      }
    const ListSegments seg(of, per, C);
    EXPECT_EQ(seg.entries(), E * per);
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<int32_t> probes;
      for (int32_t c = 0; c < C; ++c)
        if (next() % 3 == 0) probes.push_back(c);
      std::shuffle(probes.begin(), probes.end(), std::mt19937(trial));
      std::vector<int32_t> scanned;
      ProbedLists scratch;
      seg.for_each_scanned(probes, scratch, [&](int64_t s) {
        for (int32_t e : seg.members(s)) scanned.push_back(e);
      });
      std::vector<int32_t> expect;
      for (int64_t e = 0; e < E; ++e)
        for (int r = 0; r < per; ++r)
          if (std::count(probes.begin(), probes.end(), of[e * per + r])) {
            expect.push_back(static_cast<int32_t>(e));
            break;
          }
      std::sort(scanned.begin(), scanned.end());
      EXPECT_EQ(scanned, expect) << "trial " << trial;  // sorted, so a repeat would show
    }
  }
  AIRMOE_EXPECT_THROW_MSG(ListSegments({0, 0}, 2, 3), std::invalid_argument, "twice");
  AIRMOE_EXPECT_THROW_MSG(ListSegments({0, 5}, 2, 3), std::invalid_argument, "outside [0, 3)");
}

struct SpillCase {
  int64_t E, d, T, C;
  int k, spills;
  int64_t cap;
  uint64_t seed;
};

const std::vector<SpillCase>& spill_cases() {
  static const std::vector<SpillCase> all = {
      {997, 33, 50, 16, 8, 1, 0, 1}, {997, 33, 50, 16, 8, 2, 0, 2}, {513, 16, 33, 20, 8, 1, 40, 3},
      {300, 9, 21, 10, 1, 3, 0, 4},  {37, 5, 9, 5, 37, 1, 0, 5},    {64, 8, 17, 8, 4, 2, 12, 6},
  };
  return all;
}

std::string describe(const SpillCase& c) {
  return "E=" + std::to_string(c.E) + " C=" + std::to_string(c.C) + " k=" + std::to_string(c.k) +
         " spills=" + std::to_string(c.spills) + " cap=" + std::to_string(c.cap);
}

// A case's random centers and tokens, and AIR over them with its lists.
struct SpillSetup {
  explicit SpillSetup(const SpillCase& c, uint64_t token_seed)
      : w(random_matrix(c.E, c.d, 1.0, c.seed)),
        h(random_matrix(c.T, c.d, 2.0, token_seed)),
        air(w.view(), AirConfig{c.C, 4, c.seed, c.cap, c.spills}) {}
  Matrix w, h;
  AirRouter air;
};

// With every list probed, every expert is scored exactly once (shortlist E)
// and the routes are dense routing's, bit for bit in both gate modes but for
// the log-normalizer's summation order.
TEST(AirRouterSpill, AllProbesEqualsDense) {
  for (const SpillCase& c : spill_cases()) {
    SCOPED_TRACE(describe(c));
    const SpillSetup s(c, c.seed + 500);
    EXPECT_EQ(s.air.segments().entries(), c.E * (1 + c.spills));
    for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
      const Routes want = DenseRouter(s.w.view()).route(s.h.view(), c.k, mode);
      const Routes got = s.air.route(s.h.view(), c.k, static_cast<int>(c.C), mode);
      EXPECT_EQ(got.shortlist_size, std::vector<int32_t>(c.T, static_cast<int32_t>(c.E)));
      EXPECT_EQ(got.experts, want.experts);
      EXPECT_EQ(got.logits, want.logits);
      if (mode == GateMode::kChosen) {
        EXPECT_EQ(got.gates, want.gates);
      }
      for (int64_t t = 0; mode == GateMode::kShortlist && t < c.T; ++t)
        EXPECT_NEAR(got.log_normalizer[t], want.log_normalizer[t],
                    1e-12 * (1.0 + std::fabs(want.log_normalizer[t])));
    }
  }
}

// The shortlist (and so the FLOPs) counts each distinct expert of the probed
// lists once, and routing is exact top-k over that set.
TEST(AirRouterSpill, ShortlistIsTheDistinctMembersOfTheProbedLists) {
  for (const SpillCase& c : spill_cases()) {
    SCOPED_TRACE(describe(c));
    const SpillSetup setup(c, c.seed + 600);
    const Matrix &centers = setup.w, &tokens = setup.h;
    const AirRouter& air = setup.air;
    const std::vector<std::vector<int32_t>> of = lists_of(air);
    for (const int m : {1, 2, 3}) {
      if (m > c.C) continue;
      const Routes r = air.route(tokens.view(), c.k, m, GateMode::kShortlist);
      double total = 0.0;
      for (int64_t t = 0; t < c.T; ++t) {
        const std::set<int32_t> probed(r.probed_codewords.begin() + r.probe_offsets[t],
                                       r.probed_codewords.begin() + r.probe_offsets[t + 1]);
        std::vector<int32_t> members;
        for (int64_t e = 0; e < c.E; ++e)
          if (std::any_of(of[e].begin(), of[e].end(), [&](int32_t l) { return probed.count(l); }))
            members.push_back(static_cast<int32_t>(e));
        ASSERT_EQ(r.shortlist_size[t], static_cast<int32_t>(members.size())) << "token " << t;
        total += static_cast<double>(members.size());
        const Matrix sub =
            test::gather_rows(centers.view(), std::vector<int64_t>(members.begin(), members.end()));
        const Routes exact = DenseRouter(sub.view()).route(test::row_view(tokens.view(), t), c.k);
        for (int j = 0; j < c.k; ++j)
          EXPECT_EQ(r.experts[t * c.k + j], members[exact.experts[j]]) << "token " << t;
        double lse = -std::numeric_limits<double>::infinity();
        for (int32_t e : members) {
          const double z = test::dot_double(tokens.row(t), centers.row(e), c.d);
          lse = std::max(lse, z) + std::log1p(std::exp(-std::fabs(lse - z)));
        }
        EXPECT_NEAR(r.log_normalizer[t], lse, 1e-4 * (1.0 + std::fabs(lse))) << "token " << t;
      }
      const double mean = total / static_cast<double>(c.T);
      EXPECT_DOUBLE_EQ(air.flops_per_token(mean),
                       2.0 * double(c.C * c.d) + 2.0 * mean * double(c.d));
    }
  }
}

TEST(AirRouterSpill, BalancedListsRespectTheCapAndHoldEveryExpert) {
  const Matrix centers = random_matrix(800, 10, 1.0, 41);
  for (const int spills : {0, 1, 2}) {
    AirConfig cfg{16, 4, 42, 60};
    cfg.spills = spills;
    const AirRouter air(centers.view(), cfg);
    EXPECT_LE(air.lists().max_list_size(), 60);
    EXPECT_LE(air.segments().max_list_size(), 60 * (1 + spills));
    std::vector<int> count(800, 0);
    for (int64_t s = 0; s < air.segments().segments(); ++s)
      for (int32_t e : air.segments().members(s)) ++count[e];
    for (int64_t e = 0; e < 800; ++e) EXPECT_EQ(count[e], 1 + spills) << "expert " << e;
    std::vector<int> primary(800, 0);
    for (int64_t c = 0; c < 16; ++c)
      for (int32_t e : air.lists().list(c)) ++primary[e];
    EXPECT_EQ(primary, std::vector<int>(800, 1));
  }
}

// Spills change the lists, not the codebook: its statistics come from the
// primary (nearest) assignment, and stats of disjoint halves still add up
// exactly to the whole.
TEST(AirRouterSpill, CodebookUpdatesIgnoreSpills) {
  const Matrix centers = random_matrix(600, 8, 1.0, 51);
  AirConfig plain_cfg{12, 3, 52, 0}, spill_cfg = plain_cfg;
  spill_cfg.spills = 2;
  AirRouter plain(centers.view(), plain_cfg), spilled(centers.view(), spill_cfg);
  const Matrix moved = random_matrix(600, 8, 1.0, 53);
  plain.set_centers(moved.view());
  spilled.set_centers(moved.view());
  plain.update_codebook(0.5, 2);
  spilled.update_codebook(0.5, 2);
  EXPECT_EQ(test::values(plain.codebook().codewords()),
            test::values(spilled.codebook().codewords()));
  const Matrix unit = normalize_rows(moved.view(), "centers");
  const KMeansStats all = spilled.codebook().compute_stats(unit.view());
  std::vector<int32_t> ids(600);
  std::iota(ids.begin(), ids.end(), 0);
  const MatrixView first{unit.data(), 250, 8}, second{unit.row(250), 350, 8};
  KMeansStats a = spilled.codebook().compute_stats(first, ids.data());
  a += spilled.codebook().compute_stats(second, ids.data() + 250);
  EXPECT_EQ(a.sums, all.sums);
  EXPECT_EQ(a.counts, all.counts);
  EXPECT_EQ(a.objective, all.objective);
}

TEST(AirRouterSpill, SameResultWithOneAndTwoThreads) {
  const Matrix centers = random_matrix(2000, 16, 1.0, 61);
  const Matrix tokens = random_matrix(300, 16, 2.0, 62);
  AirConfig cfg{32, 3, 63, 80};
  cfg.spills = 1;
  const int before = num_threads();
  set_num_threads(1);
  const AirRouter one(centers.view(), cfg);
  const Routes r1 = one.route(tokens.view(), 8, 3, GateMode::kShortlist);
  set_num_threads(2);
  const AirRouter two(centers.view(), cfg);
  const Routes r2 = two.route(tokens.view(), 8, 3, GateMode::kShortlist);
  set_num_threads(before);
  EXPECT_EQ(r1.experts, r2.experts);
  EXPECT_EQ(r1.gates, r2.gates);
  EXPECT_EQ(r1.shortlist_size, r2.shortlist_size);
}

TEST(AirRouterSpill, BadSpillOptionsNameTheArgument) {
  const Matrix centers = random_matrix(100, 6, 1.0, 81);
  AirConfig cfg{8, 2, 82, 0, -1};
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), cfg), std::invalid_argument,
                          "spills must be >= 0, got -1");
  cfg.spills = 8;
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), cfg), std::invalid_argument,
                          "spills must be in");
  cfg.spills = 1;
  cfg.spill_lambda = std::nan("");
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), cfg), std::invalid_argument, "lambda");
  cfg = AirConfig{8, 2, 82, 13, 1};  // 13 x 7 lists cannot take 100 spills
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), cfg), std::invalid_argument, "spill cap 13");
}

// The defaults follow E: the (E, C, m) points measured in docs/routing.md.
TEST(AirDefaults, FollowTheMeasuredTable) {
  const auto expect = [](int64_t E, int64_t C, int m) {
    const AirDefaults d = recommended_air(E);
    EXPECT_EQ(d.codewords, C) << "E=" << E;
    EXPECT_EQ(d.probes, m) << "E=" << E;
  };
  expect(1024, 32, 1);
  expect(4096, 64, 1);
  expect(16384, 128, 2);
  expect(65536, 256, 4);
  expect(262144, 512, 8);
  expect(1, 1, 1);
  expect(3, 2, 1);  // C never exceeds E, m never exceeds C
  AIRMOE_EXPECT_THROW_MSG(recommended_air(0), std::invalid_argument, "E must be >= 1");
}

}  // namespace
}  // namespace airmoe
