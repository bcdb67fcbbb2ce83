// Argument checks shared by every folder: each failure is a UsageError
// (core/errors.h, an std::invalid_argument) whose message names the
// argument, and for non-finite values the row and column.
#pragma once

#include <cstdint>
#include <string>

#include "core/matrix.h"

namespace airmoe {

// Throws UsageError(message) (core/errors.h).
[[noreturn]] void fail(const std::string& message);

// Throws unless every entry of m is finite: "<what> row R column C is nan".
void require_finite(MatrixView m, const char* what);

// Throws unless m has `cols` columns: "<what> has D columns, expected N".
void require_cols(MatrixView m, int64_t cols, const char* what);

// Throws unless lo <= value <= hi: "<what> = V is outside [lo, hi]".
void require_in_range(int64_t value, int64_t lo, int64_t hi, const char* what);

}  // namespace airmoe
