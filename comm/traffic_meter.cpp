#include "comm/traffic_meter.h"

#include <stdexcept>

namespace airmoe::comm {

TrafficMeter::TrafficMeter(int peers) : peers_(peers) {
  if (peers < 1)
    throw std::invalid_argument("TrafficMeter: peers must be >= 1, got " + std::to_string(peers));
}

void TrafficMeter::record(const std::string& phase, int peer, int64_t bytes) {
  if (peer < 0 || peer >= peers_)
    throw std::out_of_range("TrafficMeter::record: peer " + std::to_string(peer) +
                            " out of range [0, " + std::to_string(peers_) + ")");
  if (bytes < 0)
    throw std::invalid_argument("TrafficMeter::record: negative byte count " +
                                std::to_string(bytes));
  auto it = table_.find(phase);
  if (it == table_.end())
    it = table_.emplace(phase, std::vector<TrafficCounts>(static_cast<size_t>(peers_))).first;
  TrafficCounts& c = it->second[static_cast<size_t>(peer)];
  c.bytes += bytes;
  c.messages += 1;
}

TrafficCounts TrafficMeter::sent(const std::string& phase, int peer) const {
  if (peer < 0 || peer >= peers_)
    throw std::out_of_range("TrafficMeter::sent: peer " + std::to_string(peer) +
                            " out of range [0, " + std::to_string(peers_) + ")");
  auto it = table_.find(phase);
  if (it == table_.end()) return {};
  return it->second[static_cast<size_t>(peer)];
}

TrafficCounts TrafficMeter::sent(const std::string& phase) const {
  TrafficCounts sum;
  auto it = table_.find(phase);
  if (it == table_.end()) return sum;
  for (const TrafficCounts& c : it->second) sum += c;
  return sum;
}

TrafficCounts TrafficMeter::total() const {
  TrafficCounts sum;
  for (const auto& [phase, per_peer] : table_)
    for (const TrafficCounts& c : per_peer) sum += c;
  return sum;
}

std::vector<std::string> TrafficMeter::phases() const {
  std::vector<std::string> out;
  out.reserve(table_.size());
  for (const auto& entry : table_) out.push_back(entry.first);  // std::map: already sorted
  return out;
}

void TrafficMeter::reset() {
  table_.clear();
}

}  // namespace airmoe::comm
