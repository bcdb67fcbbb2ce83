// A naive, single-process, double-precision MoE layer for tests: every
// (token, expert, gate) pair evaluated one at a time with plain loops, no
// grouping and no score_nt. Parameters are held in double so that finite
// differences can perturb them.
//
//   out_t = sum over the pairs (t, e, g) of  g * W2_e act(W1_e x_t)
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "router/routes.h"
#include "runtime/experts.h"
#include "test_util.h"

namespace airmoe::test {

inline double ref_act(runtime::Activation a, double x) {
  switch (a) {
    case runtime::Activation::kGelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case runtime::Activation::kRelu:
      return x > 0.0 ? x : 0.0;
    case runtime::Activation::kSilu:
      return x / (1.0 + std::exp(-x));
    case runtime::Activation::kSwiglu:  // gated: tests/test_ops.cpp's reference
      throw std::invalid_argument("reference_layer: no gated (swiglu) experts");
  }
  return 0.0;
}

inline double ref_act_grad(runtime::Activation a, double x) {
  constexpr double kPi = 3.14159265358979323846;
  switch (a) {
    case runtime::Activation::kGelu:
      return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) +
             x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * kPi);
    case runtime::Activation::kRelu:
      return x > 0.0 ? 1.0 : 0.0;
    case runtime::Activation::kSilu: {
      const double s = 1.0 / (1.0 + std::exp(-x));
      return s + x * s * (1.0 - s);
    }
    case runtime::Activation::kSwiglu:
      throw std::invalid_argument("reference_layer: no gated (swiglu) experts");
  }
  return 0.0;
}

// Pairs in double: pair p adds gate[p] * FFN_{expert[p]}(x[token[p]]).
struct RefPairs {
  std::vector<int32_t> token;
  std::vector<int32_t> expert;  // global ids
  std::vector<double> gate;
  size_t size() const { return token.size(); }
};

inline RefPairs ref_pairs(const runtime::ExpertPairs& p) {
  return {p.token, p.expert, std::vector<double>(p.gate.begin(), p.gate.end())};
}

// Routes [T, k] as pairs, pair t * k + j for token t's j-th expert.
inline RefPairs ref_pairs(const RefRoutes& r) {
  RefPairs out;
  for (int64_t t = 0; t < r.tokens; ++t)
    for (int j = 0; j < r.k; ++j) {
      out.token.push_back(static_cast<int32_t>(t));
      out.expert.push_back(r.experts[t * r.k + j]);
      out.gate.push_back(r.gates[t * r.k + j]);
    }
  return out;
}

inline RefPairs ref_pairs(const Routes& r) {
  RefPairs out;
  for (int64_t t = 0; t < r.tokens; ++t)
    for (int j = 0; j < r.k; ++j) {
      out.token.push_back(static_cast<int32_t>(t));
      out.expert.push_back(r.experts_of(t)[j]);
      out.gate.push_back(r.gates_of(t)[j]);
    }
  return out;
}

inline std::vector<double> to_double(MatrixView m) {
  return std::vector<double>(m.data, m.data + m.rows * m.cols);
}

struct RefGrads {
  std::vector<double> d_gate;  // [pairs] (for routes: [T, k])
  std::vector<double> dx;      // [T, d], the FFN part only
  std::vector<double> dw1;     // [experts, h, d]
  std::vector<double> dw2;     // [experts, d, h]
};

// The experts of a shard with their parameters in double, indexed like the
// shard (local index = position in ids).
struct RefLayer {
  int64_t d = 0, h = 0;
  runtime::Activation act = runtime::Activation::kGelu;
  std::vector<int32_t> ids;
  std::vector<double> w1;  // [experts, h, d]
  std::vector<double> w2;  // [experts, d, h]

  explicit RefLayer(const runtime::ExpertShard& s)
      : d(s.config().dim),
        h(s.config().hidden),
        act(s.config().activation),
        ids(s.ids()),
        w1(s.w1_data().begin(), s.w1_data().end()),
        w2(s.w2_data().begin(), s.w2_data().end()) {}

  int64_t local(int32_t id) const {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] == id) return static_cast<int64_t>(i);
    throw std::invalid_argument("reference: expert " + std::to_string(id) + " is not present");
  }

  // FFN of expert `id` on one token; pre (h) is filled when given.
  std::vector<double> ffn(int32_t id, const double* x, std::vector<double>* pre = nullptr) const {
    const int64_t e = local(id);
    std::vector<double> z(h), y(d, 0.0);
    for (int64_t j = 0; j < h; ++j) {
      double s = 0.0;
      for (int64_t c = 0; c < d; ++c) s += w1[(e * h + j) * d + c] * x[c];
      z[j] = s;
    }
    if (pre) *pre = z;
    for (int64_t c = 0; c < d; ++c) {
      double s = 0.0;
      for (int64_t j = 0; j < h; ++j) s += w2[(e * d + c) * h + j] * ref_act(act, z[j]);
      y[c] = s;
    }
    return y;
  }

  // out [T, d] = sum over pairs of gate * FFN(x[token]); x is [T, d].
  std::vector<double> forward(const std::vector<double>& x, int64_t T, const RefPairs& p) const {
    std::vector<double> out(static_cast<size_t>(T * d), 0.0);
    for (size_t i = 0; i < p.size(); ++i) {
      const int64_t t = p.token[i];
      const std::vector<double> y = ffn(p.expert[i], &x[t * d]);
      for (int64_t c = 0; c < d; ++c) out[t * d + c] += p.gate[i] * y[c];
    }
    return out;
  }

  // Gradients of L = sum(dy ⊙ out) for dy [T, d].
  RefGrads backward(const std::vector<double>& x, int64_t T, const RefPairs& p,
                    const std::vector<double>& dy) const {
    RefGrads g;
    g.d_gate.assign(p.size(), 0.0);
    g.dx.assign(static_cast<size_t>(T * d), 0.0);
    g.dw1.assign(w1.size(), 0.0);
    g.dw2.assign(w2.size(), 0.0);
    for (size_t i = 0; i < p.size(); ++i) {
      const int64_t t = p.token[i], e = local(p.expert[i]);
      const double* xt = &x[t * d];
      const double* dyt = &dy[t * d];
      std::vector<double> pre;
      const std::vector<double> y = ffn(p.expert[i], xt, &pre);
      for (int64_t c = 0; c < d; ++c) g.d_gate[i] += dyt[c] * y[c];
      for (int64_t j = 0; j < h; ++j) {
        double da = 0.0;
        for (int64_t c = 0; c < d; ++c) {
          const double u = p.gate[i] * dyt[c];
          g.dw2[(e * d + c) * h + j] += u * ref_act(act, pre[j]);
          da += w2[(e * d + c) * h + j] * u;
        }
        const double dpre = da * ref_act_grad(act, pre[j]);
        for (int64_t c = 0; c < d; ++c) {
          g.dw1[(e * h + j) * d + c] += dpre * xt[c];
          g.dx[t * d + c] += w1[(e * h + j) * d + c] * dpre;
        }
      }
    }
    return g;
  }
};

}  // namespace airmoe::test
