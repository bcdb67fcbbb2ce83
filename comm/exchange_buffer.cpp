#include "comm/exchange_buffer.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/errors.h"
#include "ops/registry.h"

namespace airmoe::comm {

void ExchangeBuffer::reset(std::span<const int64_t> bytes_per_rank) {
  std::vector<int64_t> offsets(bytes_per_rank.size() + 1, 0);
  for (size_t p = 0; p < bytes_per_rank.size(); ++p) {
    if (bytes_per_rank[p] < 0)
      throw UsageError("ExchangeBuffer: rank " + std::to_string(p) + " has a negative size " +
                       std::to_string(bytes_per_rank[p]));
    offsets[p + 1] = offsets[p] + bytes_per_rank[p];
  }
  const auto total = static_cast<size_t>(offsets.back());
  if (total > storage_.bytes()) {
    // Grows geometrically, as the std::vector it replaces did, so that a
    // slowly growing step does not reallocate every call.
    const size_t grown = std::max(total, storage_.bytes() + storage_.bytes() / 2);
    Buffer grown_storage(*allocator_, grown);  // on failure, this buffer stays as it was
    storage_ = std::move(grown_storage);
  }
  offsets_ = std::move(offsets);
}

void ExchangeBuffer::reset(int ranks) {
  offsets_.assign(static_cast<size_t>(ranks) + 1, 0);
}

ExchangeBuffer ExchangeBuffer::staging_for(const Ops& device_ops) {
  ExchangeBuffer staging;
  staging.allocator_ = &device_ops.staging_allocator();
  return staging;
}

ExchangeBuffer ExchangeBuffer::for_compute(const Ops& ops) {
  return is_host_backend(ops) ? ExchangeBuffer() : ExchangeBuffer(ops);
}

std::string ExchangeBuffer::where() const {
  return ops_ ? ops_->name() : std::string("host");
}

void copy_exchange_bytes(const ExchangeBuffer& dst_owner, char* dst,
                         const ExchangeBuffer& src_owner, const char* src, int64_t bytes,
                         Stream stream) {
  if (bytes <= 0) return;
  const Ops* ops = dst_owner.ops() ? dst_owner.ops() : src_owner.ops();
  if (ops == nullptr) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
  ops->copy_bytes(dst, dst_owner.device(), src, src_owner.device(), static_cast<size_t>(bytes),
                  stream);
}

}  // namespace airmoe::comm
