#include "comm/exchange_buffer.h"

#include <stdexcept>
#include <string>

#include "core/errors.h"

namespace airmoe::comm {

void ExchangeBuffer::reset(std::span<const int64_t> bytes_per_rank) {
  offsets_.assign(bytes_per_rank.size() + 1, 0);
  for (size_t p = 0; p < bytes_per_rank.size(); ++p) {
    if (bytes_per_rank[p] < 0)
      throw UsageError("ExchangeBuffer: rank " + std::to_string(p) + " has a negative size " +
                       std::to_string(bytes_per_rank[p]));
    offsets_[p + 1] = offsets_[p] + bytes_per_rank[p];
  }
  data_.resize(static_cast<size_t>(offsets_.back()));
}

void ExchangeBuffer::reset(int ranks) {
  offsets_.assign(static_cast<size_t>(ranks) + 1, 0);
  data_.clear();
}

}  // namespace airmoe::comm
