// Gradients of every router against central finite differences of a
// double-precision reference, with the routing decision (chosen experts, and
// for kShortlist the shortlist) held fixed: L = sum_j dgates_j * gates_j.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/product_key_router.h"
#include "test_util.h"

namespace airmoe {
namespace {

constexpr double kEps = 1e-4;

// Passes when within 1e-3 relative or 1e-5 absolute.
void expect_grad_near(double got, double fd, const std::string& where) {
  EXPECT_LE(std::fabs(got - fd), std::max(1e-3 * std::fabs(fd), 1e-5))
      << where << ": backward " << got << ", finite difference " << fd;
}

// Dense [rows, width] view of a SparseRowGrad; checks the rows are ascending
// and in range.
std::vector<double> densify(const SparseRowGrad& g, int64_t rows, int64_t width) {
  std::vector<double> out(static_cast<size_t>(rows * width), 0.0);
  EXPECT_EQ(static_cast<int64_t>(g.rows.size()), g.values.rows());
  if (!g.rows.empty()) {
    EXPECT_EQ(g.values.cols(), width);
  }
  for (size_t i = 0; i < g.rows.size(); ++i) {
    if (i > 0) {
      EXPECT_LT(g.rows[i - 1], g.rows[i]) << "rows not strictly ascending";
    }
    EXPECT_GE(g.rows[i], 0);
    EXPECT_LT(g.rows[i], rows);
    for (int64_t c = 0; c < width; ++c)
      out[g.rows[i] * width + c] = g.values(static_cast<int64_t>(i), c);
  }
  return out;
}

// Loss of one token for a logit function over the normalizing set `set`
// (which contains the chosen experts), in double: the softmax of the logits,
// or with `sigmoid` the renormalized sigmoids (the softmax of log sigmoid(z)).
double token_loss(const std::vector<int32_t>& chosen, const std::vector<int32_t>& set,
                  const std::function<double(int32_t)>& logit, const float* dgates,
                  bool sigmoid = false) {
  const auto u = [&](int32_t e) {
    const double z = logit(e);
    return sigmoid ? -std::log1p(std::exp(-z)) : z;
  };
  double top = -1e300;
  std::vector<double> zs;
  for (int32_t e : set) {
    zs.push_back(u(e));
    top = std::max(top, zs.back());
  }
  double den = 0.0;
  for (double z : zs) den += std::exp(z - top);
  double loss = 0.0;
  for (size_t j = 0; j < chosen.size(); ++j)
    loss += static_cast<double>(dgates[j]) * std::exp(u(chosen[j]) - top) / den;
  return loss;
}

// A router whose logit is <w_e, h>: W and the tokens as double parameters.
struct CenterProblem {
  std::vector<double> w;  // [E, d]
  std::vector<double> h;  // [T, d]
  int64_t E, d, T;
  std::vector<std::vector<int32_t>> chosen, sets;  // per token, fixed
  bool sigmoid = false;

  double loss(const Matrix& dg) const {
    double total = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      auto logit = [&](int32_t e) {
        double z = 0.0;
        for (int64_t c = 0; c < d; ++c) z += w[e * d + c] * h[t * d + c];
        return z;
      };
      total += token_loss(chosen[t], sets[t], logit, dg.row(t), sigmoid);
    }
    return total;
  }
};

CenterProblem make_problem(const Matrix& centers, const Matrix& tokens, const Routes& routes,
                           const std::function<std::vector<int32_t>(int64_t)>& set_of) {
  CenterProblem p;
  p.E = centers.rows();
  p.d = centers.cols();
  p.T = tokens.rows();
  p.sigmoid = routes.gate_mode == GateMode::kSigmoid;
  p.w.assign(centers.data(), centers.data() + centers.size());
  p.h.assign(tokens.data(), tokens.data() + tokens.size());
  for (int64_t t = 0; t < p.T; ++t) {
    p.chosen.emplace_back(routes.experts_of(t), routes.experts_of(t) + routes.k);
    p.sets.push_back(routes.gate_mode == GateMode::kShortlist ? set_of(t) : p.chosen.back());
  }
  return p;
}

// Central differences of the loss with respect to every entry of `param`.
std::vector<double> finite_differences(std::vector<double>& param,
                                       const std::function<double()>& loss) {
  std::vector<double> g(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    const double saved = param[i];
    param[i] = saved + kEps;
    const double up = loss();
    param[i] = saved - kEps;
    const double down = loss();
    param[i] = saved;
    g[i] = (up - down) / (2 * kEps);
  }
  return g;
}

void check_center_gradients(CenterProblem& p, const Matrix& dg, const RouterGradients& grads) {
  const std::vector<double> fd_h = finite_differences(p.h, [&] { return p.loss(dg); });
  const std::vector<double> fd_w = finite_differences(p.w, [&] { return p.loss(dg); });
  ASSERT_EQ(grads.d_tokens.rows(), p.T);
  ASSERT_EQ(grads.d_tokens.cols(), p.d);
  for (int64_t i = 0; i < p.T * p.d; ++i)
    expect_grad_near(grads.d_tokens.data()[i], fd_h[i],
                     "d_tokens[" + std::to_string(i / p.d) + ", " + std::to_string(i % p.d) + "]");
  const std::vector<double> dw = densify(grads.d_centers, p.E, p.d);
  int64_t nonzero_rows = 0;
  for (int64_t e = 0; e < p.E; ++e) {
    bool in_some_set = false;
    for (const auto& s : p.sets) in_some_set |= std::count(s.begin(), s.end(), e) > 0;
    nonzero_rows += in_some_set;
    if (!in_some_set) {
      EXPECT_FALSE(std::binary_search(grads.d_centers.rows.begin(), grads.d_centers.rows.end(), e))
          << "row " << e << " is outside every normalizing set but has a gradient";
    }
    for (int64_t c = 0; c < p.d; ++c)
      expect_grad_near(dw[e * p.d + c], fd_w[e * p.d + c],
                       "d_centers[" + std::to_string(e) + ", " + std::to_string(c) + "]");
  }
  EXPECT_GT(nonzero_rows, 0);
}

TEST(Backward, DenseMatchesFiniteDifferences) {
  const int64_t E = 11, d = 5, T = 4;
  const Matrix centers = random_matrix(E, d, 0.8, 1);
  const Matrix tokens = random_matrix(T, d, 1.0, 2);
  DenseRouter dense(centers.view());
  const Matrix bias = random_matrix(E, 1, 1.0, 9);
  for (const bool biased : {false, true})
    for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist, GateMode::kSigmoid}) {
      if (biased) dense.set_bias(bias.view());  // selection moves; the gradient is still z's
      for (const int k : {1, 3, static_cast<int>(E)}) {
        SCOPED_TRACE(std::string(to_string(mode)) + " k=" + std::to_string(k) +
                     (biased ? " biased" : ""));
        const Routes r = dense.route(tokens.view(), k, mode);
        const Matrix dg = random_matrix(T, k, 1.0, 3 + k);
        const RouterGradients g = dense.backward(tokens.view(), r, dg.view());
        CenterProblem p = make_problem(centers, tokens, r, [&](int64_t) {
          std::vector<int32_t> all(static_cast<size_t>(E));
          for (int64_t e = 0; e < E; ++e) all[e] = static_cast<int32_t>(e);
          return all;
        });
        check_center_gradients(p, dg, g);
        if (mode == GateMode::kShortlist) {
          EXPECT_EQ(static_cast<int64_t>(g.d_centers.rows.size()), E);
        }
      }
    }
}

TEST(Backward, AirMatchesFiniteDifferences) {
  const int64_t E = 40, d = 6, T = 5, C = 6;
  const Matrix centers = random_matrix(E, d, 0.8, 11);
  const Matrix tokens = random_matrix(T, d, 1.0, 12);
  const AirRouter air(centers.view(), AirConfig{C, 3, 5, 0});
  for (const GateMode mode : {GateMode::kChosen, GateMode::kShortlist, GateMode::kSigmoid}) {
    for (const int m : {1, 2}) {
      for (const int k : {1, 4}) {
        SCOPED_TRACE(std::string(to_string(mode)) + " m=" + std::to_string(m) +
                     " k=" + std::to_string(k));
        const Routes r = air.route(tokens.view(), k, m, mode);
        const Matrix dg = random_matrix(T, k, 1.0, 13 + k);
        const RouterGradients g = air.backward(tokens.view(), r, dg.view());
        CenterProblem p = make_problem(centers, tokens, r, [&](int64_t t) {
          std::vector<int32_t> s;
          for (int64_t q = r.probe_offsets[t]; q < r.probe_offsets[t + 1]; ++q)
            for (int32_t e : air.lists().list(r.probed_codewords[q])) s.push_back(e);
          return s;
        });
        // The shortlist is a strict subset of the experts, so this differs
        // from the dense gradient.
        for (int64_t t = 0; t < T; ++t) EXPECT_LT(static_cast<int64_t>(p.sets[t].size()), E);
        check_center_gradients(p, dg, g);
      }
    }
  }
}

TEST(Backward, ProductKeyMatchesFiniteDifferences) {
  for (const int64_t d : {int64_t{6}, int64_t{7}}) {
    const int64_t n = 4, T = 4, d1 = d / 2, d2 = d - d1;
    const Matrix k1 = random_matrix(n, d1, 0.8, 21 + d), k2 = random_matrix(n, d2, 0.8, 22 + d);
    const Matrix tokens = random_matrix(T, d, 1.0, 23);
    const ProductKeyRouter pk(k1.view(), k2.view());
    for (const GateMode mode : {GateMode::kChosen, GateMode::kSigmoid})
      for (const int k : {1, 3, 6}) {
        SCOPED_TRACE("d=" + std::to_string(d) + " k=" + std::to_string(k) + " " + to_string(mode));
        const Routes r = pk.route(tokens.view(), k, mode);
        const Matrix dg = random_matrix(T, k, 1.0, 24 + k);
        const ProductKeyGradients g = pk.backward(tokens.view(), r, dg.view());
        std::vector<double> p1(k1.data(), k1.data() + k1.size());
        std::vector<double> p2(k2.data(), k2.data() + k2.size());
        std::vector<double> h(tokens.data(), tokens.data() + tokens.size());
        auto loss = [&] {
          double total = 0.0;
          for (int64_t t = 0; t < T; ++t) {
            const std::vector<int32_t> chosen(r.experts_of(t), r.experts_of(t) + k);
            auto logit = [&](int32_t e) {
              const int64_t a = e / n, b = e % n;
              double z = 0.0;
              for (int64_t c = 0; c < d1; ++c) z += p1[a * d1 + c] * h[t * d + c];
              for (int64_t c = 0; c < d2; ++c) z += p2[b * d2 + c] * h[t * d + d1 + c];
              return z;
            };
            total += token_loss(chosen, chosen, logit, dg.row(t), mode == GateMode::kSigmoid);
          }
          return total;
        };
        const std::vector<double> fd_h = finite_differences(h, loss);
        const std::vector<double> fd_1 = finite_differences(p1, loss);
        const std::vector<double> fd_2 = finite_differences(p2, loss);
        for (int64_t i = 0; i < T * d; ++i)
          expect_grad_near(g.d_tokens.data()[i], fd_h[i], "d_tokens " + std::to_string(i));
        const std::vector<double> g1 = densify(g.d_keys1, n, d1);
        const std::vector<double> g2 = densify(g.d_keys2, n, d2);
        for (int64_t i = 0; i < n * d1; ++i)
          expect_grad_near(g1[i], fd_1[i], "d_keys1 " + std::to_string(i));
        for (int64_t i = 0; i < n * d2; ++i)
          expect_grad_near(g2[i], fd_2[i], "d_keys2 " + std::to_string(i));
        if (k > 1) {
          EXPECT_FALSE(g.d_keys1.rows.empty());
        }
      }
  }
}

// The gradient is linear in d_gates, and a d_gates equal for every chosen
// expert (a constant shift) gives zero gradient with kChosen: the gates sum
// to one.
TEST(Backward, ConstantUpstreamGivesZeroWithChosenGates) {
  const Matrix centers = random_matrix(30, 8, 1.0, 31);
  const Matrix tokens = random_matrix(6, 8, 1.0, 32);
  const DenseRouter dense(centers.view());
  const Routes r = dense.route(tokens.view(), 4);
  const Matrix ones(6, 4, 1.0f);
  const RouterGradients g = dense.backward(tokens.view(), r, ones.view());
  for (float v : test::values(g.d_tokens)) EXPECT_NEAR(v, 0.0f, 1e-6f);
  for (float v : test::values(g.d_centers.values)) EXPECT_NEAR(v, 0.0f, 1e-6f);
}

}  // namespace
}  // namespace airmoe
