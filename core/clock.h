// Wall-clock seconds from a monotonic clock, for phase timings.
#pragma once

#include <chrono>

namespace airmoe::inline core {

inline double clock_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Adds the seconds its scope lasted to `total`: the one way a phase is timed
// (no start/stop arithmetic at the call site). Adds rather than assigns, so
// a phase that runs in two pieces is timed as their sum.
class ScopedTimer {
 public:
  explicit ScopedTimer(double& total) : total_(total), start_(clock_seconds()) {}
  ~ScopedTimer() { total_ += clock_seconds() - start_; }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  double& total_;
  double start_;
};

}  // namespace airmoe::inline core
