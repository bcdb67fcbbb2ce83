// AirRouter: exact at m = C, the shortlist holds k experts, probes as a
// per-call knob, ties, determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "backend_params.h"
#include "core/synthetic.h"
#include "ops/lane_dot.h"
#include "ops/topk.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::row_view;

struct Case {
  int64_t E, d, T, C;
  int k;
  uint64_t seed;
  int64_t cap = 0;
};

std::string describe(const Case& c) {
  return "E=" + std::to_string(c.E) + " d=" + std::to_string(c.d) + " T=" + std::to_string(c.T) +
         " C=" + std::to_string(c.C) + " k=" + std::to_string(c.k) +
         " seed=" + std::to_string(c.seed) + " cap=" + std::to_string(c.cap);
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {997, 33, 50, 16, 8, 1},  {997, 33, 50, 16, 8, 2},    {997, 1, 20, 4, 3, 3},
      {997, 1, 20, 4, 1, 4},    {64, 8, 17, 64, 1, 5},      {37, 5, 9, 5, 37, 6},
      {300, 129, 31, 10, 1, 7}, {1000, 24, 40, 25, 300, 8}, {513, 16, 33, 20, 8, 9, 30},
      {2, 3, 5, 2, 2, 10},      {1, 4, 3, 1, 1, 11},
  };
  return all;
}

// With every codeword probed, the shortlist is every expert, so AIR must
// return what dense returns, bit for bit (kChosen), and the same experts with
// gates equal up to the order of the log-sum-exp (kShortlist): on every
// backend, both routers on the same ops.
class AirOnBackend : public test::BackendTest {};

TEST_P(AirOnBackend, AllProbesEqualsDense) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const Matrix centers = random_matrix(c.E, c.d, 1.0, c.seed);
    const Matrix tokens = random_matrix(c.T, c.d, 2.0, c.seed + 500);
    const DenseRouter dense(centers.view(), compute());
    const AirRouter air(centers.view(), AirConfig{c.C, 4, c.seed, c.cap}, compute());
    ASSERT_EQ(air.codewords(), c.C);
    ASSERT_EQ(air.experts(), c.E);

    const Routes d1 = dense.route(tokens.view(), c.k, GateMode::kChosen);
    const Routes a1 = air.route(tokens.view(), c.k, static_cast<int>(c.C), GateMode::kChosen);
    EXPECT_EQ(a1.experts, d1.experts);
    EXPECT_EQ(a1.gates, d1.gates);
    EXPECT_EQ(a1.logits, d1.logits);
    for (int32_t s : a1.shortlist_size) EXPECT_EQ(s, c.E);

    const Routes d2 = dense.route(tokens.view(), c.k, GateMode::kShortlist);
    const Routes a2 = air.route(tokens.view(), c.k, static_cast<int>(c.C), GateMode::kShortlist);
    EXPECT_EQ(a2.experts, d2.experts);
    EXPECT_EQ(a2.logits, d2.logits);
    ASSERT_EQ(a2.gates.size(), d2.gates.size());
    for (size_t i = 0; i < a2.gates.size(); ++i)
      EXPECT_NEAR(a2.gates[i], d2.gates[i], 1e-6 * std::fabs(d2.gates[i]) + 1e-30) << i;
    for (int64_t t = 0; t < c.T; ++t)
      EXPECT_NEAR(a2.log_normalizer[t], d2.log_normalizer[t],
                  1e-12 * (1.0 + std::fabs(d2.log_normalizer[t])));
  }
}

AIRMOE_INSTANTIATE_BACKENDS(AirOnBackend);

// Identical rows give identical logits: the lower id comes first, also when
// the two experts sit in different probed lists.
TEST(AirRouter, TiesGoToTheLowerExpertId) {
  const int64_t E = 200, d = 10;
  Matrix centers = random_matrix(E, d, 0.1, 41);
  const Matrix token = random_matrix(1, d, 1.0, 42);
  for (int64_t j = 0; j < d; ++j) centers(150, j) = centers(33, j) = token(0, j);
  const DenseRouter dense(centers.view());
  const AirRouter air(centers.view(), AirConfig{12, 5, 3, 0});
  for (const int k : {1, 2, 6}) {
    const Routes dr = dense.route(token.view(), k);
    ASSERT_EQ(dr.experts[0], 33);
    if (k >= 2) {
      ASSERT_EQ(dr.experts[1], 150);
    }
    for (const int m : {1, 3, 12}) {
      const Routes ar = air.route(token.view(), k, m);
      EXPECT_EQ(ar.experts[0], 33) << "k=" << k << " m=" << m;
      if (k >= 2) {
        EXPECT_EQ(ar.experts[1], 150) << "k=" << k << " m=" << m;
      }
      if (m == 12) {
        EXPECT_EQ(ar.experts, dr.experts);
      }
    }
  }
}

// Twins in different lists: equal logits for this token (only axis 0 counts)
// but different directions, so the codebook files them apart. The token
// scores both codewords equally, so list 0 (holding the higher id 150) is
// probed first; the merge must still put expert 33 first.
TEST(AirRouter, TiesAcrossListsGoToTheLowerExpertId) {
  const int64_t E = 200, d = 10;
  Matrix centers = random_matrix(E, d, 0.1, 43);
  Matrix token(1, d, 0.0f);
  token(0, 0) = 3.0f;
  Matrix words(2, d, 0.0f);
  words(0, 0) = words(0, 1) = 1.0f;
  words(1, 0) = 1.0f;
  words(1, 1) = -1.0f;
  std::fill_n(centers.row(33), d, 0.0f);
  std::fill_n(centers.row(150), d, 0.0f);
  centers(33, 0) = centers(150, 0) = 2.0f;
  centers(33, 1) = -1.5f;
  centers(150, 1) = 1.5f;
  const AirRouter air(centers.view(), Codebook(words.view()));
  ASSERT_EQ(air.lists().assignment()[33], 1);
  ASSERT_EQ(air.lists().assignment()[150], 0);
  const Routes both = air.route(token.view(), 3, 2);
  EXPECT_EQ(both.probed_codewords, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(both.experts[0], 33);
  EXPECT_EQ(both.experts[1], 150);
  EXPECT_EQ(both.logits[0], both.logits[1]);
  EXPECT_EQ(both.experts, DenseRouter(centers.view()).route(token.view(), 3).experts);
  // k = 1: expert 33 arrives second with the same logit and must displace 150.
  const Routes best = air.route(token.view(), 1, 2);
  EXPECT_EQ(best.experts[0], 33);
  // One probe: the codeword tie goes to index 0, whose list holds only 150.
  const Routes one = air.route(token.view(), 3, 1);
  EXPECT_EQ(one.probed_codewords, std::vector<int32_t>{0});
  EXPECT_EQ(one.experts[0], 150);
}

// The shortlist of probe lists is extended until it holds k experts, so a
// large k still gets k distinct valid experts: the exact top-k of the union
// of the probed lists.
TEST(AirRouter, ShortlistAlwaysHoldsKExperts) {
  const int64_t E = 240, d = 16, C = 60, T = 30;
  const Matrix centers = random_matrix(E, d, 1.0, 51);
  const Matrix tokens = random_matrix(T, d, 1.0, 52);
  const AirRouter air(centers.view(), AirConfig{C, 5, 9, 0});
  const int64_t largest = air.lists().max_list_size();
  for (const int k : {static_cast<int>(largest) + 1, 20, 100, static_cast<int>(E)}) {
    for (const int m : {1, 2, 7}) {
      SCOPED_TRACE("k=" + std::to_string(k) + " m=" + std::to_string(m));
      const Routes r = air.route(tokens.view(), k, m);
      ASSERT_EQ(r.probe_offsets.size(), static_cast<size_t>(T + 1));
      for (int64_t t = 0; t < T; ++t) {
        EXPECT_GE(r.shortlist_size[t], k);
        const int64_t np = r.probe_offsets[t + 1] - r.probe_offsets[t];
        EXPECT_GE(np, m);
        std::set<int32_t> probes(r.probed_codewords.begin() + r.probe_offsets[t],
                                 r.probed_codewords.begin() + r.probe_offsets[t + 1]);
        EXPECT_EQ(static_cast<int64_t>(probes.size()), np) << "a codeword probed twice";
        // The shortlist is the union of the probed lists; its size is recorded.
        std::vector<int32_t> shortlist;
        for (int32_t c : probes)
          for (int32_t e : air.lists().list(c)) shortlist.push_back(e);
        EXPECT_EQ(static_cast<int64_t>(shortlist.size()), r.shortlist_size[t]);
        // Extension stops as soon as there are k experts: without the last
        // probe beyond m there would be fewer than k.
        if (np > m) {
          const int32_t last = r.probed_codewords[r.probe_offsets[t + 1] - 1];
          EXPECT_LT(r.shortlist_size[t] - air.lists().list_size(last), k);
        }
        // Probes are the best codewords by score (ties to the lower index).
        std::vector<float> s(static_cast<size_t>(C));
        for (int64_t c = 0; c < C; ++c)
          s[c] = lane_dot(tokens.row(t), air.codebook().codewords().row(c), d);
        for (int32_t c = 0; c < C; ++c) {
          if (probes.count(c)) continue;
          for (int32_t p : probes) EXPECT_TRUE(ranks_before(s[p], p, s[c], c));
        }
        // k distinct experts, the exact top-k within the shortlist.
        std::set<int32_t> chosen(r.experts_of(t), r.experts_of(t) + k);
        EXPECT_EQ(static_cast<int>(chosen.size()), k);
        std::vector<std::pair<float, int32_t>> ranked;
        for (int32_t e : shortlist)
          ranked.push_back({lane_dot(tokens.row(t), centers.row(e), d), e});
        std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
          return ranks_before(a.first, a.second, b.first, b.second);
        });
        for (int j = 0; j < k; ++j) {
          EXPECT_EQ(r.experts_of(t)[j], ranked[j].second) << "token " << t << " slot " << j;
          EXPECT_EQ(r.logits[t * k + j], ranked[j].first);
        }
      }
    }
  }
}

TEST(AirRouter, ProbeCountChangesWithoutRebuilding) {
  SyntheticConfig cfg = synthetic_preset("default");
  cfg.experts = 3000;
  cfg.dim = 32;
  cfg.tokens = 120;
  cfg.clusters = 12;
  const SyntheticData data = make_synthetic(cfg);
  const AirRouter air(data.centers.view(), AirConfig{48, 5, 1, 0});
  const std::vector<int64_t> offsets = air.lists().offsets();
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    const Routes first = air.route(data.tokens.view(), 8, 1, mode);
    const Routes four = air.route(data.tokens.view(), 8, 4, mode);
    const Routes again = air.route(data.tokens.view(), 8, 1, mode);
    EXPECT_EQ(first.experts, again.experts);
    EXPECT_EQ(first.gates, again.gates);
    EXPECT_EQ(first.probed_codewords, again.probed_codewords);
    EXPECT_EQ(first.shortlist_size, again.shortlist_size);
    // m = 4 probes more and scores more experts.
    double s1 = 0, s4 = 0;
    for (int64_t t = 0; t < cfg.tokens; ++t) {
      EXPECT_GE(four.shortlist_size[t], first.shortlist_size[t]);
      s1 += first.shortlist_size[t];
      s4 += four.shortlist_size[t];
    }
    EXPECT_GT(s4, s1);
    EXPECT_NE(first.probed_codewords.size(), four.probed_codewords.size());
  }
  EXPECT_EQ(air.lists().offsets(), offsets);
}

void expect_same_routes(const Routes& a, const Routes& b) {
  EXPECT_EQ(a.experts, b.experts);
  EXPECT_EQ(a.gates, b.gates);
  EXPECT_EQ(a.logits, b.logits);
  EXPECT_EQ(a.log_normalizer, b.log_normalizer);
  EXPECT_EQ(a.shortlist_size, b.shortlist_size);
  EXPECT_EQ(a.probe_offsets, b.probe_offsets);
  EXPECT_EQ(a.probed_codewords, b.probed_codewords);
}

TEST(AirRouter, SameResultWithOneAndTwoThreads) {
  test::ThreadGuard guard;
  SyntheticConfig cfg = synthetic_preset("default");
  cfg.experts = 4000;
  cfg.dim = 64;
  cfg.tokens = 400;
  cfg.clusters = 16;
  const SyntheticData data = make_synthetic(cfg);
  set_num_threads(1);
  const AirRouter air1(data.centers.view(), AirConfig{64, 4, 2, 0});
  set_num_threads(2);
  const AirRouter air2(data.centers.view(), AirConfig{64, 4, 2, 0});
  // Training does not depend on the thread count either.
  EXPECT_EQ(air1.lists().ids(), air2.lists().ids());
  const MatrixView c1 = air1.codebook().codewords(), c2 = air2.codebook().codewords();
  EXPECT_TRUE(std::equal(c1.data, c1.data + c1.rows * c1.cols, c2.data));
  const Matrix dg = random_matrix(cfg.tokens, 8, 1.0, 5);
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    set_num_threads(1);
    const Routes one = air1.route(data.tokens.view(), 8, 3, mode);
    const RouterGradients g1 = air1.backward(data.tokens.view(), one, dg.view());
    set_num_threads(2);
    const Routes two = air1.route(data.tokens.view(), 8, 3, mode);
    const RouterGradients g2 = air1.backward(data.tokens.view(), two, dg.view());
    expect_same_routes(one, two);
    EXPECT_EQ(test::values(g1.d_tokens), test::values(g2.d_tokens));
    EXPECT_EQ(g1.d_centers.rows, g2.d_centers.rows);
    EXPECT_EQ(test::values(g1.d_centers.values), test::values(g2.d_centers.values));
  }
}

TEST(AirRouter, TokenAloneRoutesAsInABatch) {
  SyntheticConfig cfg = synthetic_preset("default");
  cfg.experts = 2000;
  cfg.dim = 24;
  cfg.tokens = 150;
  cfg.clusters = 10;
  const SyntheticData data = make_synthetic(cfg);
  const AirRouter air(data.centers.view(), AirConfig{32, 4, 3, 0});
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    for (const int m : {1, 3}) {
      const Routes batch = air.route(data.tokens.view(), 6, m, mode);
      for (const int64_t t : {0, 1, 74, 149}) {
        const Routes alone = air.route(row_view(data.tokens.view(), t), 6, m, mode);
        for (int j = 0; j < 6; ++j) {
          EXPECT_EQ(alone.experts[j], batch.experts_of(t)[j]) << "token " << t;
          EXPECT_EQ(alone.gates[j], batch.gates_of(t)[j]) << "token " << t;
        }
        EXPECT_EQ(alone.shortlist_size[0], batch.shortlist_size[t]);
      }
    }
  }
}

TEST(AirRouter, NoTokensGiveEmptyRoutes) {
  const Matrix centers = random_matrix(40, 6, 1.0, 1);
  const AirRouter air(centers.view(), AirConfig{4, 2, 1, 0});
  const Matrix none(0, 6);
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    const Routes r = air.route(none.view(), 5, 2, mode);
    EXPECT_EQ(r.tokens, 0);
    EXPECT_TRUE(r.experts.empty());
    EXPECT_TRUE(r.gates.empty());
    EXPECT_TRUE(r.probed_codewords.empty());
    EXPECT_EQ(r.probe_offsets, std::vector<int64_t>{0});
    const Matrix dg(0, 5);
    const RouterGradients g = air.backward(none.view(), r, dg.view());
    EXPECT_EQ(g.d_tokens.rows(), 0);
    EXPECT_TRUE(g.d_centers.rows.empty());
  }
}

// The lists partition the experts by nearest codeword (or the capped rule),
// and set_centers rebuilds them against the unchanged codebook.
TEST(AirRouter, ListsFollowTheCodebook) {
  const Matrix centers = random_matrix(500, 12, 1.0, 61);
  for (const int64_t cap : {int64_t{0}, int64_t{30}}) {
    AirRouter air(centers.view(), AirConfig{20, 3, 4, cap});
    const Matrix unit = normalize_rows(centers.view(), "centers");
    const std::vector<int32_t> expect = air.codebook().assign_capped(unit.view(), cap);
    EXPECT_EQ(air.lists().assignment(), expect);
    if (cap > 0) {
      EXPECT_LE(air.lists().max_list_size(), cap);
    }

    const Matrix moved = random_matrix(500, 12, 1.0, 62);
    const Matrix before = test::copy_matrix(air.codebook().codewords());
    air.set_centers(moved.view());
    const MatrixView after = air.codebook().codewords();
    EXPECT_TRUE(std::equal(after.data, after.data + after.rows * after.cols, before.data()))
        << "set_centers must not touch the codebook";
    const Matrix unit2 = normalize_rows(moved.view(), "centers");
    EXPECT_EQ(air.lists().assignment(), air.codebook().assign_capped(unit2.view(), cap));
    // And routing uses the new centers: at m = C it is dense over them.
    const Matrix tokens = random_matrix(10, 12, 1.0, 63);
    EXPECT_EQ(air.route(tokens.view(), 4, 20).experts,
              DenseRouter(moved.view()).route(tokens.view(), 4).experts);
  }
}

TEST(AirRouter, GivenCodebookIsUsedAsIs) {
  const Matrix centers = random_matrix(100, 6, 1.0, 71);
  const Matrix words = random_matrix(7, 6, 1.0, 72);
  const Codebook cb(words.view());
  const AirRouter air(centers.view(), cb);
  ASSERT_EQ(air.codewords(), 7);
  const MatrixView a = air.codebook().codewords(), b = cb.codewords();
  EXPECT_TRUE(std::equal(a.data, a.data + a.rows * a.cols, b.data));
  const Matrix unit = normalize_rows(centers.view(), "centers");
  EXPECT_EQ(air.lists().assignment(), cb.assign(unit.view()));
  EXPECT_GT(air.flops_per_token(10.0), air.flops_per_token(5.0));
  EXPECT_DOUBLE_EQ(air.flops_per_token(10.0), 2.0 * 7 * 6 + 2.0 * 10 * 6);
}

}  // namespace
}  // namespace airmoe
