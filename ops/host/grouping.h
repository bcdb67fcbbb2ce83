// Items grouped by a key on the host: a stable counting sort, so every
// group keeps item order and the grouping does not depend on the thread
// count (the host twin of ops/device/exec.h group_by).
#pragma once

#include <cstdint>
#include <vector>

namespace airmoe::inline ops::host {

// Items 0..n-1 by key in [0, buckets): group b is items[offsets[b] ..
// offsets[b + 1]), in item order.
struct Csr {
  std::vector<int64_t> offsets;  // [buckets + 1]
  std::vector<int64_t> items;    // [n]
};

template <typename Key>
Csr bucket(int64_t buckets, int64_t n, Key key) {
  Csr c;
  c.offsets.assign(static_cast<size_t>(buckets) + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++c.offsets[key(i) + 1];
  for (int64_t b = 0; b < buckets; ++b) c.offsets[b + 1] += c.offsets[b];
  std::vector<int64_t> fill(c.offsets.begin(), c.offsets.end() - 1);
  c.items.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) c.items[fill[key(i)]++] = i;
  return c;
}

}  // namespace airmoe::inline ops::host
