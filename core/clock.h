// Wall-clock seconds from a monotonic clock, for phase timings.
#pragma once

#include <chrono>

namespace airmoe {

inline double clock_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace airmoe
