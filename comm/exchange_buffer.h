// The bytes of one variable all-to-all in caller-owned storage that is reused
// across steps (no allocation per peer or per call once it has grown): what
// goes to, or came from, rank p is [begin(p), begin(p) + bytes(p)). This is
// the shape a device transport needs (one buffer, counts and offsets).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace airmoe::comm {

class ExchangeBuffer {
 public:
  // Lays out `bytes_per_rank.size()` segments of the given sizes, contiguous
  // in rank order; keeps the storage's capacity. Contents are unspecified.
  void reset(std::span<const int64_t> bytes_per_rank);
  // An empty segment for each of `ranks` ranks.
  void reset(int ranks);

  int ranks() const { return static_cast<int>(offsets_.size()) - 1; }
  int64_t bytes(int p) const { return offsets_[p + 1] - offsets_[p]; }
  int64_t total_bytes() const { return offsets_.back(); }
  char* begin(int p) { return data_.data() + offsets_[p]; }
  const char* begin(int p) const { return data_.data() + offsets_[p]; }
  std::span<const char> segment(int p) const { return {begin(p), static_cast<size_t>(bytes(p))}; }
  // [ranks + 1] prefix sums of the segment sizes.
  const std::vector<int64_t>& offsets() const { return offsets_; }
  char* data() { return data_.data(); }
  const char* data() const { return data_.data(); }

 private:
  std::vector<char> data_;
  std::vector<int64_t> offsets_{0};
};

}  // namespace airmoe::comm
