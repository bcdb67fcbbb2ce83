// Progress lines of the benchmark programs, on stderr so that stdout stays
// the result. No dependency beyond the C library: the layer benchmark's core
// (bench/layer_measure.h) uses it in the builds without MPI or Boost.
#pragma once

#include <cstdio>

namespace airmoe::bench {

template <typename... Args>
void progress(const char* fmt, Args... args) {
  std::fprintf(stderr, "[airmoe] ");
  std::fprintf(stderr, fmt, args...);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

}  // namespace airmoe::bench
