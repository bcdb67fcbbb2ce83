#include "core/checks.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "core/errors.h"

namespace airmoe::inline core {

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
  fail_nonfinite(what, first_bad / m.cols, first_bad % m.cols, m.data[first_bad]);
}

void fail_nonfinite(const char* what, int64_t row, int64_t col, float value) {
  fail(std::string(what) + " row " + std::to_string(row) + " column " + std::to_string(col) +
       " is " + (std::isnan(value) ? "nan" : (value > 0 ? "+inf" : "-inf")));
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

void require_expert_count(int64_t experts, const char* what) {
  if (experts > INT32_MAX)
    fail(std::string(what) + " = " + std::to_string(experts) +
         " is too many: expert ids are 32-bit, at most " + std::to_string(INT32_MAX) + " experts");
  if (experts < 1) fail(std::string(what) + " = " + std::to_string(experts) + " must be >= 1");
}

namespace {

double row_norm(const float* x, int64_t n) {
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) sum += static_cast<double>(x[c]) * x[c];
  return std::sqrt(sum);
}

std::string short_number(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.3g", v);
  return text;
}

}  // namespace

double max_row_norm(MatrixView m) {
  double best = 0.0;
#pragma omp parallel for reduction(max : best) if (m.rows * m.cols > (1 << 20))
  for (int64_t r = 0; r < m.rows; ++r) best = std::max(best, row_norm(m.row(r), m.cols));
  return best;
}

void require_finite_logits(MatrixView m, double key_norm_bound, const char* what) {
  const double limit = static_cast<double>(FLT_MAX) / 2;
  int64_t first_bad = INT64_MAX;
#pragma omp parallel for reduction(min : first_bad) if (m.rows * m.cols > (1 << 20))
  for (int64_t r = 0; r < m.rows; ++r)
    if (row_norm(m.row(r), m.cols) * key_norm_bound > limit) first_bad = std::min(first_bad, r);
  if (first_bad == INT64_MAX) return;
  fail_logit_overflow(what, first_bad, row_norm(m.row(first_bad), m.cols), key_norm_bound);
}

void fail_logit_overflow(const char* what, int64_t row, double norm, double key_norm_bound) {
  const double limit = static_cast<double>(FLT_MAX) / 2;
  fail(std::string(what) + " row " + std::to_string(row) +
       ": logits overflow float32 (|h| = " + short_number(norm) + " times the largest key norm " +
       short_number(key_norm_bound) + " exceeds " + short_number(limit) + ")");
}

}  // namespace airmoe::inline core
