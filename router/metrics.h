// How good and how costly a routing is, measured against exact routing.
#pragma once

#include <cstdint>

#include "router/routes.h"

namespace airmoe::inline router {

// Mean over tokens of |chosen ∩ exact top-k| / k.
double recall_at_k(const Routes& got, const Routes& exact);

// Mean over tokens of  sum_{e chosen} exp(z_e) / sum_{e in exact top-k} exp(z_e):
// the softmax mass (over all E) the router kept, relative to the most it
// could keep with k experts. Uses the routes' own logits, in double.
double mass_recall(const Routes& got, const Routes& exact);

struct ShortlistStats {
  double mean = 0.0;
  double p99 = 0.0;
  int64_t max = 0;
};
ShortlistStats shortlist_stats(const Routes& routes);

}  // namespace airmoe::inline router
