// Expert shards (runtime/experts.h): forward and backward against the naive
// double-precision reference layer, the reference against finite
// differences, determinism, seeded initialization and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "core/threads.h"
#include "ops/boundary.h"
#include "reference_layer.h"
#include "router/routes.h"
#include "runtime/experts.h"
#include "test_util.h"

namespace airmoe {
namespace {

using runtime::Activation;
using runtime::DenseExpertGrads;
using runtime::ExpertCache;
using runtime::ExpertConfig;
using runtime::ExpertPairs;
using runtime::ExpertShard;
using runtime::SparseExpertGrads;
using test::RefLayer;
using test::RefPairs;

const Activation kActivations[] = {Activation::kGelu, Activation::kRelu, Activation::kSilu};

// |got - want| <= tol * max(1, |want|) elementwise.
template <typename T>
void expect_close(const T* got, const std::vector<double>& want, double tol,
                  const std::string& what) {
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (err > tol * std::max(1.0, std::fabs(want[i])) && ++bad <= 5)
      ADD_FAILURE() << what << " entry " << i << ": got " << got[i] << ", want " << want[i];
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " entries off";
}

// n random pairs over T tokens and the given experts, gates in [0.05, 1),
// plus a repeat of the first pair (same token and expert twice).
ExpertPairs random_pairs(int64_t T, const std::vector<int32_t>& ids, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(T - 1));
  std::uniform_int_distribution<size_t> exp(0, ids.size() - 1);
  std::uniform_real_distribution<float> gate(0.05f, 1.0f);
  ExpertPairs p;
  for (size_t i = 0; i < n; ++i) {
    p.token.push_back(tok(rng));
    p.expert.push_back(ids[exp(rng)]);
    p.gate.push_back(gate(rng));
  }
  if (n > 0) {
    p.token.push_back(p.token[0]);
    p.expert.push_back(p.expert[0]);
    p.gate.push_back(0.5f);
  }
  return p;
}

ExpertPairs subset(const ExpertPairs& p, const std::vector<size_t>& which) {
  ExpertPairs out;
  for (size_t i : which) {
    out.token.push_back(p.token[i]);
    out.expert.push_back(p.expert[i]);
    out.gate.push_back(p.gate[i]);
  }
  return out;
}

struct RunResult {
  Matrix out;
  ExpertCache cache;
  std::vector<float> d_gate;
  Matrix dx;
  DenseExpertGrads grads;
};

RunResult run(const ExpertShard& s, const Matrix& x, const ExpertPairs& p, const Matrix& dy) {
  RunResult r;
  r.out = Matrix(x.rows(), x.cols());
  r.cache = s.forward(x, p, r.out);
  r.dx = Matrix(x.rows(), x.cols());
  r.grads = s.zero_grads();
  s.backward(x, p, r.cache, dy, r.d_gate, r.dx, r.grads);
  return r;
}

TEST(ExpertShard, ActivationNames) {
  for (Activation a : kActivations)
    EXPECT_EQ(runtime::activation_from_string(runtime::to_string(a)), a);
  EXPECT_STREQ(runtime::to_string(Activation::kGelu), "gelu");
  EXPECT_STREQ(runtime::to_string(Activation::kRelu), "relu");
  EXPECT_STREQ(runtime::to_string(Activation::kSilu), "silu");
}

// Shard forward / backward against the double reference: several experts,
// tokens with several pairs, repeated experts and a repeated pair, d odd,
// h = 1 (PEER-style) and h = 16, all activations; out and dx start non-zero
// (the shard adds to them).
TEST(ExpertShard, MatchesDoubleReference) {
  const int64_t T = 9, d = 13;
  const std::vector<int32_t> ids = {1, 4, 5, 9, 12};
  for (int64_t h : {int64_t{1}, int64_t{16}}) {
    for (Activation act : kActivations) {
      SCOPED_TRACE(std::string(runtime::to_string(act)) + " h=" + std::to_string(h));
      const ExpertShard s = ExpertShard::random({d, h, act}, ids, 11);
      const Matrix x = random_matrix(T, d, 1.0, 21);
      const Matrix dy = random_matrix(T, d, 1.0, 22);
      const Matrix out0 = random_matrix(T, d, 1.0, 23);
      const Matrix dx0 = random_matrix(T, d, 1.0, 24);
      const ExpertPairs p = random_pairs(T, ids, 40, 25);

      Matrix out = test::copy_matrix(out0);
      const ExpertCache cache = s.forward(x, p, out);
      Matrix dx = test::copy_matrix(dx0);
      std::vector<float> d_gate;
      DenseExpertGrads grads = s.zero_grads();
      s.backward(x, p, cache, dy, d_gate, dx, grads);

      const RefLayer ref(s);
      const RefPairs rp = test::ref_pairs(p);
      const std::vector<double> xd = test::to_double(x), dyd = test::to_double(dy);
      std::vector<double> want_out = ref.forward(xd, T, rp);
      const test::RefGrads g = ref.backward(xd, T, rp, dyd);
      for (size_t i = 0; i < want_out.size(); ++i) want_out[i] += out0.data()[i];
      std::vector<double> want_dx = g.dx;
      for (size_t i = 0; i < want_dx.size(); ++i) want_dx[i] += dx0.data()[i];
      // The cache: pre-activations and pre-gate outputs per pair.
      std::vector<double> want_pre, want_y;
      for (size_t i = 0; i < p.size(); ++i) {
        std::vector<double> pre;
        const std::vector<double> y = ref.ffn(p.expert[i], &xd[p.token[i] * d], &pre);
        want_pre.insert(want_pre.end(), pre.begin(), pre.end());
        want_y.insert(want_y.end(), y.begin(), y.end());
      }
      ASSERT_EQ(cache.pre.rows(), static_cast<int64_t>(p.size()));
      ASSERT_EQ(cache.pre.cols(), h);
      ASSERT_EQ(cache.output.rows(), static_cast<int64_t>(p.size()));
      ASSERT_EQ(cache.output.cols(), d);
      ASSERT_EQ(d_gate.size(), p.size());
      expect_close(cache.pre.data(), want_pre, 1e-5, "cache.pre");
      expect_close(cache.output.data(), want_y, 1e-5, "cache.output");
      expect_close(out.data(), want_out, 1e-5, "out");
      expect_close(d_gate.data(), g.d_gate, 1e-5, "d_gate");
      expect_close(dx.data(), want_dx, 1e-5, "dx");
      expect_close(grads.w1.data(), g.dw1, 1e-5, "dW1");
      expect_close(grads.w2.data(), g.dw2, 1e-5, "dW2");
    }
  }
}

// Pairs taken from a router's Routes [T, k] (pair t * k + j), as the layer
// will build them.
TEST(ExpertShard, MatchesReferenceOnRoutes) {
  const int64_t T = 6, d = 7, h = 4, E = 10;
  const int k = 3;
  std::vector<int32_t> all(E);
  std::iota(all.begin(), all.end(), 0);
  const ExpertShard s = ExpertShard::random({d, h, Activation::kSilu}, all, 3);
  Routes r = make_routes(T, k, GateMode::kChosen);
  std::mt19937_64 rng(4);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> perm = all;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) {
      r.experts[t * k + j] = perm[j];
      r.gates[t * k + j] = 0.2f + 0.1f * static_cast<float>(j);
    }
  }
  ExpertPairs p;
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      p.token.push_back(static_cast<int32_t>(t));
      p.expert.push_back(r.experts_of(t)[j]);
      p.gate.push_back(r.gates_of(t)[j]);
    }
  const Matrix x = random_matrix(T, d, 1.0, 5);
  const Matrix dy = random_matrix(T, d, 1.0, 6);
  const RunResult got = run(s, x, p, dy);
  const RefLayer ref(s);
  const RefPairs rp = test::ref_pairs(r);
  const std::vector<double> xd = test::to_double(x);
  expect_close(got.out.data(), ref.forward(xd, T, rp), 1e-5, "out");
  const test::RefGrads g = ref.backward(xd, T, rp, test::to_double(dy));
  expect_close(got.d_gate.data(), g.d_gate, 1e-5, "d_gate [T, k]");
  expect_close(got.dx.data(), g.dx, 1e-5, "dx");
  expect_close(got.grads.w1.data(), g.dw1, 1e-5, "dW1");
  expect_close(got.grads.w2.data(), g.dw2, 1e-5, "dW2");
}

// The reference's analytic gradients against central differences in double,
// L = sum(dy ⊙ out), on d = 5, h = 3, 4 experts, 3 tokens, k = 2.
TEST(ExpertReference, GradientsMatchFiniteDifferences) {
  const int64_t T = 3, d = 5, h = 3;
  const double eps = 1e-6;
  test::RefRoutes routes;
  routes.tokens = T;
  routes.k = 2;
  routes.experts = {0, 2, 3, 1, 2, 0};  // expert 2 serves two tokens
  routes.gates = {0.7, 0.3, 0.55, 0.45, 0.62, 0.38};
  for (Activation act : kActivations) {
    SCOPED_TRACE(runtime::to_string(act));
    // For ReLU, keep every pre-activation away from the kink at 0.
    RefLayer layer(ExpertShard({d, h, act}, {0, 1, 2, 3}));
    std::vector<double> x;
    for (uint64_t seed = 1;; ++seed) {
      layer = RefLayer(ExpertShard::random({d, h, act}, {0, 1, 2, 3}, seed));
      x = test::to_double(random_matrix(T, d, 1.0, 100 + seed));
      double min_pre = 1e300;
      for (int64_t t = 0; t < T; ++t)
        for (int j = 0; j < routes.k; ++j) {
          std::vector<double> pre;
          layer.ffn(routes.experts[t * routes.k + j], &x[t * d], &pre);
          for (double v : pre) min_pre = std::min(min_pre, std::fabs(v));
        }
      if (min_pre > 1e-2) break;
      ASSERT_LT(seed, 1000u);
    }
    const std::vector<double> dy = test::to_double(random_matrix(T, d, 1.0, 7));
    RefPairs pairs = test::ref_pairs(routes);
    auto loss = [&]() {
      const std::vector<double> out = layer.forward(x, T, pairs);
      double l = 0.0;
      for (size_t i = 0; i < out.size(); ++i) l += dy[i] * out[i];
      return l;
    };
    const test::RefGrads g = layer.backward(x, T, pairs, dy);
    auto check = [&](std::vector<double>& param, const std::vector<double>& grad,
                     const std::string& what) {
      ASSERT_EQ(param.size(), grad.size()) << what;
      for (size_t i = 0; i < param.size(); ++i) {
        const double saved = param[i];
        param[i] = saved + eps;
        const double lp = loss();
        param[i] = saved - eps;
        const double lm = loss();
        param[i] = saved;
        const double fd = (lp - lm) / (2.0 * eps);
        EXPECT_LE(std::fabs(grad[i] - fd), 1e-6 * std::max(1.0, std::fabs(fd)))
            << what << " entry " << i << ": analytic " << grad[i] << ", finite difference " << fd;
      }
    };
    check(x, g.dx, "dx");
    check(layer.w1, g.dw1, "dW1");
    check(layer.w2, g.dw2, "dW2");
    check(pairs.gate, g.d_gate, "d_gate");
  }
}

// One and two threads give the same bits, both when many experts run in
// parallel and when one hot expert's GEMMs are parallel inside the scoring op.
TEST(ExpertDeterminism, SameBitsWithOneAndTwoThreads) {
  test::ThreadGuard guard;
  struct Case {
    int64_t T, d, h, experts;
    size_t pairs;
  };
  for (const Case& c : {Case{256, 64, 16, 64, 1024}, Case{2048, 64, 64, 1, 2048}}) {
    SCOPED_TRACE("experts=" + std::to_string(c.experts));
    std::vector<int32_t> ids(c.experts);
    std::iota(ids.begin(), ids.end(), 0);
    const ExpertShard s = ExpertShard::random({c.d, c.h, Activation::kGelu}, ids, 8);
    const Matrix x = random_matrix(c.T, c.d, 1.0, 9);
    const Matrix dy = random_matrix(c.T, c.d, 1.0, 10);
    const ExpertPairs p = random_pairs(c.T, ids, c.pairs, 11);
    set_num_threads(1);
    const RunResult a = run(s, x, p, dy);
    set_num_threads(2);
    const RunResult b = run(s, x, p, dy);
    EXPECT_EQ(test::values(a.out), test::values(b.out));
    EXPECT_EQ(test::values(a.cache.pre), test::values(b.cache.pre));
    EXPECT_EQ(test::values(a.cache.output), test::values(b.cache.output));
    EXPECT_EQ(a.d_gate, b.d_gate);
    EXPECT_EQ(test::values(a.dx), test::values(b.dx));
    EXPECT_EQ(a.grads.w1, b.grads.w1);
    EXPECT_EQ(a.grads.w2, b.grads.w2);
  }
}

// Reordering the pairs while each token's pairs keep their relative order
// changes no per-token result (out, dx) and no per-pair result (cache,
// d_gate) by a single bit; parameter gradients change only by rounding.
TEST(ExpertDeterminism, PairOrderAcrossTokensDoesNotMatter) {
  const int64_t T = 40, d = 24, h = 8;
  std::vector<int32_t> ids(12);
  std::iota(ids.begin(), ids.end(), 100);
  const ExpertShard s = ExpertShard::random({d, h, Activation::kSilu}, ids, 12);
  const Matrix x = random_matrix(T, d, 1.0, 13);
  const Matrix dy = random_matrix(T, d, 1.0, 14);
  const ExpertPairs p = random_pairs(T, ids, 200, 15);
  // A random priority per token; stable sort keeps each token's pairs in order.
  std::mt19937_64 rng(16);
  std::vector<uint64_t> key(T);
  for (auto& k : key) k = rng();
  std::vector<size_t> perm(p.size());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(),
                   [&](size_t a, size_t b) { return key[p.token[a]] < key[p.token[b]]; });
  ASSERT_FALSE(std::is_sorted(perm.begin(), perm.end()));
  const ExpertPairs q = subset(p, perm);
  const RunResult a = run(s, x, p, dy);
  const RunResult b = run(s, x, q, dy);
  EXPECT_EQ(test::values(a.out), test::values(b.out));
  EXPECT_EQ(test::values(a.dx), test::values(b.dx));
  for (size_t i = 0; i < perm.size(); ++i) {
    const int64_t pi = static_cast<int64_t>(perm[i]), qi = static_cast<int64_t>(i);
    EXPECT_EQ(a.d_gate[pi], b.d_gate[qi]) << "pair " << pi;
    for (int64_t c = 0; c < d; ++c) ASSERT_EQ(a.cache.output(pi, c), b.cache.output(qi, c));
    for (int64_t j = 0; j < h; ++j) ASSERT_EQ(a.cache.pre(pi, j), b.cache.pre(qi, j));
  }
  const std::vector<double> w1(a.grads.w1.begin(), a.grads.w1.end());
  const std::vector<double> w2(a.grads.w2.begin(), a.grads.w2.end());
  expect_close(b.grads.w1.data(), w1, 1e-5, "dW1");
  expect_close(b.grads.w2.data(), w2, 1e-5, "dW2");
}

// Two calls on the two halves of the pairs add the same bits to out and dx
// as one call on all of them: each token's sum runs in pair order.
TEST(ExpertDeterminism, SplitCallsAddLikeOneCall) {
  const int64_t T = 30, d = 16, h = 4;
  const std::vector<int32_t> ids = {2, 3, 5, 7, 11};
  const ExpertShard s = ExpertShard::random({d, h, Activation::kGelu}, ids, 17);
  const Matrix x = random_matrix(T, d, 1.0, 18);
  const Matrix dy = random_matrix(T, d, 1.0, 19);
  const ExpertPairs p = random_pairs(T, ids, 120, 20);
  const RunResult whole = run(s, x, p, dy);
  std::vector<size_t> first(p.size() / 2), second(p.size() - p.size() / 2);
  std::iota(first.begin(), first.end(), 0);
  std::iota(second.begin(), second.end(), first.size());
  Matrix out(T, d), dx(T, d);
  DenseExpertGrads grads = s.zero_grads();
  std::vector<float> d_gate;
  for (const auto& half : {first, second}) {
    const ExpertPairs q = subset(p, half);
    const ExpertCache cache = s.forward(x, q, out);
    s.backward(x, q, cache, dy, d_gate, dx, grads);
  }
  EXPECT_EQ(test::values(out), test::values(whole.out));
  EXPECT_EQ(test::values(dx), test::values(whole.dx));
}

// Backward adds to the gradients it is given.
TEST(ExpertShard, BackwardAccumulatesGradients) {
  const int64_t T = 8, d = 6, h = 5;
  const std::vector<int32_t> ids = {0, 1, 2};
  const ExpertShard s = ExpertShard::random({d, h, Activation::kRelu}, ids, 30);
  const Matrix x = random_matrix(T, d, 1.0, 31);
  const Matrix dy = random_matrix(T, d, 1.0, 32);
  const ExpertPairs p = random_pairs(T, ids, 20, 33);
  const RunResult once = run(s, x, p, dy);
  DenseExpertGrads grads = s.zero_grads();
  Matrix dx(T, d);
  std::vector<float> d_gate = {1.0f, 2.0f};  // overwritten
  for (int i = 0; i < 2; ++i) s.backward(x, p, once.cache, dy, d_gate, dx, grads);
  EXPECT_EQ(d_gate, once.d_gate);
  for (size_t i = 0; i < grads.w1.size(); ++i) EXPECT_EQ(grads.w1[i], 2.0f * once.grads.w1[i]);
  for (size_t i = 0; i < grads.w2.size(); ++i) EXPECT_EQ(grads.w2[i], 2.0f * once.grads.w2[i]);
  std::vector<double> twice_dx;
  for (size_t i = 0; i < dx.size(); ++i) twice_dx.push_back(2.0 * once.dx.data()[i]);
  expect_close(dx.data(), twice_dx, 1e-6, "dx");
  // Empty grads are taken as zeros of the right size.
  DenseExpertGrads empty;
  Matrix dx2(T, d);
  s.backward(x, p, once.cache, dy, d_gate, dx2, empty);
  EXPECT_EQ(empty.w1, once.grads.w1);
  EXPECT_EQ(empty.w2, once.grads.w2);
}

TEST(ExpertShard, EmptyPairs) {
  const int64_t T = 4, d = 5, h = 3;
  const ExpertShard s = ExpertShard::random({d, h, Activation::kGelu}, {0, 1}, 40);
  const Matrix x = random_matrix(T, d, 1.0, 41);
  const Matrix out0 = random_matrix(T, d, 1.0, 42);
  Matrix out = test::copy_matrix(out0);
  const ExpertCache cache = s.forward(x, ExpertPairs{}, out);
  EXPECT_EQ(test::values(out), test::values(out0));
  EXPECT_EQ(cache.pre.rows(), 0);
  EXPECT_EQ(cache.pre.cols(), h);
  EXPECT_EQ(cache.output.rows(), 0);
  EXPECT_EQ(cache.output.cols(), d);
  Matrix dx = test::copy_matrix(out0);
  std::vector<float> d_gate = {3.0f};
  DenseExpertGrads grads = s.zero_grads();
  s.backward(x, ExpertPairs{}, cache, random_matrix(T, d, 1.0, 43), d_gate, dx, grads);
  EXPECT_TRUE(d_gate.empty());
  EXPECT_EQ(test::values(dx), test::values(out0));
  EXPECT_EQ(grads.w1, s.zero_grads().w1);
  EXPECT_EQ(grads.w2, s.zero_grads().w2);
  // An empty shard and a shard with zero tokens are fine too.
  const ExpertShard none({d, h, Activation::kGelu}, {});
  EXPECT_EQ(none.size(), 0);
  Matrix out_none(0, d);
  none.forward(MatrixView(nullptr, 0, d), ExpertPairs{}, out_none);
}

// Parameters depend only on (seed, expert id), not on which other experts
// the shard holds; their scale is N(0, 1/d) for W1 and N(0, 1/h) for W2.
TEST(ExpertShard, RandomDependsOnlyOnSeedAndId) {
  const ExpertConfig cfg{32, 8, Activation::kGelu};
  std::vector<int32_t> all(10);
  std::iota(all.begin(), all.end(), 0);
  const ExpertShard full = ExpertShard::random(cfg, all, 77);
  const ExpertShard part = ExpertShard::random(cfg, {3, 7}, 77);
  const int64_t n = cfg.dim * cfg.hidden;
  for (int32_t id : {3, 7}) {
    const int64_t i = part.index_of(id), j = full.index_of(id);
    ASSERT_GE(i, 0);
    ASSERT_EQ(j, id);
    EXPECT_EQ(std::vector<float>(part.w1(i), part.w1(i) + n),
              std::vector<float>(full.w1(j), full.w1(j) + n));
    EXPECT_EQ(std::vector<float>(part.w2(i), part.w2(i) + n),
              std::vector<float>(full.w2(j), full.w2(j) + n));
  }
  EXPECT_EQ(part.index_of(4), -1);
  EXPECT_NE(std::vector<float>(full.w1(3), full.w1(3) + n),
            std::vector<float>(full.w1(7), full.w1(7) + n));
  const ExpertShard other = ExpertShard::random(cfg, {3, 7}, 78);
  const auto values = [](std::span<const float> v) {
    return std::vector<float>(v.begin(), v.end());
  };
  EXPECT_NE(values(other.w1_data()), values(part.w1_data()));
  EXPECT_NE(values(other.w2_data()), values(part.w2_data()));
  auto mean_square = [](std::span<const float> v) {
    double s = 0.0;
    for (float f : v) s += static_cast<double>(f) * f;
    return s / static_cast<double>(v.size());
  };
  EXPECT_NEAR(mean_square(full.w1_data()) * cfg.dim, 1.0, 0.15);
  EXPECT_NEAR(mean_square(full.w2_data()) * cfg.hidden, 1.0, 0.15);
}

TEST(ExpertBadInput, Construction) {
  AIRMOE_EXPECT_THROW_MSG(ExpertShard({4, 0, Activation::kGelu}, {0}), std::invalid_argument,
                          "hidden = 0 must be >= 1");
  AIRMOE_EXPECT_THROW_MSG(ExpertShard({0, 2, Activation::kGelu}, {0}), std::invalid_argument,
                          "dim = 0 must be >= 1");
  AIRMOE_EXPECT_THROW_MSG(ExpertShard({4, 2, Activation::kGelu}, {3, 1}), std::invalid_argument,
                          "ascending and distinct");
  AIRMOE_EXPECT_THROW_MSG(ExpertShard({4, 2, Activation::kGelu}, {1, 2, 2}), std::invalid_argument,
                          "ids[2] = 2 follows 2");
  AIRMOE_EXPECT_THROW_MSG(ExpertShard::random({4, 2, Activation::kGelu}, {-1, 2}, 1),
                          std::invalid_argument, "expert id -1");
  AIRMOE_EXPECT_THROW_MSG(runtime::activation_from_string("tanh"), std::invalid_argument,
                          "activation 'tanh' is unknown");
}

TEST(ExpertBadInput, Forward) {
  const int64_t T = 4, d = 13;
  const ExpertShard s = ExpertShard::random({d, 3, Activation::kGelu}, {1, 4}, 50);
  const Matrix x = random_matrix(T, d, 1.0, 51);
  Matrix out(T, d);
  const ExpertPairs good{{0, 3}, {1, 4}, {0.5f, 0.5f}};
  EXPECT_NO_THROW(s.forward(x, good, out));

  ExpertPairs p = good;
  p.expert[1] = 17;
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, p, out), std::invalid_argument,
                          "expert 17 is not hosted by this shard");
  p = good;
  p.token[1] = 4;
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, p, out), std::invalid_argument,
                          "pair 1 token row 4 is out of range [0, 4)");
  p.token[1] = -1;
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, p, out), std::invalid_argument, "token row -1");
  p = good;
  p.gate[0] = std::nanf("");
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, p, out), std::invalid_argument, "pair 0 gate is nan");
  p.gate[0] = INFINITY;
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, p, out), std::invalid_argument, "pair 0 gate is +inf");
  p = good;
  p.gate.pop_back();
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, p, out), std::invalid_argument, "sizes must be equal");
  const Matrix narrow = random_matrix(T, 12, 1.0, 52);
  Matrix out12(T, 12);
  AIRMOE_EXPECT_THROW_MSG(s.forward(narrow, good, out12), std::invalid_argument,
                          "x has 12 columns, expected 13");
  Matrix wrong(T + 1, d);
  AIRMOE_EXPECT_THROW_MSG(s.forward(x, good, wrong), std::invalid_argument,
                          "out has shape [5, 13], expected [4, 13]");
}

TEST(ExpertBadInput, Backward) {
  const int64_t T = 4, d = 5;
  const ExpertShard s = ExpertShard::random({d, 3, Activation::kRelu}, {1, 4}, 60);
  const Matrix x = random_matrix(T, d, 1.0, 61);
  Matrix out(T, d);
  const ExpertPairs good{{0, 3, 3}, {1, 4, 1}, {0.5f, 0.5f, 0.2f}};
  const ExpertCache cache = s.forward(x, good, out);
  const Matrix dy = random_matrix(T, d, 1.0, 62);
  Matrix dx(T, d);
  std::vector<float> d_gate;
  DenseExpertGrads grads = s.zero_grads();
  EXPECT_NO_THROW(s.backward(x, good, cache, dy, d_gate, dx, grads));

  ExpertPairs p = good;
  p.expert[2] = 17;
  AIRMOE_EXPECT_THROW_MSG(s.backward(x, p, cache, dy, d_gate, dx, grads), std::invalid_argument,
                          "expert 17 is not hosted by this shard");
  const Matrix dy_bad = random_matrix(T, d + 1, 1.0, 63);
  AIRMOE_EXPECT_THROW_MSG(s.backward(x, good, cache, dy_bad, d_gate, dx, grads),
                          std::invalid_argument, "dy has shape [4, 6], expected [4, 5]");
  Matrix dx_bad(T - 1, d);
  AIRMOE_EXPECT_THROW_MSG(s.backward(x, good, cache, dy, d_gate, dx_bad, grads),
                          std::invalid_argument, "dx has shape [3, 5]");
  const ExpertPairs fewer{{0, 3}, {1, 4}, {0.5f, 0.5f}};
  AIRMOE_EXPECT_THROW_MSG(s.backward(x, fewer, cache, dy, d_gate, dx, grads), std::invalid_argument,
                          "cache.pre");
  Matrix dy_nan = test::copy_matrix(dy);
  dy_nan(2, 3) = std::nanf("");
  AIRMOE_EXPECT_THROW_MSG(s.backward(x, good, cache, dy_nan, d_gate, dx, grads),
                          std::invalid_argument, "dy row 2 column 3 is nan");
  DenseExpertGrads short_grads{std::vector<float>(3), std::vector<float>(3)};
  AIRMOE_EXPECT_THROW_MSG(s.backward(x, good, cache, dy, d_gate, dx, short_grads),
                          std::invalid_argument, "zero_grads()");
}

// ---- Sparse expert gradients (touched experts only) and optimizer steps ----

std::vector<uint32_t> bits(const float* v, size_t n) {
  std::vector<uint32_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = std::bit_cast<uint32_t>(v[i]);
  return out;
}
std::vector<uint32_t> bits(std::span<const float> v) {
  return bits(v.data(), v.size());
}

// c [m, n] = a [m, k] · b [n, k]ᵀ by the host scoring op.
void gemm_nt(const float* a, const float* b, int64_t m, int64_t n, int64_t k, float* c) {
  score_to_host(host_compute(),
                TensorView(const_cast<float*>(a), DType::kF32, Device::host(), m, k),
                TensorView(const_cast<float*>(b), DType::kF32, Device::host(), n, k), c);
}

// Today's dense rows of one ReLU expert, written out: the pairs' rows
// transposed and contracted with the scoring op, added to zeros. ReLU keeps
// act and act' exact in float, so the rows can be compared bit for bit.
struct DenseRows {
  std::vector<float> w1, w2;  // [h, d], [d, h]
};
DenseRows scored_rows(const ExpertShard& s, int32_t id, const Matrix& x, const ExpertPairs& p,
                      const ExpertCache& cache, const Matrix& dy) {
  const int64_t d = s.config().dim, h = s.config().hidden, e = s.index_of(id);
  std::vector<size_t> mine;
  for (size_t i = 0; i < p.size(); ++i)
    if (p.expert[i] == id) mine.push_back(i);
  const int64_t m = static_cast<int64_t>(mine.size());
  std::vector<float> u(m * d), ut(d * m), xt(d * m), at(h * m), w2t(h * d), dpre(m * h),
      dpret(h * m);
  for (int64_t r = 0; r < m; ++r) {
    const size_t q = mine[r];
    for (int64_t c = 0; c < d; ++c) {
      u[r * d + c] = ut[c * m + r] = p.gate[q] * dy(p.token[q], c);
      xt[c * m + r] = x(p.token[q], c);
    }
    for (int64_t j = 0; j < h; ++j) at[j * m + r] = std::max(cache.pre(q, j), 0.0f);
  }
  for (int64_t c = 0; c < d; ++c)
    for (int64_t j = 0; j < h; ++j) w2t[j * d + c] = s.w2(e)[c * h + j];
  gemm_nt(u.data(), w2t.data(), m, h, d, dpre.data());
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < h; ++j)
      dpret[j * m + r] = dpre[r * h + j] * (cache.pre(mine[r], j) > 0.0f ? 1.0f : 0.0f);
  DenseRows out{std::vector<float>(h * d), std::vector<float>(d * h)};
  std::vector<float> tmp(h * d);
  gemm_nt(dpret.data(), xt.data(), h, d, m, tmp.data());
  for (int64_t q = 0; q < h * d; ++q) out.w1[q] = 0.0f + tmp[q];
  gemm_nt(ut.data(), at.data(), d, h, m, tmp.data());
  for (int64_t q = 0; q < d * h; ++q) out.w2[q] = 0.0f + tmp[q];
  return out;
}

// Pairs over a few of the shard's experts: expert 7 serves 11 tokens (more
// than one block of eight), expert 20 serves 16 (whole blocks), the others
// one or two; most hosted experts are untouched.
ExpertPairs few_experts_pairs(int64_t T) {
  ExpertPairs p;
  auto add = [&](int32_t t, int32_t e, float g) {
    p.token.push_back(t);
    p.expert.push_back(e);
    p.gate.push_back(g);
  };
  for (int32_t i = 0; i < 16; ++i) add(i % static_cast<int32_t>(T), 20, 0.05f + 0.03f * i);
  for (int32_t i = 0; i < 11; ++i) add((3 * i + 1) % static_cast<int32_t>(T), 7, 0.9f - 0.04f * i);
  add(2, 3, 0.4f);
  add(5, 31, 0.25f);
  add(5, 3, 0.6f);
  return p;
}

TEST(SparseExpertGrads, TouchedExpertsOnlyWithTheDenseRowsBits) {
  const int64_t T = 13, d = 21;
  std::vector<int32_t> ids;
  for (int32_t i = 0; i < 40; ++i) ids.push_back(i);  // expert i has global id i
  for (int64_t h : {int64_t{1}, int64_t{8}}) {
    SCOPED_TRACE("h=" + std::to_string(h));
    const ExpertShard s = ExpertShard::random({d, h, Activation::kRelu}, ids, 90);
    const Matrix x = random_matrix(T, d, 1.0, 91);
    const Matrix dy = random_matrix(T, d, 1.0, 92);
    const ExpertPairs p = few_experts_pairs(T);
    Matrix out(T, d);
    const ExpertCache cache = s.forward(x, p, out);
    Matrix dx_sparse(T, d), dx_dense(T, d);
    std::vector<float> gate_sparse, gate_dense;
    const SparseExpertGrads g = s.backward(x, p, cache, dy, gate_sparse, dx_sparse);
    DenseExpertGrads dense = s.zero_grads();
    s.backward(x, p, cache, dy, gate_dense, dx_dense, dense);

    EXPECT_EQ(g.ids, (std::vector<int32_t>{3, 7, 20, 31}));  // ascending, touched only
    ASSERT_EQ(g.w1.size(), 4u * h * d);
    ASSERT_EQ(g.w2.size(), 4u * d * h);
    EXPECT_EQ(bits(gate_sparse), bits(gate_dense));
    EXPECT_EQ(bits(test::values(dx_sparse)), bits(test::values(dx_dense)));
    const size_t w = static_cast<size_t>(h * d);
    for (int64_t i = 0; i < g.size(); ++i) {
      const int32_t id = g.ids[i];
      const DenseRows want = scored_rows(s, id, x, p, cache, dy);
      EXPECT_EQ(bits(g.w1.data() + i * w, w), bits(want.w1)) << "dW1 of expert " << id;
      EXPECT_EQ(bits(g.w2.data() + i * w, w), bits(want.w2)) << "dW2 of expert " << id;
      EXPECT_EQ(bits(g.w1.data() + i * w, w), bits(dense.w1.data() + id * w, w));
      EXPECT_EQ(bits(g.w2.data() + i * w, w), bits(dense.w2.data() + id * w, w));
    }
    // The dense form is zero outside the touched experts, and to_dense gives it.
    const DenseExpertGrads back = s.to_dense(g);
    EXPECT_EQ(bits(back.w1), bits(dense.w1));
    EXPECT_EQ(bits(back.w2), bits(dense.w2));
    for (int32_t id : ids) {
      if (std::binary_search(g.ids.begin(), g.ids.end(), id)) continue;
      for (size_t q = 0; q < w; ++q) ASSERT_EQ(dense.w1[id * w + q], 0.0f) << "expert " << id;
    }
  }
}

// The contraction over an expert's pairs runs in pair order: moving the
// pairs of other experts around changes nothing, and reversing the expert's
// own pairs changes the bits (float addition is not associative) while the
// values stay within rounding.
TEST(SparseExpertGrads, ExpertOfSeveralTokensAccumulatesInPairOrder) {
  const int64_t T = 13, d = 17, h = 4;
  std::vector<int32_t> ids;
  for (int32_t i = 0; i < 40; ++i) ids.push_back(i);
  const ExpertShard s = ExpertShard::random({d, h, Activation::kRelu}, ids, 95);
  const Matrix x = random_matrix(T, d, 1.0, 96);
  const Matrix dy = random_matrix(T, d, 1.0, 97);
  const ExpertPairs p = few_experts_pairs(T);
  auto grads_of = [&](const ExpertPairs& q) {
    Matrix out(T, d), dx(T, d);
    std::vector<float> d_gate;
    return s.backward(x, q, s.forward(x, q, out), dy, d_gate, dx);
  };
  const SparseExpertGrads base = grads_of(p);
  // Other experts' pairs first: expert 7's pairs keep their order.
  std::vector<size_t> others_first, reversed_seven;
  for (size_t i = 0; i < p.size(); ++i)
    if (p.expert[i] != 7) others_first.push_back(i);
  for (size_t i = 0; i < p.size(); ++i)
    if (p.expert[i] == 7) others_first.push_back(i);
  for (size_t i = 0; i < p.size(); ++i)
    if (p.expert[i] != 7) reversed_seven.push_back(i);
  for (size_t i = p.size(); i-- > 0;)
    if (p.expert[i] == 7) reversed_seven.push_back(i);
  const SparseExpertGrads moved = grads_of(subset(p, others_first));
  EXPECT_EQ(moved.ids, base.ids);
  EXPECT_EQ(bits(moved.w1), bits(base.w1));
  EXPECT_EQ(bits(moved.w2), bits(base.w2));
  const SparseExpertGrads rev = grads_of(subset(p, reversed_seven));
  const size_t w = static_cast<size_t>(h * d), seven = 1;  // ids {3, 7, 20, 31}
  ASSERT_EQ(rev.ids, base.ids);
  EXPECT_NE(bits(rev.w1.data() + seven * w, w), bits(base.w1.data() + seven * w, w));
  std::vector<double> want(base.w1.begin() + seven * w, base.w1.begin() + (seven + 1) * w);
  expect_close(rev.w1.data() + seven * w, want, 1e-5, "dW1 of expert 7, pairs reversed");
}

TEST(SparseExpertGrads, EmptyPairsGiveEmptyGradients) {
  const int64_t T = 4, d = 5, h = 3;
  const ExpertShard s = ExpertShard::random({d, h, Activation::kGelu}, {2, 6}, 70);
  const Matrix x = random_matrix(T, d, 1.0, 71);
  Matrix out(T, d), dx(T, d);
  const ExpertCache cache = s.forward(x, ExpertPairs{}, out);
  std::vector<float> d_gate = {1.0f};
  const SparseExpertGrads g =
      s.backward(x, ExpertPairs{}, cache, random_matrix(T, d, 1.0, 72), d_gate, dx);
  EXPECT_TRUE(g.ids.empty());
  EXPECT_TRUE(g.w1.empty());
  EXPECT_TRUE(g.w2.empty());
  EXPECT_TRUE(d_gate.empty());
  EXPECT_EQ(bits(s.to_dense(g).w1), bits(s.zero_grads().w1));
  ExpertShard moved = s;
  moved.apply_sgd(g, 0.1f);
  EXPECT_EQ(bits(moved.w1_data()), bits(s.w1_data()));
  EXPECT_EQ(bits(moved.w2_data()), bits(s.w2_data()));
}

// An SGD step on the sparse form equals the step on the dense form, bit for
// bit, and moves only the touched experts.
TEST(SparseExpertGrads, SparseStepEqualsDenseStep) {
  const int64_t T = 13, d = 19;
  const std::vector<int32_t> ids = [] {
    std::vector<int32_t> v;
    for (int32_t i = 0; i < 40; ++i) v.push_back(i);
    return v;
  }();
  for (Activation act : kActivations) {
    SCOPED_TRACE(runtime::to_string(act));
    const ExpertShard s = ExpertShard::random({d, 6, act}, ids, 80);
    const Matrix x = random_matrix(T, d, 1.0, 81);
    const Matrix dy = random_matrix(T, d, 1.0, 82);
    const ExpertPairs p = few_experts_pairs(T);
    Matrix out(T, d), dx(T, d);
    std::vector<float> d_gate;
    const SparseExpertGrads g = s.backward(x, p, s.forward(x, p, out), dy, d_gate, dx);
    ExpertShard sparse = s, dense = s;
    sparse.apply_sgd(g, 0.37f);
    dense.apply(s.to_dense(g), -0.37f);
    EXPECT_EQ(bits(sparse.w1_data()), bits(dense.w1_data()));
    EXPECT_EQ(bits(sparse.w2_data()), bits(dense.w2_data()));
    const size_t w = static_cast<size_t>(6 * d);
    for (int32_t id : ids) {
      const bool touched = std::binary_search(g.ids.begin(), g.ids.end(), id);
      const bool same = bits(sparse.w1(id), w) == bits(s.w1(id), w);
      EXPECT_EQ(same, !touched) << "expert " << id;
    }
    // apply(grads, scale) is the same step.
    ExpertShard axpy = s;
    axpy.apply(g, -0.37f);
    EXPECT_EQ(bits(axpy.w1_data()), bits(sparse.w1_data()));
  }
}

TEST(SparseExpertGrads, BadGradientsAreRefused) {
  const int64_t d = 3, h = 2;
  ExpertShard s = ExpertShard::random({d, h, Activation::kGelu}, {2, 6, 9}, 60);
  const std::vector<float> rows(2 * d * h, 0.5f);
  AIRMOE_EXPECT_THROW_MSG(s.apply(SparseExpertGrads{{2, 5}, rows, rows}, 1.0f),
                          std::invalid_argument,
                          "ExpertShard::apply: grads ids[1] = expert 5 is not hosted");
  AIRMOE_EXPECT_THROW_MSG(s.apply_sgd(SparseExpertGrads{{6, 2}, rows, rows}, 1.0f),
                          std::invalid_argument, "ids must be ascending and distinct");
  AIRMOE_EXPECT_THROW_MSG(s.to_dense(SparseExpertGrads{{2}, rows, rows}), std::invalid_argument,
                          "ExpertShard::to_dense: grads of 1 experts have 12 and 12 entries, "
                          "expected 6 and 6");
  AIRMOE_EXPECT_THROW_MSG(s.apply(DenseExpertGrads{rows, rows}, 1.0f), std::invalid_argument,
                          "ExpertShard::apply: grads have 12 and 12 entries, expected 18");
}

}  // namespace
}  // namespace airmoe
