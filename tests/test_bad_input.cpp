// Bad input is refused with an std::invalid_argument whose message names the
// problem (and, for non-finite values, the row).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "core/checks.h"
#include "core/synthetic.h"
#include "core/threads.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/product_key_router.h"
#include "test_util.h"

namespace airmoe {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

class BadInput : public ::testing::Test {
 protected:
  static constexpr int64_t E = 40, d = 6, T = 5, C = 4;
  Matrix centers = random_matrix(E, d, 1.0, 1);
  Matrix tokens = random_matrix(T, d, 1.0, 2);
};

TEST_F(BadInput, TokenWidthMustMatch) {
  const Matrix wide = random_matrix(T, d + 1, 1.0, 3);
  const DenseRouter dense(centers.view());
  const AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  const Matrix k1 = random_matrix(7, 3, 1.0, 4), k2 = random_matrix(7, 3, 1.0, 5);
  const ProductKeyRouter pk(k1.view(), k2.view());
  AIRMOE_EXPECT_THROW_MSG(dense.route(wide.view(), 2), std::invalid_argument,
                          "tokens has 7 columns, expected 6");
  AIRMOE_EXPECT_THROW_MSG(air.route(wide.view(), 2, 1), std::invalid_argument,
                          "tokens has 7 columns, expected 6");
  AIRMOE_EXPECT_THROW_MSG(pk.route(wide.view(), 2), std::invalid_argument,
                          "tokens has 7 columns, expected 6");
  // backward too.
  const Routes r = dense.route(tokens.view(), 2);
  const Matrix dg(T, 2, 1.0f);
  AIRMOE_EXPECT_THROW_MSG(dense.backward(wide.view(), r, dg.view()), std::invalid_argument,
                          "tokens has 7 columns");
  AIRMOE_EXPECT_THROW_MSG(air.backward(wide.view(), r, dg.view()), std::invalid_argument,
                          "tokens has 7 columns");
  AIRMOE_EXPECT_THROW_MSG(pk.backward(wide.view(), pk.route(tokens.view(), 2), dg.view()),
                          std::invalid_argument, "tokens has 7 columns");
  // A codebook of the wrong dimension.
  const Matrix words = random_matrix(3, d + 2, 1.0, 6);
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), Codebook(words.view())), std::invalid_argument,
                          "centers has 6 columns, expected 8");
}

TEST_F(BadInput, KMustBeBetweenOneAndE) {
  const DenseRouter dense(centers.view());
  const AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  const Matrix k1 = random_matrix(6, 3, 1.0, 4), k2 = random_matrix(6, 3, 1.0, 5);
  const ProductKeyRouter pk(k1.view(), k2.view());
  for (const int k : {0, -3}) {
    AIRMOE_EXPECT_THROW_MSG(dense.route(tokens.view(), k), std::invalid_argument,
                            "k = " + std::to_string(k) + " is outside [1, 40]");
    AIRMOE_EXPECT_THROW_MSG(air.route(tokens.view(), k, 1), std::invalid_argument,
                            "k = " + std::to_string(k) + " is outside [1, 40]");
    AIRMOE_EXPECT_THROW_MSG(pk.route(tokens.view(), k), std::invalid_argument,
                            "k = " + std::to_string(k) + " is outside [1, 36]");
  }
  AIRMOE_EXPECT_THROW_MSG(dense.route(tokens.view(), 41), std::invalid_argument, "k = 41");
  AIRMOE_EXPECT_THROW_MSG(air.route(tokens.view(), 41, 1), std::invalid_argument, "k = 41");
  AIRMOE_EXPECT_THROW_MSG(pk.route(tokens.view(), 37), std::invalid_argument, "k = 37");
  EXPECT_NO_THROW(dense.route(tokens.view(), 40));
  EXPECT_NO_THROW(air.route(tokens.view(), 40, 1));
  EXPECT_NO_THROW(pk.route(tokens.view(), 36));
}

TEST_F(BadInput, ProbesMustBeBetweenOneAndC) {
  const AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  AIRMOE_EXPECT_THROW_MSG(air.route(tokens.view(), 2, 0), std::invalid_argument,
                          "probes m = 0 is outside [1, 4]");
  AIRMOE_EXPECT_THROW_MSG(air.route(tokens.view(), 2, 5), std::invalid_argument,
                          "probes m = 5 is outside [1, 4]");
  EXPECT_NO_THROW(air.route(tokens.view(), 2, 4));
}

TEST_F(BadInput, CodewordsMustNotExceedExperts) {
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), AirConfig{E + 1, 2, 1, 0}),
                          std::invalid_argument, "C = 41");
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), AirConfig{0, 2, 1, 0}), std::invalid_argument,
                          "C = 0");
  // A given codebook larger than E.
  const Matrix few = random_matrix(3, d, 1.0, 7);
  const Matrix words = random_matrix(4, d, 1.0, 8);
  AIRMOE_EXPECT_THROW_MSG(AirRouter(few.view(), Codebook(words.view())), std::invalid_argument,
                          "C = 4 exceeds E = 3");
  // Also when set_centers shrinks E below C.
  AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  AIRMOE_EXPECT_THROW_MSG(air.set_centers(few.view()), std::invalid_argument, "exceeds E = 3");
  // A negative list cap, and a cap too small to hold every expert.
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), AirConfig{C, 2, 1, -1}), std::invalid_argument,
                          "list cap");
  AIRMOE_EXPECT_THROW_MSG(AirRouter(centers.view(), AirConfig{C, 2, 1, E / C - 1}),
                          std::invalid_argument, "cannot hold");
}

TEST_F(BadInput, NonFiniteTokensNameTheRow) {
  const DenseRouter dense(centers.view());
  const AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  const Matrix k1 = random_matrix(6, 3, 1.0, 4), k2 = random_matrix(6, 3, 1.0, 5);
  const ProductKeyRouter pk(k1.view(), k2.view());
  for (const float bad : {kNaN, kInf, -kInf}) {
    Matrix t = tokens;
    t(3, 2) = bad;
    t(4, 0) = bad;  // only the first bad entry is reported
    const std::string what = std::isnan(bad) ? "tokens row 3 column 2 is nan"
                             : bad > 0       ? "tokens row 3 column 2 is +inf"
                                             : "tokens row 3 column 2 is -inf";
    AIRMOE_EXPECT_THROW_MSG(dense.route(t.view(), 2), std::invalid_argument, what);
    AIRMOE_EXPECT_THROW_MSG(air.route(t.view(), 2, 1), std::invalid_argument, what);
    AIRMOE_EXPECT_THROW_MSG(pk.route(t.view(), 2), std::invalid_argument, what);
  }
}

TEST_F(BadInput, NonFiniteCentersNameTheRow) {
  for (const float bad : {kNaN, kInf}) {
    Matrix c = centers;
    c(17, 5) = bad;
    AIRMOE_EXPECT_THROW_MSG(DenseRouter(c.view()), std::invalid_argument,
                            "centers row 17 column 5");
    AIRMOE_EXPECT_THROW_MSG(AirRouter(c.view(), AirConfig{C, 2, 1, 0}), std::invalid_argument,
                            "centers row 17 column 5");
    AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
    AIRMOE_EXPECT_THROW_MSG(air.set_centers(c.view()), std::invalid_argument,
                            "centers row 17 column 5");
    Matrix k1 = random_matrix(6, 3, 1.0, 4), k2 = random_matrix(6, 3, 1.0, 5);
    k2(2, 1) = bad;
    AIRMOE_EXPECT_THROW_MSG(ProductKeyRouter(k1.view(), k2.view()), std::invalid_argument,
                            "keys2 row 2 column 1");
    Matrix words = random_matrix(3, d, 1.0, 6);
    words(1, 0) = bad;
    AIRMOE_EXPECT_THROW_MSG(Codebook(words.view()), std::invalid_argument,
                            "codewords row 1 column 0");
  }
}

TEST_F(BadInput, ZeroNormCenterIsRefused) {
  Matrix c = centers;
  std::fill_n(c.row(9), d, 0.0f);
  AIRMOE_EXPECT_THROW_MSG(AirRouter(c.view(), AirConfig{C, 2, 1, 0}), std::invalid_argument,
                          "centers row 9 has zero norm");
  AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  AIRMOE_EXPECT_THROW_MSG(air.set_centers(c.view()), std::invalid_argument,
                          "centers row 9 has zero norm");
  Matrix words = random_matrix(3, d, 1.0, 6);
  std::fill_n(words.row(2), d, 0.0f);
  AIRMOE_EXPECT_THROW_MSG(Codebook(words.view()), std::invalid_argument,
                          "codewords row 2 has zero norm");
  // A failed set_centers leaves the router as it was.
  const Routes r = air.route(tokens.view(), 3, static_cast<int>(C));
  EXPECT_EQ(r.experts, DenseRouter(centers.view()).route(tokens.view(), 3).experts);
}

TEST_F(BadInput, GateGradientsOfTheWrongShape) {
  const DenseRouter dense(centers.view());
  const AirRouter air(centers.view(), AirConfig{C, 2, 1, 0});
  const Matrix k1 = random_matrix(6, 3, 1.0, 4), k2 = random_matrix(6, 3, 1.0, 5);
  const ProductKeyRouter pk(k1.view(), k2.view());
  const Routes rd = dense.route(tokens.view(), 3);
  const Routes ra = air.route(tokens.view(), 3, 2, GateMode::kShortlist);
  const Routes rp = pk.route(tokens.view(), 3);
  for (const auto& [rows, cols] : {std::pair{T, 2}, std::pair{T - 1, 3}, std::pair{T + 1, 3}}) {
    const Matrix dg(rows, cols, 1.0f);
    const std::string what =
        "d_gates is [" + std::to_string(rows) + ", " + std::to_string(cols) + "], expected [5, 3]";
    AIRMOE_EXPECT_THROW_MSG(dense.backward(tokens.view(), rd, dg.view()), std::invalid_argument,
                            what);
    AIRMOE_EXPECT_THROW_MSG(air.backward(tokens.view(), ra, dg.view()), std::invalid_argument,
                            what);
    AIRMOE_EXPECT_THROW_MSG(pk.backward(tokens.view(), rp, dg.view()), std::invalid_argument, what);
  }
  // Non-finite upstream gradients.
  Matrix dg(T, 3, 1.0f);
  dg(2, 1) = kNaN;
  AIRMOE_EXPECT_THROW_MSG(dense.backward(tokens.view(), rd, dg.view()), std::invalid_argument,
                          "d_gates row 2 column 1 is nan");
  AIRMOE_EXPECT_THROW_MSG(pk.backward(tokens.view(), rp, dg.view()), std::invalid_argument,
                          "d_gates row 2");
  // Tokens of another batch than the routes.
  const Matrix fewer = random_matrix(T - 1, d, 1.0, 9);
  const Matrix ok(T, 3, 1.0f);
  AIRMOE_EXPECT_THROW_MSG(dense.backward(fewer.view(), rd, ok.view()), std::invalid_argument,
                          "tokens has 4 rows but the routes hold 5");
  // Shortlist gradients need the probes, which dense routes lack.
  const Routes rds = dense.route(tokens.view(), 3, GateMode::kShortlist);
  AIRMOE_EXPECT_THROW_MSG(air.backward(tokens.view(), rds, ok.view()), std::invalid_argument,
                          "probes");
  // Product keys have no shortlist gates.
  AIRMOE_EXPECT_THROW_MSG(pk.backward(tokens.view(), ra, ok.view()), std::invalid_argument,
                          "chosen");
}

TEST_F(BadInput, BadRouterShapes) {
  const Matrix empty(0, d);
  AIRMOE_EXPECT_THROW_MSG(DenseRouter(empty.view()), std::invalid_argument, "E >= 1");
  AIRMOE_EXPECT_THROW_MSG(AirRouter(empty.view(), AirConfig{1, 2, 1, 0}), std::invalid_argument,
                          "no expert centers");
  const Matrix k1 = random_matrix(6, 3, 1.0, 4), k2 = random_matrix(5, 3, 1.0, 5);
  AIRMOE_EXPECT_THROW_MSG(ProductKeyRouter(k1.view(), k2.view()), std::invalid_argument, "same n");
  const Matrix k3 = random_matrix(6, 5, 1.0, 5);
  AIRMOE_EXPECT_THROW_MSG(ProductKeyRouter(k1.view(), k3.view()), std::invalid_argument,
                          "half widths 3 and 5");
  const Matrix k4 = random_matrix(6, 2, 1.0, 5);
  AIRMOE_EXPECT_THROW_MSG(ProductKeyRouter(k1.view(), k4.view()), std::invalid_argument,
                          "half widths 3 and 2");
  const Matrix k5 = random_matrix(6, 4, 1.0, 5);
  EXPECT_NO_THROW(ProductKeyRouter(k1.view(), k5.view()));  // d = 7: 3 + 4
}

TEST(BadInputMisc, NoTokensIsValidForEveryRouter) {
  const Matrix centers = random_matrix(16, 4, 1.0, 1);
  const Matrix none(0, 4);
  EXPECT_EQ(DenseRouter(centers.view()).route(none.view(), 16).tokens, 0);
  EXPECT_EQ(AirRouter(centers.view(), AirConfig{4, 2, 1, 0}).route(none.view(), 16, 4).tokens, 0);
  const Matrix k1 = random_matrix(4, 2, 1.0, 4), k2 = random_matrix(4, 2, 1.0, 5);
  EXPECT_EQ(ProductKeyRouter(k1.view(), k2.view()).route(none.view(), 16).tokens, 0);
  // The argument checks still apply to an empty batch.
  const Matrix none_wide(0, 5);
  AIRMOE_EXPECT_THROW_MSG(DenseRouter(centers.view()).route(none_wide.view(), 2),
                          std::invalid_argument, "tokens has 5 columns");
  AIRMOE_EXPECT_THROW_MSG(DenseRouter(centers.view()).route(none.view(), 17), std::invalid_argument,
                          "k = 17");
}

TEST(BadInputMisc, ThreadCountMustBePositive) {
  test::ThreadGuard guard;
  AIRMOE_EXPECT_THROW_MSG(set_num_threads(0), std::invalid_argument, "n must be >= 1, got 0");
  AIRMOE_EXPECT_THROW_MSG(set_num_threads(-2), std::invalid_argument, "got -2");
  set_num_threads(1);
  EXPECT_EQ(num_threads(), 1);
}

TEST(BadInputMisc, NamesAreChecked) {
  EXPECT_EQ(gate_mode_from_string("chosen"), GateMode::kChosen);
  EXPECT_EQ(gate_mode_from_string("shortlist"), GateMode::kShortlist);
  EXPECT_STREQ(to_string(GateMode::kChosen), "chosen");
  EXPECT_STREQ(to_string(GateMode::kShortlist), "shortlist");
  AIRMOE_EXPECT_THROW_MSG(gate_mode_from_string("softmax"), std::invalid_argument,
                          "gate mode 'softmax' is unknown");
  AIRMOE_EXPECT_THROW_MSG(synthetic_preset("easy"), std::invalid_argument,
                          "synthetic preset 'easy' is unknown");
  EXPECT_EQ(synthetic_preset("hard").clusters, 16);
  SyntheticConfig cfg;
  cfg.experts = 0;
  AIRMOE_EXPECT_THROW_MSG(make_synthetic(cfg), std::invalid_argument, "experts >= 1");
}

TEST(BadInputMisc, CheckHelpers) {
  const Matrix m(2, 3, 1.0f);
  AIRMOE_EXPECT_THROW_MSG(require_cols(m.view(), 4, "thing"), std::invalid_argument,
                          "thing has 3 columns, expected 4");
  AIRMOE_EXPECT_THROW_MSG(require_in_range(9, 1, 8, "knob"), std::invalid_argument,
                          "knob = 9 is outside [1, 8]");
  EXPECT_NO_THROW(require_in_range(8, 1, 8, "knob"));
  EXPECT_NO_THROW(require_finite(m.view(), "m"));
}

}  // namespace
}  // namespace airmoe
