// Progress lines of the benchmark programs, on stderr so that stdout stays
// the result. No dependency beyond the C library: the layer benchmark's core
// (bench/layer_measure.h) uses it in the builds without MPI or Boost.
#pragma once

#include <cstdarg>
#include <cstdio>

namespace airmoe::bench {

// printf's format and arguments, checked by the compiler as printf's are.
[[gnu::format(printf, 1, 2)]] inline void progress(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "[airmoe] ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  va_end(args);
}

}  // namespace airmoe::bench
