#include "ops/kmeans_stats.h"

#include <limits>
#include <numeric>
#include <string>

#include "core/checks.h"

namespace airmoe::inline ops {

KMeansStats::KMeansStats(int64_t c, int64_t d)
    : codewords(c),
      dim(d),
      sums(static_cast<size_t>(c * d), 0),
      counts(static_cast<size_t>(c), 0),
      farthest_cos(static_cast<size_t>(c), std::numeric_limits<int64_t>::max()),
      farthest_expert(static_cast<size_t>(c), -1) {}

KMeansStats& KMeansStats::operator+=(const KMeansStats& o) {
  if (o.codewords != codewords || o.dim != dim)
    fail("KMeansStats: adding stats of shape [" + std::to_string(o.codewords) + ", " +
         std::to_string(o.dim) + "] to [" + std::to_string(codewords) + ", " + std::to_string(dim) +
         "]");
  for (size_t i = 0; i < sums.size(); ++i) sums[i] += o.sums[i];
  for (int64_t c = 0; c < codewords; ++c) {
    counts[c] += o.counts[c];
    if (farther_member(o.farthest_cos[c], o.farthest_expert[c], farthest_cos[c],
                       farthest_expert[c])) {
      farthest_cos[c] = o.farthest_cos[c];
      farthest_expert[c] = o.farthest_expert[c];
    }
  }
  objective += o.objective;
  return *this;
}

int64_t KMeansStats::experts() const {
  return std::accumulate(counts.begin(), counts.end(), int64_t{0});
}

double KMeansStats::mean_objective() const {
  const int64_t n = experts();
  return n == 0 ? 0.0 : static_cast<double>(objective) / kScale / static_cast<double>(n);
}

}  // namespace airmoe::inline ops
