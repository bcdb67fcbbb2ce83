// Recall of AIR on the generator's data at a reduced shape: it rises with the
// probe count, and the adaptive codebook update recovers it after the expert
// centers drift.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "test_util.h"

namespace airmoe {
namespace {

SyntheticConfig reduced(const std::string& preset) {
  SyntheticConfig cfg = synthetic_preset(preset);
  cfg.experts = 8192;
  cfg.dim = 64;
  cfg.tokens = 256;
  return cfg;
}

TEST(Recall, RisesWithTheProbeCount) {
  for (const char* preset : {"default", "hard"}) {
    SCOPED_TRACE(preset);
    const SyntheticData data = make_synthetic(reduced(preset));
    const AirRouter air(data.centers.view(), AirConfig{64, 6, 1234, 0});
    const Routes exact = DenseRouter(data.centers.view()).route(data.tokens.view(), 8);
    double previous = 0.0;
    std::vector<double> recalls;
    for (const int m : {1, 2, 4, 8, 16, 64}) {
      const Routes r = air.route(data.tokens.view(), 8, m);
      const double recall = recall_at_k(r, exact);
      const double mass = mass_recall(r, exact);
      recalls.push_back(recall);
      EXPECT_GE(recall, previous) << "m=" << m;
      EXPECT_GE(mass, 0.0);
      EXPECT_LE(mass, 1.0 + 1e-9);
      EXPECT_LE(mass_recall(air.route(data.tokens.view(), 8, std::max(1, m / 2)), exact),
                mass + 1e-12)
          << "mass recall must not fall as m grows (m=" << m << ")";
      previous = recall;
    }
    EXPECT_GT(recalls[4], recalls[0]) << "16 probes must beat 1";
    EXPECT_DOUBLE_EQ(recalls.back(), 1.0) << "m = C is exact";
    ::testing::Test::RecordProperty(std::string("recall_m1_") + preset, std::to_string(recalls[0]));
  }
}

// A rotation close to the identity: Gram-Schmidt of I + theta G / sqrt(d).
Matrix near_rotation(int64_t d, double theta, uint64_t seed) {
  const Matrix g = random_matrix(d, d, theta / std::sqrt(static_cast<double>(d)), seed);
  std::vector<double> q(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) q[i * d + j] = (i == j ? 1.0 : 0.0) + g(i, j);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t p = 0; p < i; ++p) {
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += q[i * d + j] * q[p * d + j];
      for (int64_t j = 0; j < d; ++j) q[i * d + j] -= dot * q[p * d + j];
    }
    double n2 = 0.0;
    for (int64_t j = 0; j < d; ++j) n2 += q[i * d + j] * q[i * d + j];
    for (int64_t j = 0; j < d; ++j) q[i * d + j] /= std::sqrt(n2);
  }
  Matrix out(d, d);
  for (int64_t i = 0; i < d * d; ++i) out.data()[i] = static_cast<float>(q[i]);
  return out;
}

// rows x R^T, in double.
Matrix rotate(const Matrix& rows, const Matrix& r) {
  const int64_t d = rows.cols();
  Matrix out(rows.rows(), d);
  for (int64_t i = 0; i < rows.rows(); ++i)
    for (int64_t a = 0; a < d; ++a)
      out(i, a) = static_cast<float>(test::dot_double(rows.row(i), r.row(a), d));
  return out;
}

// The experts (and the tokens with them) drift: the whole space rotates by
// a moderate angle, so the stale codebook no longer fits the centers (lists
// are rebuilt against it by set_centers). One probe: the setting where list
// quality matters most.
struct Drift {
  SyntheticConfig cfg = reduced("default");
  SyntheticData data = make_synthetic(cfg);
  Matrix rot = near_rotation(cfg.dim, 1.0, 77);
  Matrix centers2 = rotate(data.centers, rot);
  Matrix tokens2 = rotate(data.tokens, rot);
  Routes exact2 = DenseRouter(centers2.view()).route(tokens2.view(), 8);
};

TEST(Recall, CodebookUpdateRecoversAfterDrift) {
  const Drift drift;
  const int k = 8, m = 1;
  AirRouter air(drift.data.centers.view(), AirConfig{64, 10, 1234, 0});
  const Routes exact = DenseRouter(drift.data.centers.view()).route(drift.data.tokens.view(), k);
  const double before = recall_at_k(air.route(drift.data.tokens.view(), k, m), exact);
  // The rotation keeps every inner product: the exact routes hardly change.
  EXPECT_GE(recall_at_k(drift.exact2, exact), 0.99);

  air.set_centers(drift.centers2.view());
  const double stale = recall_at_k(air.route(drift.tokens2.view(), k, m), drift.exact2);
  EXPECT_LT(stale, before - 0.05) << "the drift must hurt for this test to mean anything";

  std::vector<double> adapted;
  for (int call = 0; call < 8; ++call) {
    air.update_codebook();
    adapted.push_back(recall_at_k(air.route(drift.tokens2.view(), k, m), drift.exact2));
  }
  EXPECT_GT(adapted.front(), stale + 0.05) << "one update must already help";
  EXPECT_GE(adapted.back(), before - 0.01) << "before " << before << ", stale " << stale;
  RecordProperty("recall_before", std::to_string(before));
  RecordProperty("recall_stale", std::to_string(stale));
  RecordProperty("recall_adapted", std::to_string(adapted.back()));
}

// Partial (EMA) steps also recover, more slowly than full Lloyd steps.
TEST(Recall, PartialUpdateStepsAlsoRecover) {
  const Drift drift;
  AirRouter air(drift.data.centers.view(), AirConfig{64, 10, 1234, 0});
  const Routes exact = DenseRouter(drift.data.centers.view()).route(drift.data.tokens.view(), 8);
  const double before = recall_at_k(air.route(drift.data.tokens.view(), 8, 1), exact);
  air.set_centers(drift.centers2.view());
  const double stale = recall_at_k(air.route(drift.tokens2.view(), 8, 1), drift.exact2);
  air.update_codebook(0.5, 1);
  const double one = recall_at_k(air.route(drift.tokens2.view(), 8, 1), drift.exact2);
  air.update_codebook(0.5, 9);
  const double ten = recall_at_k(air.route(drift.tokens2.view(), 8, 1), drift.exact2);
  EXPECT_GT(one, stale + 0.05);
  EXPECT_GE(ten, before - 0.01) << "before " << before << ", stale " << stale;
}

}  // namespace
}  // namespace airmoe
