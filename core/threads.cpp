#include "core/threads.h"

#include <omp.h>

#include <string>

#include "core/checks.h"

namespace airmoe::inline core {

void set_num_threads(int n) {
  if (n < 1) fail("set_num_threads: n must be >= 1, got " + std::to_string(n));
  if (n > kMaxThreads)
    fail("set_num_threads: n must be <= " + std::to_string(kMaxThreads) + ", got " +
         std::to_string(n));
  omp_set_num_threads(n);
}

int num_threads() {
  return omp_get_max_threads();
}

}  // namespace airmoe::inline core
