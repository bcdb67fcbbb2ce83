// One thread count for the library's OpenMP loops (the scoring kernel, the
// grouped list scans, k-means).
#pragma once

namespace airmoe::inline core {

// More threads than this is a mistake (libgomp crashes or stalls creating
// tens of thousands), not a setting.
constexpr int kMaxThreads = 1024;

// 1 <= n <= kMaxThreads; throws UsageError otherwise.
void set_num_threads(int n);
int num_threads();

}  // namespace airmoe::inline core
