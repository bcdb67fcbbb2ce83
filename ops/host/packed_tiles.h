// What the SIMD kernel sets that pack B share: per-thread scratch for the
// packed panels and widened rows, and the walk over a block's tiles.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace airmoe::inline ops::host {

// Scratch is grown and never shrunk, so a thread packs without allocating
// once it has seen its largest block. One buffer per use, so that a kernel
// may hold one while it calls another that uses a different one.
enum Scratch { kPanels, kWideA, kWideB, kScratchUses };

// `count` Ts, 64-byte aligned, of this thread's buffer for `use`. Throws
// std::bad_alloc where it cannot grow.
template <typename T>
T* scratch(Scratch use, int64_t count) {
  constexpr size_t kAlign = 64;
  thread_local std::vector<unsigned char> buffers[kScratchUses];
  std::vector<unsigned char>& buffer = buffers[use];
  const size_t bytes = static_cast<size_t>(count) * sizeof(T) + kAlign;
  if (buffer.size() < bytes) buffer.resize(bytes);
  const auto at = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>(buffer.data() + (kAlign - at % kAlign) % kAlign);
}

// run(i, j, rows, cols) for every tile of an m x n block: rows [i, i + rows)
// of A against packed panel j / panel (columns [j, j + cols)). Row tiles run
// outer, so a tile's rows of A stay in L1 while the panels stream past them
// from L2.
template <typename Run>
void for_each_tile(int64_t m, int64_t n, int64_t tile_rows, int64_t panel, Run run) {
  for (int64_t i = 0; i < m; i += tile_rows)
    for (int64_t j = 0; j < n; j += panel)
      run(i, j, std::min(tile_rows, m - i), std::min(panel, n - j));
}

}  // namespace airmoe::inline ops::host
