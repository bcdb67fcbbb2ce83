// The bytes of one variable all-to-all in caller-owned storage that is reused
// across steps (no allocation per peer or per call once it has grown): what
// goes to, or came from, rank p is [begin(p), begin(p) + bytes(p)). This is
// the shape a device transport needs (one buffer, counts and offsets).
//
// The storage comes from a compute backend's allocator (ops/ops.h): host
// memory by default (today's buffers, copied with memcpy), or a device's
// memory for an ExchangeBuffer made with that device's Ops, whose copy ops
// then move its bytes (cuda:N on a GPU; device-emulated on host memory,
// which runs the same code path on any machine). The counts and offsets
// always stay on the host: every transport needs them there.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/ops.h"

namespace airmoe::comm {

class ExchangeBuffer {
 public:
  // Host memory (host_allocator()), copies by memcpy.
  ExchangeBuffer() = default;
  // Storage from `device_ops.allocator()`, copies through device_ops.
  explicit ExchangeBuffer(const Ops& device_ops)
      : ops_(&device_ops), allocator_(&device_ops.allocator()) {}
  // A host buffer for staging `device_ops`' data: storage from its
  // staging_allocator() (pinned on cuda), copies by memcpy on the host side.
  static ExchangeBuffer staging_for(const Ops& device_ops);
  // A buffer for `ops`' data: a host buffer for a host backend (memcpy, and
  // nothing to stage), else one in its device's memory (ExchangeBuffer(ops)).
  static ExchangeBuffer for_compute(const Ops& ops);
  ExchangeBuffer(ExchangeBuffer&&) noexcept = default;
  ExchangeBuffer& operator=(ExchangeBuffer&&) noexcept = default;
  ExchangeBuffer(const ExchangeBuffer&) = delete;
  ExchangeBuffer& operator=(const ExchangeBuffer&) = delete;

  // Lays out `bytes_per_rank.size()` segments of the given sizes, contiguous
  // in rank order; keeps the storage's capacity. Contents are unspecified.
  void reset(std::span<const int64_t> bytes_per_rank);
  // An empty segment for each of `ranks` ranks.
  void reset(int ranks);

  int ranks() const { return static_cast<int>(offsets_.size()) - 1; }
  int64_t bytes(int p) const { return offsets_[p + 1] - offsets_[p]; }
  int64_t total_bytes() const { return offsets_.back(); }
  char* begin(int p) { return data() + offsets_[p]; }
  const char* begin(int p) const { return data() + offsets_[p]; }
  // Host buffers only (the bytes of a device buffer are not readable here).
  std::span<const char> segment(int p) const { return {begin(p), static_cast<size_t>(bytes(p))}; }
  // [ranks + 1] prefix sums of the segment sizes.
  const std::vector<int64_t>& offsets() const { return offsets_; }
  char* data() { return static_cast<char*>(storage_.data()); }
  const char* data() const { return static_cast<const char*>(storage_.data()); }

  // The backend whose copy ops move this buffer's bytes; null for a host
  // buffer (memcpy).
  const Ops* ops() const { return ops_; }
  // Where the bytes live: the host, or the device of ops().
  Device device() const { return ops_ ? ops_->device() : Device::host(); }
  // "host", or the backend's name ("device-emulated", "cuda:0").
  std::string where() const;

 private:
  const Ops* ops_ = nullptr;
  Allocator* allocator_ = &host_allocator();
  Buffer storage_;  // capacity: storage_.bytes() >= total_bytes()
  std::vector<int64_t> offsets_{0};
};

// bytes from src to dst (segments or whole buffers of two ExchangeBuffers,
// not overlapping): memcpy between host buffers; otherwise through the ops
// of the device buffer among them (dst's when both are), on `stream`. A host
// dst is ready when it returns.
void copy_exchange_bytes(const ExchangeBuffer& dst_owner, char* dst,
                         const ExchangeBuffer& src_owner, const char* src, int64_t bytes,
                         Stream stream);

}  // namespace airmoe::comm
