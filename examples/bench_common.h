// Small pieces every airmoe_bench subcommand uses.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/progress.h"
#include "bench_output.h"
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

// "1,2,4" -> {1, 2, 4}; each item must be an integer in [lo, hi], else
// "<what>: 'x' is not an integer" / "<what>: 0 is outside [1, 64]".
std::vector<int> parse_int_list(const std::string& text, const char* what, int lo = INT32_MIN,
                                int hi = INT32_MAX);

// --threads: 0 keeps OpenMP's default (all cores unless OMP_NUM_THREADS says
// otherwise), 1..kMaxThreads sets it; anything else is refused.
constexpr const char* kThreadsHelp = "OpenMP threads, 1..1024 (0: OpenMP's default, all cores)";
void apply_threads_option(int threads);

// Speed-ups, recall and bytes per token are ratios over the tokens routed:
// a run with none has no figures. Throws "-T/--num-tokens = 0: the
// benchmark needs >= 1 token" (generated data: `tokens_file` empty) or
// "--tokens t.npy has no rows: the benchmark needs >= 1 token".
void require_tokens(int64_t tokens, const std::string& tokens_file);

int run_router(const std::vector<std::string>& args);
int run_traffic(const std::vector<std::string>& args);
int run_layer(const std::vector<std::string>& args);
int run_simulate(const std::vector<std::string>& args);

}  // namespace airmoe::bench
