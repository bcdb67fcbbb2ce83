// Query-aware lists (router/query_lists.h): lists of the most-picked
// experts, counts that add up exactly over any split of the sample, AIR with
// every list probed equal to dense (with and without a bias), the shortlist
// and FLOPs counting distinct experts, refresh, and bad inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/query_lists.h"
#include "router/spilled_lists.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::clustered_data;

std::vector<float> random_bias(int64_t E, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, static_cast<float>(scale));
  std::vector<float> b(static_cast<size_t>(E));
  for (float& x : b) x = n(rng);
  return b;
}

MatrixView rows_of(MatrixView m, int64_t first, int64_t count) {
  return {m.row(first), count, m.cols};
}

// Experts in several lists and experts no list took (placed at home): the
// lists these tests build exercise both.
struct QuerySetup {
  static constexpr int64_t E = 300, d = 16, T = 480, C = 16, L = 24;
  static constexpr int k = 4;
  SyntheticData data = clustered_data(E, d, T, 31);
  MatrixView centers() const { return data.centers.view(); }
  MatrixView sample() const { return rows_of(data.tokens.view(), 0, 400); }
  MatrixView eval() const { return rows_of(data.tokens.view(), 400, T - 400); }
  QueryListOptions options() const { return {C, L, k, 5, 7}; }
};

int64_t experts_in_several_lists(const ListMembership& m) {
  int64_t n = 0;
  for (int64_t e = 0; e < m.experts(); ++e) n += m.offsets[e + 1] - m.offsets[e] > 1;
  return n;
}

TEST(QueryLists, EveryListProbedEqualsDenseWithAndWithoutBias) {
  const QuerySetup s;
  const std::vector<float> bias = random_bias(s.E, 2.0, 32);
  for (const bool biased : {false, true}) {
    const TensorView b = biased ? bias_view(bias) : TensorView();
    const QueryLists q = build_query_lists(s.centers(), b, s.sample(), s.options());
    ASSERT_GT(experts_in_several_lists(q.membership), 0) << "the lists do not overlap";
    ASSERT_LT(q.membership.entries(), s.E * s.C) << "every expert is in every list";
    const AirRouter air(s.centers(), b, s.sample(), s.options());
    ASSERT_TRUE(air.has_query_lists());
    EXPECT_EQ(air.segments().entries(), q.membership.entries());
    DenseRouter dense(s.centers());
    if (biased) dense.set_bias(b);
    for (const GateMode mode : {GateMode::kChosen, GateMode::kSigmoid, GateMode::kShortlist}) {
      SCOPED_TRACE(std::string(biased ? "biased " : "unbiased ") + to_string(mode));
      const Routes want = dense.route(s.eval(), s.k, mode);
      const Routes got = air.route(s.eval(), s.k, static_cast<int>(s.C), mode);
      EXPECT_EQ(got.shortlist_size, std::vector<int32_t>(want.tokens, static_cast<int32_t>(s.E)));
      EXPECT_EQ(got.experts, want.experts);
      EXPECT_EQ(got.logits, want.logits);
      if (mode != GateMode::kShortlist) {
        EXPECT_EQ(got.gates, want.gates);
        EXPECT_EQ(got.log_normalizer, want.log_normalizer);
      }
      for (int64_t t = 0; mode == GateMode::kShortlist && t < want.tokens; ++t)
        EXPECT_NEAR(got.log_normalizer[t], want.log_normalizer[t],
                    1e-12 * (1.0 + std::fabs(want.log_normalizer[t])));
    }
  }
}

// The counting step over P = 1..4 parts of the sample (uneven, one part
// may be empty), summed in any order, gives the counts and the lists of the
// whole sample.
TEST(QueryLists, SplitCountsGiveIdenticalLists) {
  const QuerySetup s;
  const std::vector<float> bias = random_bias(s.E, 1.0, 33);
  const Codebook codebook = train_query_codebook(s.sample(), s.options());
  const std::vector<int32_t> home = codebook.assign(normalize_rows(s.centers(), "centers").view());
  for (const bool biased : {false, true}) {
    DenseRouter exact(s.centers());
    if (biased) exact.set_bias(bias_view(bias));
    const PickCounts whole = count_picks(codebook, exact, s.sample(), s.k);
    const ListMembership want = lists_from_counts(whole, s.L, home);
    int64_t total = 0;
    for (int64_t v : whole.data()) total += v;
    EXPECT_EQ(total, s.sample().rows * s.k);
    for (int P = 1; P <= 4; ++P) {
      SCOPED_TRACE("P = " + std::to_string(P) + (biased ? " biased" : ""));
      // Part p holds rows [cut[p], cut[p + 1]): sizes 0, 1, ... uneven.
      std::vector<int64_t> cut{0};
      for (int p = 1; p < P; ++p) cut.push_back(std::min<int64_t>(400, cut.back() + 37 * p * p));
      cut.push_back(400);
      PickCounts sum(s.C, s.E);
      for (int p = P - 1; p >= 0; --p)  // the reverse order: addition must not care
        sum += count_picks(codebook, exact, rows_of(s.sample(), cut[p], cut[p + 1] - cut[p]), s.k);
      EXPECT_EQ(sum.data(), whole.data());
      const ListMembership got = lists_from_counts(sum, s.L, home);
      EXPECT_EQ(got.offsets, want.offsets);
      EXPECT_EQ(got.lists, want.lists);
    }
  }
}

// Each list holds its L most picked experts (ties to the lower id, never an
// expert it did not pick); an expert no list took sits in its home list;
// each expert's lists come most picked first (then the lower list).
TEST(QueryLists, ListsAreTheMostPickedExperts) {
  PickCounts counts(3, 6);
  const int64_t table[3][6] = {{5, 2, 2, 0, 2, 0}, {7, 1, 0, 0, 0, 0}, {3, 3, 0, 0, 9, 0}};
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t e = 0; e < 6; ++e) counts.data()[c * 6 + e] = table[c][e];
  const ListMembership m = lists_from_counts(counts, 2, {2, 0, 1, 1, 0, 2});
  // L = 2. List 0: expert 0 (5), then 1, 2 and 4 tie at 2: 1. List 1: 0
  // (7) and 1 (1). List 2: 4 (9), then 0 and 1 tie at 3: 0. Expert 2 was
  // picked but cut by the length, 3 and 5 never: their home lists 1, 1, 2.
  // Expert 0's lists by count: 1 (7), 0 (5), 2 (3).
  const std::vector<std::vector<int32_t>> expected = {{1, 0, 2}, {0, 1}, {1}, {1}, {2}, {2}};
  ASSERT_EQ(m.experts(), 6);
  EXPECT_EQ(m.list_count, 3);
  for (int64_t e = 0; e < 6; ++e)
    EXPECT_EQ(
        std::vector<int32_t>(m.lists.begin() + m.offsets[e], m.lists.begin() + m.offsets[e + 1]),
        expected[e])
        << "expert " << e;
}

// The shortlist is the distinct members of the probed lists (an expert in
// two probed lists is scored once), and flops_per_token counts them.
TEST(QueryLists, ShortlistAndFlopsCountDistinctExperts) {
  const QuerySetup s;
  const QueryLists q = build_query_lists(s.centers(), {}, s.sample(), s.options());
  const ListMembership m = q.membership;
  const AirRouter air(s.centers(), {}, s.sample(), s.options());
  int64_t overlapping_tokens = 0;
  for (const int probes : {1, 3, 6}) {
    const Routes r = air.route(s.eval(), s.k, probes);
    for (int64_t t = 0; t < r.tokens; ++t) {
      const std::set<int32_t> probed(r.probed_codewords.begin() + r.probe_offsets[t],
                                     r.probed_codewords.begin() + r.probe_offsets[t + 1]);
      std::set<int32_t> distinct;
      int64_t entries = 0;
      for (int64_t e = 0; e < s.E; ++e)
        for (int64_t i = m.offsets[e]; i < m.offsets[e + 1]; ++i)
          if (probed.count(m.lists[i])) {
            distinct.insert(static_cast<int32_t>(e));
            ++entries;
          }
      overlapping_tokens += entries > static_cast<int64_t>(distinct.size());
      ASSERT_EQ(r.shortlist_size[t], static_cast<int32_t>(distinct.size())) << "token " << t;
      for (int j = 0; j < s.k; ++j) EXPECT_TRUE(distinct.count(r.experts_of(t)[j]));
    }
    EXPECT_DOUBLE_EQ(air.flops_per_token(100.0), 2.0 * s.C * s.d + 2.0 * 100.0 * s.d);
  }
  EXPECT_GT(overlapping_tokens, 0) << "no token probed two lists sharing an expert";
  // Building: the exact routing of 400 tokens over 300 experts, k-means++
  // seeding on min(400, 8 C) = 128 tokens (C - 1 = 15 passes), 5 Lloyd
  // passes and the final assignment, 2 d FLOPs per dot product.
  const double want = 2.0 * s.d * (400.0 * 300 + 128.0 * 15 + 5 * 400.0 * 16 + 400.0 * 16);
  EXPECT_DOUBLE_EQ(q.build_flops, want);
  EXPECT_DOUBLE_EQ(air.query_lists_build_flops(), want);
  EXPECT_DOUBLE_EQ(AirRouter(s.centers(), AirConfig{s.C}).query_lists_build_flops(), 0.0);
}

// set_centers and set_bias keep the lists; refresh_lists recounts them
// under the current centers and bias, as a new router would.
TEST(QueryLists, RefreshRecountsUnderTheCurrentBias) {
  const QuerySetup s;
  const std::vector<float> bias = random_bias(s.E, 3.0, 34);
  AirRouter air(s.centers(), {}, s.sample(), s.options());
  const Routes before = air.route(s.eval(), s.k, 2);
  air.set_bias(bias_view(bias));
  air.set_centers(s.centers());
  air.clear_bias();
  EXPECT_EQ(air.route(s.eval(), s.k, 2).experts, before.experts) << "the lists moved";
  air.set_bias(bias_view(bias));
  air.refresh_lists(s.sample());
  const AirRouter fresh(s.centers(), bias_view(bias), s.sample(), s.options());
  const Routes got = air.route(s.eval(), s.k, 2), want = fresh.route(s.eval(), s.k, 2);
  EXPECT_EQ(got.experts, want.experts);
  EXPECT_EQ(got.shortlist_size, want.shortlist_size);
  EXPECT_NE(got.shortlist_size, before.shortlist_size) << "the bias changed no list";
}

void expect_error(const std::function<void()>& f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << part << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(QueryLists, BadInputsGiveClearErrors) {
  const QuerySetup s;
  const QueryListOptions o = s.options();
  const auto build = [&](MatrixView tokens, QueryListOptions opt) {
    return [&s, tokens, opt] { build_query_lists(s.centers(), {}, tokens, opt); };
  };
  expect_error(build(rows_of(s.sample(), 0, 0), o), "the sample has no tokens");
  expect_error(build(s.sample(), {s.C, s.L, 0, 5, 7}), "k");
  expect_error(build(s.sample(), {s.C, s.L, static_cast<int>(s.E) + 1, 5, 7}), "k");
  expect_error(build(s.sample(), {s.C, 0, s.k, 5, 7}), "list length L");
  expect_error(build(s.sample(), {s.C, s.E + 1, s.k, 5, 7}), "list length L");
  expect_error(build(s.sample(), {0, s.L, s.k, 5, 7}), "codewords");
  expect_error(build(rows_of(s.sample(), 0, 10), o), "C = 16 codewords need between 1 and the 10");
  Matrix bad = test::copy_matrix(s.sample());
  bad.row(7)[3] = std::numeric_limits<float>::quiet_NaN();
  expect_error(build(bad.view(), o), "query lists: sample tokens row 7");
  bad = test::copy_matrix(s.sample());
  std::fill_n(bad.row(9), s.d, 0.0f);
  expect_error(build(bad.view(), o), "sample tokens row 9 has zero norm");
  const Matrix narrow = random_matrix(50, s.d - 1, 1.0, 3);
  expect_error(build(narrow.view(), o), "columns");
  PickCounts a(2, 3);
  expect_error([&] { a += PickCounts(3, 3); }, "cannot add [3, 3] counts to [2, 3]");
  expect_error([&] { lists_from_counts(a, 2, {0, 1}); }, "2 home lists for E = 3");

  AirRouter query(s.centers(), {}, s.sample(), o);
  expect_error([&] { query.update_codebook(); }, "refresh_lists");
  expect_error([&] { query.set_centers(rows_of(s.centers(), 0, 100)); }, "hold E = 300");
  AirRouter plain(s.centers(), AirConfig{s.C});
  expect_error([&] { plain.refresh_lists(s.sample()); }, "not from tokens");
}

// ListSegments over memberships of any size (more than SOAR's 8 lists per
// expert): every probed expert is scanned exactly once.
TEST(ListSegmentsCsr, EachProbedExpertIsScannedOnce) {
  const int64_t E = 60, C = 20;
  std::mt19937_64 rng(35);
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> lists;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int32_t> all(C);
    for (int32_t c = 0; c < C; ++c) all[c] = c;
    std::shuffle(all.begin(), all.end(), rng);
    const int64_t n = 1 + static_cast<int64_t>(rng() % 14);
    lists.insert(lists.end(), all.begin(), all.begin() + n);
    offsets.push_back(static_cast<int64_t>(lists.size()));
  }
  const ListSegments seg(offsets, lists, C);
  EXPECT_EQ(seg.entries(), static_cast<int64_t>(lists.size()));
  ProbedLists scratch;  // one for every trial: it must come back clear
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> probes(C);
    for (int32_t c = 0; c < C; ++c) probes[c] = c;
    std::shuffle(probes.begin(), probes.end(), rng);
    probes.resize(1 + rng() % C);
    std::vector<int32_t> scanned;
    seg.for_each_scanned(probes, scratch, [&](int64_t s) {
      for (int32_t e : seg.members(s)) scanned.push_back(e);
    });
    std::set<int32_t> want;
    const std::set<int32_t> probed(probes.begin(), probes.end());
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = offsets[e]; i < offsets[e + 1]; ++i)
        if (probed.count(lists[i])) want.insert(static_cast<int32_t>(e));
    std::sort(scanned.begin(), scanned.end());
    EXPECT_EQ(scanned, std::vector<int32_t>(want.begin(), want.end())) << "trial " << trial;
  }
  // A probe outside the lists is refused by name, and leaves the scratch
  // clear: the next token scans as if it were fresh.
  const std::vector<int32_t> bad{0, 1, static_cast<int32_t>(C)};
  expect_error([&] { seg.for_each_scanned(bad, scratch, [](int64_t) {}); },
               "probe 2 names list " + std::to_string(C) + ", outside [0, " + std::to_string(C));
  const std::vector<int32_t> last{static_cast<int32_t>(C - 1)};
  int64_t members = 0, fresh_members = 0;
  seg.for_each_scanned(last, scratch, [&](int64_t s) { members += seg.segment_size(s); });
  ProbedLists fresh;
  seg.for_each_scanned(last, fresh, [&](int64_t s) { fresh_members += seg.segment_size(s); });
  EXPECT_EQ(members, fresh_members);
  EXPECT_EQ(members, seg.list_size(C - 1));  // alone, a list scans all of its members
  using Offsets = std::vector<int64_t>;
  using Lists = std::vector<int32_t>;
  expect_error([&] { ListSegments(Offsets{0, 0}, Lists{}, C); }, "expert 0 is in no list");
  expect_error([&] { ListSegments(Offsets{0, 2}, Lists{3, 3}, C); }, "expert 0 is in list 3 twice");
  expect_error([&] { ListSegments(Offsets{0, 1}, Lists{C}, C); }, "outside [0, 20)");
  expect_error([&] { ListSegments(Offsets{0, 2}, Lists{1}, C); }, "offsets must run from 0");
  // Offsets that overshoot and come back (a hostile saved state): refused
  // before the entries past the end are read.
  expect_error(
      [&] {
        ListSegments(Offsets{0, 5, 2}, Lists{1, 2}, C);
      },
      "expert 0's lists end at entry 5, past the 2 entries");
}

}  // namespace
}  // namespace airmoe
