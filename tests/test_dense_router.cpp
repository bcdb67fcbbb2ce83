// DenseRouter against a naive double-precision reference; ties; determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "router/dense_router.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::expect_matches_reference;
using test::reference_dense;
using test::row_view;

struct Case {
  int64_t E, d, T;
  int k;
  uint64_t seed;
};

std::string describe(const Case& c) {
  return "E=" + std::to_string(c.E) + " d=" + std::to_string(c.d) + " T=" + std::to_string(c.T) +
         " k=" + std::to_string(c.k) + " seed=" + std::to_string(c.seed);
}

// Gaussian data: the gaps between consecutive top logits are ~1e-2 of their
// scale, far above float rounding (~1e-7), so the float and double rankings
// agree on the top k.
TEST(DenseRouter, MatchesDoubleReference) {
  for (const Case c : {Case{997, 33, 40, 8, 1}, Case{997, 1, 30, 3, 2}, Case{500, 64, 25, 1, 3},
                       Case{5, 7, 12, 5, 4}, Case{129, 17, 20, 16, 5}, Case{64, 256, 10, 2, 6}}) {
    SCOPED_TRACE(describe(c));
    const Matrix centers = random_matrix(c.E, c.d, 1.0, c.seed);
    const Matrix tokens = random_matrix(c.T, c.d, 1.5, c.seed + 1000);
    const DenseRouter dense(centers.view());
    EXPECT_EQ(dense.experts(), c.E);
    EXPECT_EQ(dense.dim(), c.d);
    for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
      SCOPED_TRACE(to_string(mode));
      const Routes r = dense.route(tokens.view(), c.k, mode);
      EXPECT_EQ(r.gate_mode, mode);
      expect_matches_reference(r, reference_dense(tokens.view(), centers.view(), c.k, mode), 1e-5);
      ASSERT_EQ(r.shortlist_size.size(), static_cast<size_t>(c.T));
      for (int32_t s : r.shortlist_size) EXPECT_EQ(s, c.E);
      // Logits are the scores of the chosen experts, best first.
      for (int64_t t = 0; t < c.T; ++t)
        for (int j = 0; j < c.k; ++j) {
          const float z = r.logits[t * c.k + j];
          EXPECT_NEAR(z, test::dot_double(tokens.row(t), centers.row(r.experts_of(t)[j]), c.d),
                      1e-5 * (1.0 + std::fabs(z)));
          if (j > 0) {
            EXPECT_GE(r.logits[t * c.k + j - 1], z);
          }
        }
      // kChosen gates sum to one.
      if (mode == GateMode::kChosen)
        for (int64_t t = 0; t < c.T; ++t) {
          double s = 0.0;
          for (int j = 0; j < c.k; ++j) s += r.gates_of(t)[j];
          EXPECT_NEAR(s, 1.0, 1e-5);
        }
    }
  }
}

// Two experts with identical rows have identical logits: the lower id comes
// first, and both are chosen when they are the best.
TEST(DenseRouter, TiesGoToTheLowerExpertId) {
  const int64_t E = 50, d = 12;
  Matrix centers = random_matrix(E, d, 0.1, 8);
  const Matrix tokens = random_matrix(6, d, 1.0, 9);
  for (int64_t t = 0; t < tokens.rows(); ++t) {
    // Rows 40 and 7 (in that id order: 7 < 40) both point along token t.
    Matrix c = centers;
    for (int64_t j = 0; j < d; ++j) c(7, j) = c(40, j) = tokens(t, j);
    const DenseRouter dense(c.view());
    for (const int k : {1, 2, 5}) {
      const Routes r = dense.route(row_view(tokens.view(), t), k);
      EXPECT_EQ(r.experts_of(0)[0], 7);
      if (k >= 2) {
        EXPECT_EQ(r.experts_of(0)[1], 40);
        EXPECT_EQ(r.logits[0], r.logits[1]);
        EXPECT_EQ(r.gates[0], r.gates[1]);
      }
    }
  }
  // All experts identical: the order is by id.
  Matrix same(9, 3, 0.5f);
  const DenseRouter dense(same.view());
  const Matrix one = random_matrix(1, 3, 1.0, 2);
  const Routes r = dense.route(one.view(), 9);
  for (int j = 0; j < 9; ++j) {
    EXPECT_EQ(r.experts[j], j);
    EXPECT_FLOAT_EQ(r.gates[j], 1.0f / 9.0f);
  }
}

TEST(DenseRouter, NoTokensGiveEmptyRoutes) {
  const Matrix centers = random_matrix(20, 4, 1.0, 1);
  const DenseRouter dense(centers.view());
  const Matrix none(0, 4);
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    const Routes r = dense.route(none.view(), 3, mode);
    EXPECT_EQ(r.tokens, 0);
    EXPECT_EQ(r.k, 3);
    EXPECT_TRUE(r.experts.empty());
    EXPECT_TRUE(r.gates.empty());
    EXPECT_TRUE(r.shortlist_size.empty());
    const Matrix dg(0, 3);
    const RouterGradients g = dense.backward(none.view(), r, dg.view());
    EXPECT_EQ(g.d_tokens.rows(), 0);
    EXPECT_TRUE(g.d_centers.rows.empty());
  }
}

void expect_same_routes(const Routes& a, const Routes& b) {
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.k, b.k);
  EXPECT_EQ(a.experts, b.experts);
  EXPECT_EQ(a.gates, b.gates);
  EXPECT_EQ(a.logits, b.logits);
  EXPECT_EQ(a.log_normalizer, b.log_normalizer);
  EXPECT_EQ(a.shortlist_size, b.shortlist_size);
}

// Sized past the kernel's threading threshold and the gate finalization's.
TEST(DenseRouter, SameResultWithOneAndTwoThreads) {
  test::ThreadGuard guard;
  const Matrix centers = random_matrix(2000, 64, 1.0, 21);
  const Matrix tokens = random_matrix(300, 64, 1.0, 22);
  const DenseRouter dense(centers.view());
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    set_num_threads(1);
    EXPECT_EQ(num_threads(), 1);
    const Routes one = dense.route(tokens.view(), 8, mode);
    Matrix dg = random_matrix(300, 8, 1.0, 23);
    const RouterGradients g1 = dense.backward(tokens.view(), one, dg.view());
    set_num_threads(2);
    EXPECT_EQ(num_threads(), 2);
    const Routes two = dense.route(tokens.view(), 8, mode);
    expect_same_routes(one, two);
    const RouterGradients g2 = dense.backward(tokens.view(), two, dg.view());
    EXPECT_EQ(test::values(g1.d_tokens), test::values(g2.d_tokens));
    EXPECT_EQ(g1.d_centers.rows, g2.d_centers.rows);
    EXPECT_EQ(test::values(g1.d_centers.values), test::values(g2.d_centers.values));
  }
}

TEST(DenseRouter, TokenAloneRoutesAsInABatch) {
  const Matrix centers = random_matrix(1500, 40, 1.0, 31);
  const Matrix tokens = random_matrix(200, 40, 1.0, 32);
  const DenseRouter dense(centers.view());
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist}) {
    const Routes batch = dense.route(tokens.view(), 4, mode);
    for (const int64_t t : {0, 1, 57, 128, 199}) {
      const Routes alone = dense.route(row_view(tokens.view(), t), 4, mode);
      for (int j = 0; j < 4; ++j) {
        EXPECT_EQ(alone.experts[j], batch.experts_of(t)[j]) << "token " << t;
        EXPECT_EQ(alone.gates[j], batch.gates_of(t)[j]) << "token " << t;
      }
      EXPECT_EQ(alone.log_normalizer[0], batch.log_normalizer[t]);
    }
  }
}

}  // namespace
}  // namespace airmoe
