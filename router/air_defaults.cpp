#include "router/air_defaults.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/checks.h"

namespace airmoe::inline router {

AirDefaults recommended_air(int64_t experts) {
  if (experts < 1) fail("recommended_air: E must be >= 1, got " + std::to_string(experts));
  // The power of two nearest sqrt(E) (in log scale).
  const int log2_c = static_cast<int>(std::lround(0.5 * std::log2(static_cast<double>(experts))));
  const int64_t C = std::min<int64_t>(experts, int64_t{1} << log2_c);
  // Measured (docs/routing.md): C = 32 and 64 -> m = 1, 128 -> 2, 256 -> 4,
  // 512 -> 8, i.e. m = C / 64, at least 1.
  const int64_t m = std::max<int64_t>(1, C / 64);
  return {C, static_cast<int>(std::min(m, C))};
}

}  // namespace airmoe::inline router
