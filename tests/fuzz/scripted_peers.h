// The fuzz targets' view of the other ranks (tests/fuzz/): one rank `me` of
// P whose peers are scripted. Every message "from" another rank in an
// all-to-all is the next chunk of a script (the fuzz input); every collective
// sees the other ranks agree with this one, so the set-up checks pass and
// what is fuzzed is the decoding of the received messages.
//
// A script is a sequence of chunks, each a 2-byte little-endian length and
// that many bytes (cut short at the end of the script); the chunks are taken
// in order of exchange, then of source rank. An exhausted script sends
// nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace airmoe::fuzz {

class ScriptedPeers final : public comm::Communicator {
 public:
  ScriptedPeers(int ranks, int me, std::span<const uint8_t> script)
      : Communicator(ranks), ranks_(ranks), me_(me), script_(script) {}

  int rank() const override { return me_; }
  int size() const override { return ranks_; }
  const char* backend() const override { return "scripted"; }

  void barrier() override {}
  void broadcast(void*, size_t, int) override {}  // the root holds what this rank holds
  void allgather(const void* send, size_t bytes, void* recv) override {
    for (int q = 0; q < ranks_; ++q)
      std::memmove(static_cast<char*>(recv) + static_cast<size_t>(q) * bytes, send, bytes);
  }
  std::vector<char> allgatherv(const void* send, size_t bytes,
                               std::vector<int64_t>& counts) override {
    counts.assign(static_cast<size_t>(ranks_), static_cast<int64_t>(bytes));
    std::vector<char> out;
    for (int q = 0; q < ranks_; ++q)
      out.insert(out.end(), static_cast<const char*>(send), static_cast<const char*>(send) + bytes);
    return out;
  }
  // Every rank contributes what this one does.
  void allreduce_sum(int64_t* data, size_t count) override {
    for (size_t i = 0; i < count; ++i) data[i] *= ranks_;
  }
  void allreduce_max(double*, size_t) override {}
  void allreduce_min(double*, size_t) override {}
  comm::ExchangeKind exchange_kind() const override { return comm::ExchangeKind::kSparse; }

 protected:
  // This rank's own segment stays; every other rank's is the next chunk.
  // The peers never fail (a failure of this rank is its own: reported back).
  ExchangeFailure exchange_bytes(const comm::ExchangeBuffer& send, comm::ExchangeBuffer& recv,
                                 Stream, const std::string& failure) override {
    if (!failure.empty()) return {me_, failure};
    std::vector<std::vector<char>> from(static_cast<size_t>(ranks_));
    std::vector<int64_t> bytes(static_cast<size_t>(ranks_));
    for (int q = 0; q < ranks_; ++q) {
      const std::span<const char> own = send.segment(q);
      from[q] = q == me_ ? std::vector<char>(own.begin(), own.end()) : next_chunk();
      bytes[q] = static_cast<int64_t>(from[q].size());
    }
    recv.reset(bytes);
    for (int q = 0; q < ranks_; ++q)
      if (!from[q].empty()) std::memcpy(recv.begin(q), from[q].data(), from[q].size());
    return {};
  }
  bool moves_device_buffers() const override { return false; }  // host buffers only

 private:
  std::vector<char> next_chunk() {
    if (script_.size() < 2) return {};
    const size_t n = std::min<size_t>(script_[0] | (size_t{script_[1]} << 8), script_.size() - 2);
    std::vector<char> chunk(script_.begin() + 2, script_.begin() + 2 + static_cast<ptrdiff_t>(n));
    script_ = script_.subspan(2 + n);
    return chunk;
  }

  int ranks_, me_;
  std::span<const uint8_t> script_;
};

}  // namespace airmoe::fuzz
