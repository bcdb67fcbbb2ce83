// Argument checks shared by every folder: each failure is a UsageError
// (core/errors.h, an std::invalid_argument) whose message names the
// argument, and for non-finite values the row and column.
#pragma once

#include <cstdint>
#include <string>

#include "core/matrix.h"

namespace airmoe::inline core {

// Throws UsageError(message) (core/errors.h).
[[noreturn]] void fail(const std::string& message);

// Throws unless every entry of m is finite: "<what> row R column C is nan".
void require_finite(MatrixView m, const char* what);
// The message of require_finite for the first bad entry, thrown.
[[noreturn]] void fail_nonfinite(const char* what, int64_t row, int64_t col, float value);

// Throws unless m has `cols` columns: "<what> has D columns, expected N".
void require_cols(MatrixView m, int64_t cols, const char* what);

// Throws unless lo <= value <= hi: "<what> = V is outside [lo, hi]".
void require_in_range(int64_t value, int64_t lo, int64_t hi, const char* what);

// Expert ids are int32 everywhere (routes, lists, wire formats): throws
// unless 1 <= experts <= 2^31 - 1, "<what> = E ...: expert ids are 32-bit".
void require_expert_count(int64_t experts, const char* what);

// Largest Euclidean norm of a row of m, in double (0 for no rows).
double max_row_norm(MatrixView m);

// Throws unless every row h of m has |h| * key_norm_bound <= FLT_MAX / 2:
// "<what> row R: logits overflow float32 (|h| = ..., key norm bound ...)".
// By Cauchy-Schwarz every partial sum of <w, h> with |w| <= key_norm_bound
// is then finite (the factor 2 covers float rounding), so the logits and the
// (shift-invariant) softmax gates are finite too. Only refuses rows whose
// logits could reach float32's range: no ordinary input changes.
void require_finite_logits(MatrixView m, double key_norm_bound, const char* what);
// The message of require_finite_logits for row `row` of norm `norm`, thrown.
[[noreturn]] void fail_logit_overflow(const char* what, int64_t row, double norm,
                                      double key_norm_bound);

}  // namespace airmoe::inline core
