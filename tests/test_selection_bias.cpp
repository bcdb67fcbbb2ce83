// The selection bias (DeepSeek-V3's auxiliary-loss-free balancing) and the
// sigmoid gate mode in every single-process router, on every backend:
// experts are selected by z + b, gates formed from the unbiased z; biased AIR
// with every list probed is biased dense routing, bit for bit; a bias can
// force an expert in or out; bad biases are refused by name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "backend_params.h"
#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/product_key_router.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::clustered_data;

// A bias on the scale of the logits' spread, so that it moves routes.
std::vector<float> random_bias(int64_t E, double scale, uint64_t seed) {
  const Matrix b = random_matrix(E, 1, scale, seed);
  return std::vector<float>(b.data(), b.data() + E);
}

// Double-precision routing: select by z + b, gates from z (chosen, over all
// E for kShortlist, or renormalized sigmoids).
struct Reference {
  std::vector<int32_t> experts;
  std::vector<double> gates;
  std::vector<double> margin;  // per token: gap between the k-th and (k+1)-th selection score
};

Reference reference(MatrixView centers, MatrixView tokens, const std::vector<float>& bias, int k,
                    GateMode mode) {
  Reference r;
  const int64_t E = centers.rows;
  for (int64_t t = 0; t < tokens.rows; ++t) {
    std::vector<double> z(E), s(E);
    for (int64_t e = 0; e < E; ++e) {
      z[e] = test::dot_double(tokens.data + t * tokens.cols, centers.data + e * centers.cols,
                              centers.cols);
      s[e] = z[e] + bias[e];
    }
    const std::vector<int32_t> order = test::rank_desc(s);
    r.margin.push_back(k < E ? s[order[k - 1]] - s[order[k]] : 1.0);
    const auto u = [&](int32_t e) {
      return mode == GateMode::kSigmoid ? -std::log1p(std::exp(-z[e])) : z[e];
    };
    double den = 0.0;
    if (mode == GateMode::kShortlist) {
      for (int64_t e = 0; e < E; ++e) den += std::exp(z[e]);
    } else {
      for (int j = 0; j < k; ++j) den += std::exp(u(order[j]));
    }
    for (int j = 0; j < k; ++j) {
      r.experts.push_back(order[j]);
      r.gates.push_back(std::exp(u(order[j])) / den);
    }
  }
  return r;
}

const GateMode kAllModes[] = {GateMode::kChosen, GateMode::kShortlist, GateMode::kSigmoid};

class BiasOnBackend : public test::BackendTest {};

TEST_P(BiasOnBackend, GatesComeFromUnbiasedLogitsOfExpertsSelectedByBiasedOnes) {
  const int64_t E = 300, d = 13, T = 40;
  const int k = 4;
  const SyntheticData s = clustered_data(E, d, T, 21);
  const std::vector<float> bias = random_bias(E, 2.0, 22);
  DenseRouter dense(s.centers.view(), compute());
  const Routes unbiased = dense.route(s.tokens.view(), k);
  dense.set_bias(bias_view(bias));
  for (GateMode mode : kAllModes) {
    const Routes got = dense.route(s.tokens.view(), k, mode);
    const Reference want = reference(s.centers.view(), s.tokens.view(), bias, k, mode);
    int compared = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (want.margin[t] < 1e-4) continue;  // float and double may order a near tie apart
      ++compared;
      for (int j = 0; j < k; ++j) {
        const int64_t i = t * k + j;
        EXPECT_EQ(got.experts[i], want.experts[i]) << to_string(mode) << " token " << t;
        EXPECT_NEAR(got.gates[i], want.gates[i], 1e-5 * (1.0 + want.gates[i]))
            << to_string(mode) << " token " << t;
      }
    }
    EXPECT_GT(compared, T / 2) << to_string(mode);
  }
  EXPECT_NE(dense.route(s.tokens.view(), k).experts, unbiased.experts)
      << "the bias moved no route: the test tests nothing";
}

TEST_P(BiasOnBackend, BiasedAirWithEveryListProbedEqualsBiasedDense) {
  const int64_t E = 500, d = 20, T = 45, C = 23;
  const SyntheticData s = clustered_data(E, d, T, 23);
  const std::vector<float> bias = random_bias(E, 2.0, 24);
  DenseRouter dense(s.centers.view(), compute());
  dense.set_bias(bias_view(bias));
  const Matrix d_gates = random_matrix(T, 3, 1.0, 25);
  struct Layout {
    const char* name;
    int64_t cap;
    int spills;
  };
  for (const Layout l : {Layout{"plain", 0, 0}, Layout{"capped", 30, 0}, Layout{"spill2", 40, 2}}) {
    AirRouter air(s.centers.view(), AirConfig{C, 5, 11, l.cap, l.spills, 0.5}, compute());
    const Routes unbiased = air.route(s.tokens.view(), 3, static_cast<int>(C));
    air.set_bias(bias_view(bias));
    for (GateMode mode : kAllModes) {
      const std::string what = std::string(l.name) + " " + to_string(mode);
      const Routes want = dense.route(s.tokens.view(), 3, mode);
      const Routes got = air.route(s.tokens.view(), 3, static_cast<int>(C), mode);
      EXPECT_EQ(got.experts, want.experts) << what;
      EXPECT_EQ(got.logits, want.logits) << what;
      if (mode == GateMode::kShortlist) {  // bits up to the order of the log-sum-exp
        for (size_t i = 0; i < got.gates.size(); ++i)
          EXPECT_NEAR(got.gates[i], want.gates[i], 1e-6 * std::fabs(want.gates[i]) + 1e-30) << what;
        for (int64_t t = 0; t < T; ++t)
          EXPECT_NEAR(got.log_normalizer[t], want.log_normalizer[t],
                      1e-12 * (1.0 + std::fabs(want.log_normalizer[t])))
              << what;
      } else {  // the same normalizing set: the same bits, and the same gradients
        EXPECT_EQ(got.gates, want.gates) << what;
        EXPECT_EQ(got.log_normalizer, want.log_normalizer) << what;
        const RouterGradients ga = air.backward(s.tokens.view(), got, d_gates.view());
        const RouterGradients gd = dense.backward(s.tokens.view(), want, d_gates.view());
        EXPECT_EQ(test::values(ga.d_tokens.view()), test::values(gd.d_tokens.view())) << what;
        EXPECT_EQ(ga.d_centers.rows, gd.d_centers.rows) << what;
        EXPECT_EQ(test::values(ga.d_centers.values.view()),
                  test::values(gd.d_centers.values.view()))
            << what;
      }
    }
    EXPECT_NE(air.route(s.tokens.view(), 3, static_cast<int>(C)).experts, unbiased.experts)
        << l.name << ": the bias moved no route";
  }
}

TEST_P(BiasOnBackend, TheBiasChangesWithoutRebuildingAnything) {
  const int64_t E = 400, d = 16, T = 30;
  const SyntheticData s = clustered_data(E, d, T, 26);
  AirRouter air(s.centers.view(), AirConfig{20, 5, 3}, compute());
  const std::vector<int32_t> lists = air.lists().assignment();
  const Matrix codewords =
      test::copy_matrix(OnHost(compute(), air.codebook().tensor()).view().matrix());
  for (uint64_t step = 0; step < 3; ++step) {
    const std::vector<float> bias = random_bias(E, 1.0 + step, 27 + step);
    air.set_bias(bias_view(bias));
    AirRouter fresh(s.centers.view(), AirConfig{20, 5, 3}, compute());
    fresh.set_bias(bias_view(bias));
    const Routes a = air.route(s.tokens.view(), 4, 5), b = fresh.route(s.tokens.view(), 4, 5);
    EXPECT_EQ(a.experts, b.experts) << "step " << step;
    EXPECT_EQ(a.gates, b.gates) << "step " << step;
  }
  EXPECT_EQ(air.lists().assignment(), lists);
  EXPECT_EQ(test::values(OnHost(compute(), air.codebook().tensor()).view().matrix()),
            test::values(codewords.view()));
  // New centers of the same experts keep the bias; of other experts drop it.
  const Routes biased = air.route(s.tokens.view(), 4, 5);
  air.set_centers(s.centers.view());
  EXPECT_EQ(air.route(s.tokens.view(), 4, 5).experts, biased.experts);
  air.set_centers(MatrixView(s.centers.data(), E - 1, d));
  EXPECT_TRUE(air.bias().empty());
  air.set_centers(s.centers.view());
  air.clear_bias();
  AirRouter plain(s.centers.view(), AirConfig{20, 5, 3}, compute());
  EXPECT_EQ(air.route(s.tokens.view(), 4, 5).experts, plain.route(s.tokens.view(), 4, 5).experts);
}

TEST_P(BiasOnBackend, ALargeBiasForcesAnExpertInOrOut) {
  const int64_t E = 300, d = 13, T = 25;
  const int k = 4;
  const SyntheticData s = clustered_data(E, d, T, 28);
  DenseRouter dense(s.centers.view(), compute());
  AirRouter air(s.centers.view(), AirConfig{16, 5, 3}, compute());
  const Routes before = dense.route(s.tokens.view(), k);
  const int32_t favourite = before.experts[0];  // token 0's best expert
  std::vector<int32_t> used(before.experts);
  std::sort(used.begin(), used.end());
  int32_t unused = 0;
  while (std::binary_search(used.begin(), used.end(), unused)) ++unused;
  std::vector<float> bias(E, 0.0f);
  bias[favourite] = -1e4f;  // out for every token
  bias[unused] = 1e4f;      // in, first, for every token
  dense.set_bias(bias_view(bias));
  air.set_bias(bias_view(bias));
  for (const Routes& r : {dense.route(s.tokens.view(), k),
                          air.route(s.tokens.view(), k, static_cast<int>(air.codewords()))}) {
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* e = r.experts_of(t);
      EXPECT_EQ(e[0], unused) << "token " << t;
      EXPECT_EQ(std::count(e, e + k, favourite), 0) << "token " << t;
      // The other k - 1 are the unbiased ranking without the two.
      std::vector<int32_t> rest;
      for (int j = 0; j < k && static_cast<int>(rest.size()) < k - 1; ++j)
        if (before.experts_of(t)[j] != favourite) rest.push_back(before.experts_of(t)[j]);
      if (static_cast<int>(rest.size()) == k - 1) {
        EXPECT_EQ(std::vector<int32_t>(e + 1, e + k), rest) << "token " << t;
      }
    }
  }
  // AIR forces an expert in only where its list is scanned: at m = 1, the
  // tokens that do not probe its list do not get it.
  const int32_t list_of_unused = air.lists().assignment()[unused];
  const Routes one = air.route(s.tokens.view(), k, 1);
  for (int64_t t = 0; t < T; ++t) {
    const bool probed =
        std::count(one.probed_codewords.begin() + one.probe_offsets[t],
                   one.probed_codewords.begin() + one.probe_offsets[t + 1], list_of_unused) > 0;
    EXPECT_EQ(one.experts_of(t)[0] == unused, probed) << "token " << t;
  }
}

TEST_P(BiasOnBackend, ProductKeyBiasReranksTheSubKeyGrid) {
  const int64_t n = 12, d = 14, T = 20;
  const int k = 3;
  const Matrix k1 = random_matrix(n, d / 2, 1.0, 29), k2 = random_matrix(n, d - d / 2, 1.0, 30);
  const Matrix tokens = random_matrix(T, d, 1.0, 31);
  ProductKeyRouter pk(k1.view(), k2.view(), compute());
  const Routes before = pk.route(tokens.view(), k);
  // Token 0's third choice forced first: it is in the grid of the halves' top 3.
  std::vector<float> bias(n * n, 0.0f);
  const int32_t third = before.experts[2];
  bias[third] = 1e4f;
  // An expert outside token 0's grid (sub-keys ranked last in both halves)
  // cannot be brought in, whatever its bias.
  const Routes wide = pk.route(tokens.view(), static_cast<int>(n * n));
  const int32_t last = wide.experts[n * n - 1];
  bias[last] = 2e4f;
  pk.set_bias(bias_view(bias));
  for (GateMode mode : {GateMode::kChosen, GateMode::kSigmoid}) {
    const Routes after = pk.route(tokens.view(), k, mode);
    EXPECT_EQ(after.experts[0], third) << to_string(mode);
    EXPECT_EQ(std::count(after.experts.begin(), after.experts.begin() + k, last), 0)
        << to_string(mode);
    // Gates from the unbiased logits.
    for (int j = 0; j < k; ++j) {
      const int32_t e = after.experts[j];
      const double z = test::dot_double(tokens.row(0), k1.row(e / n), d / 2) +
                       test::dot_double(tokens.row(0) + d / 2, k2.row(e % n), d - d / 2);
      EXPECT_NEAR(after.logits[j], z, 1e-4) << to_string(mode);
    }
  }
}

TEST_P(BiasOnBackend, BadBiasesAreRefusedByName) {
  const int64_t E = 8, d = 4;
  const Matrix centers = random_matrix(E, d, 1.0, 32);
  DenseRouter dense(centers.view(), compute());
  AirRouter air(centers.view(), AirConfig{2, 3, 1}, compute());
  ProductKeyRouter pk(random_matrix(3, 2, 1.0, 33).view(), random_matrix(3, 2, 1.0, 34).view(),
                      compute());
  const auto refused = [](const std::function<void()>& call, const std::string& part) {
    try {
      call();
      ADD_FAILURE() << "accepted: " << part;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  const std::vector<float> short_bias(5, 0.0f);
  std::vector<float> nan_bias(E, 0.0f), inf_bias(E, 0.0f);
  nan_bias[3] = std::numeric_limits<float>::quiet_NaN();
  inf_bias[6] = -std::numeric_limits<float>::infinity();
  refused([&] { dense.set_bias(bias_view(short_bias)); }, "bias has 5 entries, expected E = 8");
  refused([&] { air.set_bias(bias_view(short_bias)); }, "bias has 5 entries, expected E = 8");
  refused([&] { pk.set_bias(bias_view(short_bias)); }, "bias has 5 entries, expected E = 9");
  refused([&] { dense.set_bias(bias_view({})); }, "bias has 0 entries, expected E = 8");
  refused([&] { dense.set_bias(bias_view(nan_bias)); }, "bias entry 3 is nan");
  refused([&] { air.set_bias(bias_view(inf_bias)); }, "bias entry 6 is -inf");
  refused([&] { dense.set_bias(Matrix(2, 4).view()); }, "bias has shape [2, 4], expected E = 8");
  // A refused bias leaves the router as it was.
  EXPECT_TRUE(dense.bias().empty());
  // Sigmoid and chosen gates exist for product keys, a shortlist does not.
  refused([&] { pk.route(random_matrix(2, 4, 1.0, 35).view(), 2, GateMode::kShortlist); },
          "not 'shortlist'");
  refused([] { gate_mode_from_string("softmax"); },
          "gate mode 'softmax' is unknown (expected 'chosen', 'shortlist' or 'sigmoid')");
}

AIRMOE_INSTANTIATE_BACKENDS(BiasOnBackend);

}  // namespace
}  // namespace airmoe
