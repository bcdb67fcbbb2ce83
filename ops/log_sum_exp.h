// A running log-sum-exp in double, mergeable in a fixed order: the softmax
// denominators of the gates (a row's k chosen logits, or every logit a
// router scored). Per-element code, the same on every backend (AIRMOE_HD);
// a tensor of them is f64 [rows, 2] holding (max, sum) per row.
#pragma once

#include <cmath>

#include "core/hd.h"

namespace airmoe::inline ops {

struct LogSumExp {
  double max = -static_cast<double>(INFINITY);
  double sum = 0.0;  // sum of exp(z - max)

  AIRMOE_HD void add(double z) {
    if (z > max) {
      sum = sum * exp(max - z) + 1.0;
      max = z;
    } else {
      sum += exp(z - max);
    }
  }

  AIRMOE_HD void merge(const LogSumExp& o) {
    if (o.sum == 0.0) return;
    if (sum == 0.0) {
      *this = o;
      return;
    }
    const double m = max < o.max ? o.max : max;  // std::max's choice on ties
    sum = sum * exp(max - m) + o.sum * exp(o.max - m);
    max = m;
  }

  AIRMOE_HD double value() const { return max + log(sum); }
};

}  // namespace airmoe::inline ops
