#include "comm/communicator.h"

#include <stdexcept>

namespace airmoe::comm {

void Communicator::record_allreduce(size_t bytes) {
  const int p = size();
  if (p <= 1) return;
  // Ring reduce-scatter then ring allgather: P - 1 steps each, every step
  // sends one chunk of ceil(bytes / P) to the next rank.
  const int64_t chunk = static_cast<int64_t>((bytes + static_cast<size_t>(p) - 1) / p);
  const int next = (rank() + 1) % p;
  for (int step = 0; step < 2 * (p - 1); ++step) record(next, chunk);
}

namespace {

// 64-bit FNV-1a: fixed, so every rank (and every build) hashes alike.
uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace

void require_same_config(Communicator& comm, const std::string& config, const char* what) {
  const int p = comm.size();
  const uint64_t mine = fnv1a64(config);
  std::vector<uint64_t> all(static_cast<size_t>(p));
  comm.allgather(&mine, sizeof(mine), all.data());
  std::vector<int> differ;
  for (int r = 1; r < p; ++r)
    if (all[static_cast<size_t>(r)] != all[0]) differ.push_back(r);
  if (differ.empty()) return;
  std::string msg = "configuration mismatch (";
  msg += what ? what : "config";
  msg += differ.size() == 1 ? "): rank " : "): ranks ";
  for (size_t i = 0; i < differ.size(); ++i) {
    if (i) msg += ", ";
    msg += std::to_string(differ[i]);
  }
  msg += differ.size() == 1 ? " differs" : " differ";
  msg += " from rank 0";
  throw std::runtime_error(msg);
}

}  // namespace airmoe::comm
