#include "router/metrics.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/checks.h"

namespace airmoe::inline router {
namespace {

void require_comparable(const Routes& got, const Routes& exact) {
  if (got.tokens != exact.tokens || got.k != exact.k)
    fail("metrics: routes of [" + std::to_string(got.tokens) + ", " + std::to_string(got.k) +
         "] compared with exact routes of [" + std::to_string(exact.tokens) + ", " +
         std::to_string(exact.k) + "]");
}

}  // namespace

double recall_at_k(const Routes& got, const Routes& exact) {
  require_comparable(got, exact);
  if (got.tokens == 0) return 1.0;
  int64_t hits = 0;
  for (int64_t t = 0; t < got.tokens; ++t) {
    const int32_t* a = got.experts_of(t);
    const int32_t* b = exact.experts_of(t);
    for (int i = 0; i < got.k; ++i) hits += std::count(b, b + exact.k, a[i]) > 0 ? 1 : 0;
  }
  return static_cast<double>(hits) / static_cast<double>(got.tokens * got.k);
}

double mass_recall(const Routes& got, const Routes& exact) {
  require_comparable(got, exact);
  if (got.tokens == 0) return 1.0;
  double total = 0.0;
  for (int64_t t = 0; t < got.tokens; ++t) {
    const float* zg = got.logits.data() + t * got.k;
    const float* ze = exact.logits.data() + t * exact.k;
    const double top = ze[0];
    double num = 0.0, den = 0.0;
    for (int i = 0; i < got.k; ++i) {
      if (got.experts[t * got.k + i] >= 0) num += std::exp(zg[i] - top);
      den += std::exp(ze[i] - top);
    }
    total += num / den;
  }
  return total / static_cast<double>(got.tokens);
}

ShortlistStats shortlist_stats(const Routes& routes) {
  ShortlistStats s;
  if (routes.tokens == 0) return s;
  std::vector<int32_t> sizes(routes.shortlist_size);
  double sum = 0.0;
  for (int32_t v : sizes) sum += v;
  s.mean = sum / static_cast<double>(sizes.size());
  std::sort(sizes.begin(), sizes.end());
  const size_t idx =
      std::min(sizes.size() - 1, static_cast<size_t>(std::ceil(0.99 * sizes.size())) - 1);
  s.p99 = sizes[idx];
  s.max = sizes.back();
  return s;
}

}  // namespace airmoe::inline router
