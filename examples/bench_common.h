// Small pieces every airmoe_bench subcommand uses.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "core/clock.h"

namespace airmoe::bench {

inline double now_seconds() {
  return clock_seconds();
}

// Best of `repeats` runs of fn(): the least disturbed run on a shared machine.
template <typename Fn>
double best_seconds(int repeats, Fn&& fn) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now_seconds();
    fn();
    best = std::min(best, now_seconds() - t0);
  }
  return best;
}

// Progress on stderr, so stdout stays the result.
template <typename... Args>
void progress(const char* fmt, Args... args) {
  std::fprintf(stderr, "[airmoe] ");
  std::fprintf(stderr, fmt, args...);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

std::vector<int> parse_int_list(const std::string& text, const char* what);

int run_router(const std::vector<std::string>& args);
int run_traffic(const std::vector<std::string>& args);
int run_layer(const std::vector<std::string>& args);
int run_simulate(const std::vector<std::string>& args);

}  // namespace airmoe::bench
