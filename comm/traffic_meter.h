// Bytes and messages a rank sends, per named phase and per destination peer.
// Every Communicator call records into its meter, so traffic figures come
// from what was actually sent, not from formulas.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace airmoe::comm {

struct TrafficCounts {
  int64_t bytes = 0;
  int64_t messages = 0;
  TrafficCounts& operator+=(const TrafficCounts& o) {
    bytes += o.bytes;
    messages += o.messages;
    return *this;
  }
  bool operator==(const TrafficCounts&) const = default;
};

// An all-to-all-v first tells every other rank how many bytes follow: one
// message of kCountBytes per peer, metered under phase + kCountsSuffix.
inline constexpr int64_t kCountBytes = sizeof(int64_t);
inline constexpr const char* kCountsSuffix = ":counts";

class TrafficMeter {
 public:
  explicit TrafficMeter(int peers = 1);

  // One message of `bytes` to `peer` under `phase`.
  void record(const std::string& phase, int peer, int64_t bytes);

  TrafficCounts sent(const std::string& phase, int peer) const;
  TrafficCounts sent(const std::string& phase) const;  // over all peers
  TrafficCounts total() const;                         // over all phases and peers
  std::vector<std::string> phases() const;             // sorted
  // Per phase, one entry per peer.
  const std::map<std::string, std::vector<TrafficCounts>>& table() const { return table_; }
  int peers() const { return peers_; }
  void reset();

 private:
  int peers_;
  std::map<std::string, std::vector<TrafficCounts>> table_;
};

}  // namespace airmoe::comm
