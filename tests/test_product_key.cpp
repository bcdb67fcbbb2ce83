// ProductKeyRouter against a double-precision reference over all n^2 pairs.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/synthetic.h"
#include "router/product_key_router.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::dot_double;
using test::row_view;

test::RefRoutes reference_pk(MatrixView tokens, MatrixView k1, MatrixView k2, int k) {
  const int64_t n = k1.rows, d1 = k1.cols, d2 = k2.cols;
  return test::reference_routes(tokens.rows, n * n, k, GateMode::kChosen, [&](int64_t t) {
    std::vector<double> z(static_cast<size_t>(n * n));
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = 0; b < n; ++b)
        z[a * n + b] = dot_double(tokens.row(t), k1.row(a), d1) +
                       dot_double(tokens.row(t) + d1, k2.row(b), d2);
    return z;
  });
}

TEST(ProductKeyRouter, MatchesDoubleReference) {
  struct Case {
    int64_t n, d, T;
    int k;
    uint64_t seed;
  };
  for (const Case c : {Case{16, 10, 40, 8, 1}, Case{16, 11, 40, 4, 2}, Case{31, 2, 30, 1, 3},
                       Case{5, 9, 20, 25, 4}, Case{3, 6, 10, 7, 5}, Case{64, 32, 25, 16, 6}}) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " d=" + std::to_string(c.d) +
                 " k=" + std::to_string(c.k));
    const int64_t d1 = c.d / 2, d2 = c.d - d1;
    const Matrix k1 = random_matrix(c.n, d1, 1.0, c.seed);
    const Matrix k2 = random_matrix(c.n, d2, 1.0, c.seed + 100);
    const Matrix tokens = random_matrix(c.T, c.d, 1.0, c.seed + 200);
    const ProductKeyRouter pk(k1.view(), k2.view());
    EXPECT_EQ(pk.experts(), c.n * c.n);
    EXPECT_EQ(pk.dim(), c.d);
    EXPECT_EQ(pk.half_dim(), d1);
    const Routes r = pk.route(tokens.view(), c.k);
    EXPECT_EQ(r.gate_mode, GateMode::kChosen);
    test::expect_matches_reference(r, reference_pk(tokens.view(), k1.view(), k2.view(), c.k), 1e-5);
    const int64_t kh = std::min<int64_t>(c.k, c.n);
    for (int32_t s : r.shortlist_size) EXPECT_EQ(s, kh * kh);
  }
}

// Duplicate sub-key rows give pairs with identical logits: lower id first.
TEST(ProductKeyRouter, TiesGoToTheLowerExpertId) {
  const int64_t n = 8, d = 8;
  const Matrix token = random_matrix(1, d, 1.0, 3);
  Matrix k1 = random_matrix(n, d / 2, 0.05, 4);
  Matrix k2 = random_matrix(n, d / 2, 0.05, 5);
  // Sub-keys 2 and 6 of the first half are the same, best-aligned row; the
  // second half's best is sub-key 5.
  for (int64_t j = 0; j < d / 2; ++j) {
    k1(2, j) = k1(6, j) = token(0, j);
    k2(5, j) = token(0, d / 2 + j);
  }
  const ProductKeyRouter pk(k1.view(), k2.view());
  for (const int k : {1, 2, 3}) {
    const Routes r = pk.route(token.view(), k);
    EXPECT_EQ(r.experts[0], 2 * n + 5);
    if (k >= 2) {
      EXPECT_EQ(r.experts[1], 6 * n + 5);
      EXPECT_EQ(r.logits[0], r.logits[1]);
    }
  }
  // Both halves duplicated: four tied pairs in id order.
  for (int64_t j = 0; j < d / 2; ++j) k2(1, j) = k2(5, j);
  const ProductKeyRouter pk2(k1.view(), k2.view());
  const Routes r = pk2.route(token.view(), 4);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{2 * n + 1, 2 * n + 5, 6 * n + 1, 6 * n + 5}));
  for (int j = 1; j < 4; ++j) EXPECT_EQ(r.gates[j], r.gates[0]);
}

TEST(ProductKeyRouter, NoTokensGiveEmptyRoutes) {
  const Matrix k1 = random_matrix(4, 3, 1.0, 1), k2 = random_matrix(4, 3, 1.0, 2);
  const ProductKeyRouter pk(k1.view(), k2.view());
  const Matrix none(0, 6);
  const Routes r = pk.route(none.view(), 5);
  EXPECT_EQ(r.tokens, 0);
  EXPECT_TRUE(r.experts.empty());
  EXPECT_TRUE(r.gates.empty());
  const Matrix dg(0, 5);
  const ProductKeyGradients g = pk.backward(none.view(), r, dg.view());
  EXPECT_EQ(g.d_tokens.rows(), 0);
  EXPECT_TRUE(g.d_keys1.rows.empty());
  EXPECT_TRUE(g.d_keys2.rows.empty());
}

TEST(ProductKeyRouter, DeterministicAcrossThreadsAndBatches) {
  test::ThreadGuard guard;
  const int64_t n = 100, d = 64, T = 1100;  // two token blocks of the router
  const Matrix k1 = random_matrix(n, d / 2, 1.0, 11), k2 = random_matrix(n, d / 2, 1.0, 12);
  const Matrix tokens = random_matrix(T, d, 1.0, 13);
  const ProductKeyRouter pk(k1.view(), k2.view());
  const Matrix dg = random_matrix(T, 8, 1.0, 14);
  set_num_threads(1);
  const Routes one = pk.route(tokens.view(), 8);
  const ProductKeyGradients g1 = pk.backward(tokens.view(), one, dg.view());
  set_num_threads(2);
  const Routes two = pk.route(tokens.view(), 8);
  const ProductKeyGradients g2 = pk.backward(tokens.view(), two, dg.view());
  EXPECT_EQ(one.experts, two.experts);
  EXPECT_EQ(one.gates, two.gates);
  EXPECT_EQ(test::values(g1.d_tokens), test::values(g2.d_tokens));
  EXPECT_EQ(g1.d_keys1.rows, g2.d_keys1.rows);
  EXPECT_EQ(test::values(g1.d_keys1.values), test::values(g2.d_keys1.values));
  EXPECT_EQ(test::values(g1.d_keys2.values), test::values(g2.d_keys2.values));
  for (const int64_t t : {0, 500, 1023, 1024, 1099}) {
    const Routes alone = pk.route(row_view(tokens.view(), t), 8);
    for (int j = 0; j < 8; ++j) {
      EXPECT_EQ(alone.experts[j], one.experts_of(t)[j]) << "token " << t;
      EXPECT_EQ(alone.gates[j], one.gates_of(t)[j]) << "token " << t;
    }
  }
}

TEST(ProductKeyRouter, FlopsPerToken) {
  const Matrix k1 = random_matrix(10, 4, 1.0, 1), k2 = random_matrix(10, 5, 1.0, 2);
  const ProductKeyRouter pk(k1.view(), k2.view());
  EXPECT_EQ(pk.subkeys(), 10);
  EXPECT_EQ(pk.dim(), 9);
  EXPECT_DOUBLE_EQ(pk.flops_per_token(8), 2.0 * 10 * 9 + 64.0);
}

}  // namespace
}  // namespace airmoe
