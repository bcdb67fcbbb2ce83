// The experts' activation functions and their derivatives, evaluated in
// double: per-element code, the same on every backend (AIRMOE_HD). GELU is
// the exact (erf) form. Each backend rounds act_value(pre) and
// act_grad(pre) to float where the expert FFN needs them.
#pragma once

#include <cmath>
#include <string>

#include "core/hd.h"

namespace airmoe::inline ops {

enum class Activation { kGelu, kRelu, kSilu };
const char* to_string(Activation a);
// "gelu", "relu" or "silu"; throws UsageError naming the unknown name.
Activation activation_from_string(const std::string& name);

AIRMOE_HD inline double act_value(Activation a, double x) {
  constexpr double kInvSqrt2 = 0.70710678118654752440;
  switch (a) {
    case Activation::kGelu:
      return 0.5 * x * (1.0 + erf(x * kInvSqrt2));
    case Activation::kRelu:
      return x > 0.0 ? x : 0.0;
    case Activation::kSilu:
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
    case Activation::kSilu: {
      const double s = 1.0 / (1.0 + exp(-x));
      return s * (1.0 + x * (1.0 - s));
    }
  }
  return 0.0;
}

}  // namespace airmoe::inline ops
