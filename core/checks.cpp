#include "core/checks.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>

#include "core/errors.h"

namespace airmoe {

void fail(const std::string& message) {
  throw UsageError(message);
}

void require_finite(MatrixView m, const char* what) {
  // Scan in parallel, report the first bad entry in row-major order so the
  // message does not depend on the thread count.
  int64_t first_bad = INT64_MAX;
  const int64_t n = m.rows * m.cols;
#pragma omp parallel for reduction(min : first_bad) if (n > (1 << 20))
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* row = m.row(r);
    for (int64_t c = 0; c < m.cols; ++c) {
      if (!std::isfinite(row[c])) {
        const int64_t at = r * m.cols + c;
        first_bad = std::min(first_bad, at);
        break;
      }
    }
  }
  if (first_bad == INT64_MAX) return;
  const int64_t r = first_bad / m.cols, c = first_bad % m.cols;
  const float v = m.data[first_bad];
  fail(std::string(what) + " row " + std::to_string(r) + " column " + std::to_string(c) + " is " +
       (std::isnan(v) ? "nan" : (v > 0 ? "+inf" : "-inf")));
}

void require_cols(MatrixView m, int64_t cols, const char* what) {
  if (m.cols != cols)
    fail(std::string(what) + " has " + std::to_string(m.cols) + " columns, expected " +
         std::to_string(cols));
}

void require_in_range(int64_t value, int64_t lo, int64_t hi, const char* what) {
  if (value < lo || value > hi)
    fail(std::string(what) + " = " + std::to_string(value) + " is outside [" + std::to_string(lo) +
         ", " + std::to_string(hi) + "]");
}

}  // namespace airmoe
