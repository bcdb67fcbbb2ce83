// SplitMix64 (Steele, Lea and Flood, OOPSLA 2014): a seeded sequence of
// 64-bit values, and uniform and normal doubles drawn from it. Making one is
// a single multiply-xor, so code whose results must not depend on the thread
// count draws one sequence per row or per expert. (Called a sequence, not a
// stream: a stream in airmoe is the ops' CUDA stream, ops/ops.h.)
#pragma once

#include <cmath>
#include <cstdint>

namespace airmoe::inline core {

// SplitMix64's finalizer: a bijective mix of all 64 bits.
inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct SplitMix64 {
  uint64_t state;
  uint64_t next() { return splitmix64_mix(state += 0x9E3779B97F4A7C15ull); }
  // In (0, 1): the top 53 bits, centered in their interval.
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
  double normal() {  // Box-Muller, one value per call
    const double u = uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
};

}  // namespace airmoe::inline core
