// One thread count for the library's OpenMP loops (the scoring kernel, the
// grouped list scans, k-means).
#pragma once

namespace airmoe {

// n >= 1; throws std::invalid_argument otherwise.
void set_num_threads(int n);
int num_threads();

}  // namespace airmoe
