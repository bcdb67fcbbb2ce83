// What a token's gates are a softmax of, over its normalizing set, and the
// per-element math of it (AIRMOE_HD: the same on every backend).
#pragma once

#include <cmath>

#include "core/hd.h"

namespace airmoe::inline ops {

// kSoftmax: the logits z themselves (the softmax gate modes). kSigmoid:
// log sigmoid(z), so that the gates are sigmoid(z_i) / sum_j sigmoid(z_j)
// over the chosen experts (DeepSeek-V3 / GLM-4.5 sigmoid scores,
// renormalized).
enum class GateFunction { kSoftmax, kSigmoid };

// log sigmoid(z) = -(max(-z, 0) + log1p(exp(-|z|))) in double: finite for
// every finite z, so logits far below zero still give finite gates summing
// to 1 (a plain sigmoid would underflow to 0 / 0).
AIRMOE_HD inline double log_sigmoid(double z) {
  return -((z < 0.0 ? -z : 0.0) + log1p(exp(-fabs(z))));
}

// The value the gates take the softmax of.
AIRMOE_HD inline double gate_input(GateFunction fn, float z) {
  return fn == GateFunction::kSigmoid ? log_sigmoid(static_cast<double>(z))
                                      : static_cast<double>(z);
}

// d gate_input / dz: 1, or d log sigmoid(z) / dz = sigmoid(-z) = 1 / (1 + exp(z)).
AIRMOE_HD inline double gate_input_slope(GateFunction fn, float z) {
  return fn == GateFunction::kSigmoid ? 1.0 / (1.0 + exp(static_cast<double>(z))) : 1.0;
}

}  // namespace airmoe::inline ops
