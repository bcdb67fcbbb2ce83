// The routers, the codebook and the expert shard composed on every backend
// (backend_params.h): their routes, gates, outputs and gradients equal the
// host's, bit for bit (on cuda: ids and logits bit for bit, values derived
// from exp, log or erf within kTol); their TensorView APIs give what their
// host APIs give; bf16 tokens and keys route like their f32 widening.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "backend_params.h"
#include "core/synthetic.h"
#include "ops/bf16.h"
#include "router/air_router.h"
#include "router/codebook.h"
#include "router/dense_router.h"
#include "router/product_key_router.h"
#include "runtime/experts.h"
#include "test_util.h"

namespace airmoe {
namespace {

constexpr double kTol = 1e-5;  // relative, where cuda's libm may differ

class RouterOnBackend : public test::BackendTest {
 protected:
  // Bit for bit, or (transcendental values on cuda) within kTol.
  template <typename T>
  void expect_same(const std::vector<T>& got, const std::vector<T>& want, const std::string& what,
                   bool transcendental) const {
    test::expect_same_values(got, want, what, !transcendental || libm_bits(), kTol);
  }
  void expect_routes(const Routes& got, const Routes& want, const std::string& what) const {
    ASSERT_EQ(got.tokens, want.tokens) << what;
    ASSERT_EQ(got.k, want.k) << what;
    expect_same(got.experts, want.experts, what + ": experts", false);
    expect_same(got.logits, want.logits, what + ": logits", false);
    expect_same(got.shortlist_size, want.shortlist_size, what + ": shortlist sizes", false);
    expect_same(got.probe_offsets, want.probe_offsets, what + ": probe offsets", false);
    expect_same(got.probed_codewords, want.probed_codewords, what + ": probed codewords", false);
    expect_same(got.gates, want.gates, what + ": gates", true);
    expect_same(got.log_normalizer, want.log_normalizer, what + ": normalizers", true);
  }
  void expect_rows(const SparseRowGrad& got, const SparseRowGrad& want,
                   const std::string& what) const {
    expect_same(got.rows, want.rows, what + " rows", false);
    expect_same(test::values(got.values.view()), test::values(want.values.view()), what, true);
  }
  void expect_grads(const RouterGradients& got, const RouterGradients& want,
                    const std::string& what) const {
    expect_same(test::values(got.d_tokens.view()), test::values(want.d_tokens.view()),
                what + ": d_tokens", true);
    expect_rows(got.d_centers, want.d_centers, what + ": d_centers");
  }
};

SyntheticData data(int64_t E, int64_t d, int64_t T, uint64_t seed) {
  return test::clustered_data(E, d, T, seed);
}

// A host bf16 copy of a float matrix, and its exact f32 widening.
struct Bf16 {
  Tensor bf16;
  Matrix widened;
  explicit Bf16(MatrixView m)
      : bf16(host_allocator(), DType::kBF16, m.rows, m.cols), widened(m.rows, m.cols) {
    for (int64_t i = 0; i < m.rows * m.cols; ++i) {
      bf16.as<uint16_t>()[i] = narrow_bf16(m.data[i]);
      widened.data()[i] = widen_bf16(bf16.as<uint16_t>()[i]);
    }
  }
};

const GateMode kModes[] = {GateMode::kChosen, GateMode::kShortlist};

TEST_P(RouterOnBackend, DenseEqualsHost) {
  const SyntheticData s = data(300, 13, 40, 1);  // d not a multiple of 8
  const Matrix d_gates = random_matrix(40, 4, 1.0, 2);
  const DenseRouter host(s.centers.view()), dev(s.centers.view(), compute());
  for (GateMode mode : kModes) {
    const std::string what = std::string("dense ") + to_string(mode);
    const Routes want = host.route(s.tokens.view(), 4, mode);
    const Routes got = dev.route(s.tokens.view(), 4, mode);
    expect_routes(got, want, what);
    expect_grads(dev.backward(s.tokens.view(), got, d_gates.view()),
                 host.backward(s.tokens.view(), want, d_gates.view()), what);
    // The TensorView API: tokens, routes and gradients on the device.
    const Staged tokens(compute(), s.tokens.view());
    const DeviceRoutes r = dev.route(tokens.view(), 4, mode);
    expect_routes(r.to_host(compute()), want, what + " (device API)");
    expect_grads(
        dev.backward(tokens.view(), r, Staged(compute(), d_gates.view()).view()).to_host(compute()),
        host.backward(s.tokens.view(), want, d_gates.view()), what + " (device API)");
  }
}

TEST_P(RouterOnBackend, ProductKeysEqualHost) {
  const int64_t n = 12, d = 15, T = 30;
  const Matrix k1 = random_matrix(n, d / 2, 1.0, 3), k2 = random_matrix(n, d - d / 2, 1.0, 4);
  const Matrix tokens = random_matrix(T, d, 1.0, 5);
  for (int k : {1, 5}) {  // k = 1: every gate is 1, every dz 0 (its sub-keys still listed)
    const Matrix d_gates = random_matrix(T, k, 1.0, 6);
    const ProductKeyRouter host(k1.view(), k2.view()), dev(k1.view(), k2.view(), compute());
    const Routes want = host.route(tokens.view(), k), got = dev.route(tokens.view(), k);
    const std::string what = "product keys k=" + std::to_string(k);
    expect_routes(got, want, what);
    const ProductKeyGradients g = dev.backward(tokens.view(), got, d_gates.view());
    const ProductKeyGradients h = host.backward(tokens.view(), want, d_gates.view());
    expect_same(test::values(g.d_tokens.view()), test::values(h.d_tokens.view()),
                what + ": d_tokens", true);
    expect_rows(g.d_keys1, h.d_keys1, what + ": d_keys1");
    expect_rows(g.d_keys2, h.d_keys2, what + ": d_keys2");
    EXPECT_FALSE(h.d_keys1.rows.empty());
  }
}

TEST_P(RouterOnBackend, AirEqualsHost) {
  const SyntheticData s = data(500, 20, 45, 6);
  const Matrix d_gates = random_matrix(45, 3, 1.0, 7);
  struct Layout {
    const char* name;
    int64_t cap;
    int spills;
  };
  for (const Layout l : {Layout{"plain", 0, 0}, Layout{"capped", 30, 0}, Layout{"spill2", 40, 2}}) {
    const AirConfig cfg{23, 5, 11, l.cap, l.spills, 0.5};
    const AirRouter host(s.centers.view(), cfg), dev(s.centers.view(), cfg, compute());
    // The same index: the codebook trained on the backend, the lists from it.
    EXPECT_EQ(test::values(OnHost(compute(), dev.codebook().tensor()).view().matrix()),
              test::values(host.codebook().codewords()))
        << l.name;
    EXPECT_EQ(dev.lists().assignment(), host.lists().assignment()) << l.name;
    for (int m : {1, 3})
      for (GateMode mode : kModes) {
        const std::string what =
            std::string("air ") + l.name + " m=" + std::to_string(m) + " " + to_string(mode);
        const Routes want = host.route(s.tokens.view(), 3, m, mode);
        const Routes got = dev.route(s.tokens.view(), 3, m, mode);
        expect_routes(got, want, what);
        expect_grads(dev.backward(s.tokens.view(), got, d_gates.view()),
                     host.backward(s.tokens.view(), want, d_gates.view()), what);
        const DeviceRoutes r = dev.route(Staged(compute(), s.tokens.view()).view(), 3, m, mode);
        expect_routes(r.to_host(compute()), want, what + " (device API)");
      }
  }
}

TEST_P(RouterOnBackend, Bf16TokensAndKeysRouteLikeTheirWidening) {
  const SyntheticData s = data(400, 24, 35, 8);
  const Bf16 tokens(s.tokens.view()), centers(s.centers.view());
  const Staged dev_tokens(compute(), tokens.bf16);
  // bf16 keys (dense, product keys) and bf16 tokens (every router).
  const DenseRouter dense16(TensorView(centers.bf16), compute());
  const DenseRouter dense(centers.widened.view(), compute());
  for (GateMode mode : kModes)
    expect_routes(dense16.route(dev_tokens.view(), 5, mode).to_host(compute()),
                  dense.route(tokens.widened.view(), 5, mode), "dense bf16");
  const Bf16 k1(random_matrix(20, 12, 1.0, 9).view()), k2(random_matrix(20, 12, 1.0, 10).view());
  const ProductKeyRouter pk16(TensorView(k1.bf16), TensorView(k2.bf16), compute());
  const ProductKeyRouter pk(k1.widened.view(), k2.widened.view(), compute());
  expect_routes(pk16.route(dev_tokens.view(), 4).to_host(compute()),
                pk.route(tokens.widened.view(), 4), "product keys bf16");
  const AirRouter air(s.centers.view(), AirConfig{16, 4, 3, 0}, compute());
  for (GateMode mode : kModes)
    expect_routes(air.route(dev_tokens.view(), 5, 2, mode).to_host(compute()),
                  air.route(tokens.widened.view(), 5, 2, mode), "air bf16 tokens");
}

TEST_P(RouterOnBackend, CodebookEqualsHost) {
  const SyntheticData s = data(700, 17, 1, 12);
  KMeansReport host_report, dev_report;
  Codebook host = train_codebook(s.centers.view(), {29, 6, 4}, &host_report);
  Codebook dev = train_codebook(s.centers.view(), {29, 6, 4}, &dev_report, compute());
  const auto codewords = [&](const Codebook& cb) {
    return test::values(OnHost(cb.compute(), cb.tensor()).view().matrix());
  };
  EXPECT_EQ(codewords(dev), codewords(host));
  EXPECT_EQ(dev_report.objective, host_report.objective);
  const Matrix unit = normalize_rows(s.centers.view(), "centers");
  EXPECT_EQ(dev.assign_capped(unit.view(), 30), host.assign_capped(unit.view(), 30));
  const Matrix next = random_matrix(700, 17, 1.0, 13);
  adaptive_update(host, next.view(), 0.5, 2);
  adaptive_update(dev, next.view(), 0.5, 2);
  EXPECT_EQ(codewords(dev), codewords(host));
}

TEST_P(RouterOnBackend, ExpertShardEqualsHost) {
  for (const runtime::Activation act :
       {runtime::Activation::kRelu, runtime::Activation::kGelu, runtime::Activation::kSilu}) {
    const runtime::ExpertConfig cfg{13, 3, act};
    const std::vector<int32_t> ids{1, 4, 6, 9, 20};
    const runtime::ExpertShard host = runtime::ExpertShard::random(cfg, ids, 5);
    runtime::ExpertShard dev = runtime::ExpertShard::random(cfg, ids, 5, compute());
    const Matrix x = random_matrix(9, 13, 1.0, 14), dy = random_matrix(9, 13, 1.0, 15);
    runtime::ExpertPairs pairs;
    for (int32_t t = 0; t < 9; ++t)
      for (int j = 0; j < 2; ++j) {
        pairs.token.push_back(t);
        pairs.expert.push_back(ids[(t + 2 * j) % ids.size()]);
        pairs.gate.push_back(0.25f + 0.125f * static_cast<float>(j));
      }
    const bool exact = act == runtime::Activation::kRelu;
    const std::string what = runtime::to_string(act);
    Matrix out_h(9, 13), out_d(9, 13), dx_h(9, 13), dx_d(9, 13);
    const runtime::ExpertCache ch = host.forward(x.view(), pairs, out_h);
    const runtime::ExpertCache cd = dev.forward(x.view(), pairs, out_d);
    expect_same(test::values(cd.pre.view()), test::values(ch.pre.view()), what + " pre", false);
    expect_same(test::values(out_d.view()), test::values(out_h.view()), what + " out", !exact);
    std::vector<float> g_h, g_d;
    const runtime::SparseExpertGrads gh = host.backward(x.view(), pairs, ch, dy.view(), g_h, dx_h);
    const runtime::SparseExpertGrads gd = dev.backward(x.view(), pairs, cd, dy.view(), g_d, dx_d);
    expect_same(g_d, g_h, what + " d_gate", !exact);
    expect_same(test::values(dx_d.view()), test::values(dx_h.view()), what + " dx", !exact);
    EXPECT_EQ(gd.ids, gh.ids);
    const auto values = [](const runtime::HostFloats& v) {
      return std::vector<float>(v.begin(), v.end());
    };
    expect_same(values(gd.w1), values(gh.w1), what + " dW1", !exact);
    expect_same(values(gd.w2), values(gh.w2), what + " dW2", !exact);
    dev.apply(gd, -0.5f);  // the step runs on the device
    runtime::ExpertShard stepped = host;
    stepped.apply(gd, -0.5f);
    expect_same(host_vector<float>(compute(), dev.weights().w1),
                std::vector<float>(stepped.w1_data().begin(), stepped.w1_data().end()),
                what + " W1 after a step", false);
  }
}

AIRMOE_INSTANTIATE_BACKENDS(RouterOnBackend);

}  // namespace
}  // namespace airmoe
