// The experts' activation functions and their derivatives, evaluated in
// double: per-element code, the same on every backend (AIRMOE_HD). GELU is
// the exact (erf) form. Each backend rounds act_value(pre) and
// act_grad(pre) to float where the expert FFN needs them.
//
// SwiGLU (kSwiglu) is the gated FFN of Llama, Mixtral and Qwen-MoE:
// y = W2 (silu(G x) * (U x)). Its W1 holds the gate rows G [h, d] above the
// up rows U [h, d] ([2h, d] per expert), so a pair's pre-activation is
// [2h] wide (gate then up) and the hidden unit j reads entries j and h + j;
// everything else (W2 [d, h], the GEMMs, the sums) is the two-matrix FFN's.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "core/hd.h"

namespace airmoe::inline ops {

enum class Activation { kGelu, kRelu, kSilu, kSwiglu };
const char* to_string(Activation a);
// "gelu", "relu", "silu" or "swiglu"; throws UsageError naming the unknown
// name.
Activation activation_from_string(const std::string& name);

// Gated: W1 holds two matrices (gate and up) per expert.
AIRMOE_HD constexpr bool is_gated(Activation a) {
  return a == Activation::kSwiglu;
}
// Rows of W1 per expert, and the width of a pair's pre-activation.
AIRMOE_HD constexpr int64_t w1_rows(Activation a, int64_t hidden) {
  return is_gated(a) ? 2 * hidden : hidden;
}

AIRMOE_HD inline double act_value(Activation a, double x) {
  constexpr double kInvSqrt2 = 0.70710678118654752440;
  switch (a) {
    case Activation::kGelu:
      return 0.5 * x * (1.0 + erf(x * kInvSqrt2));
    case Activation::kRelu:
      return x > 0.0 ? x : 0.0;
    case Activation::kSilu:
    case Activation::kSwiglu:  // the gate's activation
      return x / (1.0 + exp(-x));
  }
  return 0.0;
}

AIRMOE_HD inline double act_grad(Activation a, double x) {
  constexpr double kInvSqrt2 = 0.70710678118654752440;
  constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  switch (a) {
    case Activation::kGelu:
      return 0.5 * (1.0 + erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * exp(-0.5 * x * x);
    case Activation::kRelu:
      return x > 0.0 ? 1.0 : 0.0;
    case Activation::kSilu:
    case Activation::kSwiglu: {
      const double s = 1.0 / (1.0 + exp(-x));
      return s * (1.0 + x * (1.0 - s));
    }
  }
  return 0.0;
}

// Hidden unit j of a pair from its pre-activation row `pre` (w1_rows wide):
// act(pre[j]), or silu(pre[j]) * pre[h + j] when gated; double, rounded to
// float by the caller.
template <typename T>
AIRMOE_HD inline double hidden_value(Activation a, const T* pre, int64_t hidden, int64_t j) {
  const double v = act_value(a, pre[j]);
  return is_gated(a) ? v * static_cast<double>(pre[hidden + j]) : v;
}

// d(hidden unit)/d(pre entry j) for entry j of the pre-activation row
// (j < w1_rows): act'(pre[j]); gated, pre[h + j] * silu'(pre[j]) for a gate
// entry and silu(pre[j - h]) for an up entry. The pre-activation gradient is
// dL/d(hidden unit j mod h) times this, rounded to float.
template <typename T>
AIRMOE_HD inline double pre_grad_factor(Activation a, const T* pre, int64_t hidden, int64_t j) {
  if (!is_gated(a)) return act_grad(a, pre[j]);
  if (j >= hidden) return act_value(a, pre[j - hidden]);
  return act_grad(a, pre[j]) * static_cast<double>(pre[hidden + j]);
}

}  // namespace airmoe::inline ops
