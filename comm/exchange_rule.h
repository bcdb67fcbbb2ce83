// How one variable all-to-all is metered: the one rule the backends record
// (Communicator::exchange, by the communicator's exchange_kind()) and the
// simulator (runtime/simulator.h) counts, so the two cannot drift.
//
// Payload: one message per non-empty segment to another rank (self-sends
// stay local), metered under the phase, whatever the kind.
// Control traffic, on top of the payload, per rank and per call:
//   kCountsFirst (NCCL; an MPI_Alltoallv-style all-to-all): every rank
//           first tells every other rank how many bytes follow: P - 1
//           messages of kCountBytes under phase + ":counts". NCCL needs
//           it: a receive must be posted with its size.
//   kSparse (the in-process and MPI backends): the nonblocking consensus
//           (Hoefler, Siebert, Lumsdaine, PPoPP 2010): synchronous sends of
//           the payload only, then a nonblocking barrier. The barrier is
//           metered as a dissemination barrier: ceil(log2 P) rounds, in
//           round i one message to rank + 2^i (mod P), under phase +
//           ":barrier". Its messages carry no payload and are metered as 0
//           bytes (their envelope is the transport's, as for every other
//           message).
#pragma once

#include <cstdint>

#include "comm/traffic_meter.h"

namespace airmoe::comm {

enum class ExchangeKind { kSparse, kCountsFirst };

// "sparse", "counts-first".
inline const char* to_string(ExchangeKind kind) {
  return kind == ExchangeKind::kCountsFirst ? "counts-first" : "sparse";
}

inline constexpr const char* kBarrierSuffix = ":barrier";
inline constexpr int64_t kBarrierBytes = 0;

// Rounds of a dissemination barrier over `ranks`: ceil(log2 ranks).
inline int barrier_rounds(int ranks) {
  int rounds = 0;
  for (int64_t reach = 1; reach < ranks; reach *= 2) ++rounds;
  return rounds;
}

// True when a segment of `bytes` from rank `from` to rank `to` is a message.
inline bool is_payload_message(int from, int to, int64_t bytes) {
  return from != to && bytes > 0;
}

// The suffix of the phase under which `kind`'s control messages are metered.
inline const char* control_suffix(ExchangeKind kind) {
  return kind == ExchangeKind::kCountsFirst ? kCountsSuffix : kBarrierSuffix;
}

// Calls message(peer, bytes) for each control message rank `rank` of `ranks`
// sends in one call of `kind` (see above).
template <typename Message>
void for_each_control_message(ExchangeKind kind, int rank, int ranks, Message&& message) {
  if (kind == ExchangeKind::kCountsFirst) {
    for (int p = 0; p < ranks; ++p)
      if (p != rank) message(p, kCountBytes);
    return;
  }
  const int rounds = barrier_rounds(ranks);
  for (int i = 0; i < rounds; ++i)
    message(static_cast<int>((rank + (int64_t{1} << i)) % ranks), kBarrierBytes);
}

// What for_each_control_message sends in all, per rank and per call.
// The same for every rank, so rank 0's messages are counted.
inline TrafficCounts control_traffic(ExchangeKind kind, int ranks) {
  TrafficCounts sum;
  for_each_control_message(kind, 0, ranks, [&](int, int64_t bytes) { sum += {bytes, 1}; });
  return sum;
}

}  // namespace airmoe::comm
