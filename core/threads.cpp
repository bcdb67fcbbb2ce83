#include "core/threads.h"

#include <omp.h>

#include <stdexcept>
#include <string>

namespace airmoe {

void set_num_threads(int n) {
  if (n < 1)
    throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
  omp_set_num_threads(n);
}

int num_threads() {
  return omp_get_max_threads();
}

}  // namespace airmoe
