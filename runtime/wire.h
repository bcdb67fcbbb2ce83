// What each phase of distributed routing and of the MoE layer puts on the
// wire: the builders of the home rank's send buffers and the sizes of the
// fixed records that flow back. The runtime sends exactly these; the traffic
// simulator counts exactly these, so the two cannot drift apart.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/matrix.h"
#include "router/routes.h"
#include "runtime/placement.h"

namespace airmoe::runtime::wire {

template <typename T>
void put(std::vector<char>& buf, const T* data, size_t n) {
  const size_t at = buf.size();
  buf.resize(at + n * sizeof(T));
  if (n) std::memcpy(buf.data() + at, data, n * sizeof(T));
}

template <typename T>
T take(const std::vector<char>& buf, size_t& at) {
  T v;
  std::memcpy(&v, buf.data() + at, sizeof(T));
  at += sizeof(T);
  return v;
}

inline void take_n(const std::vector<char>& buf, size_t& at, float* out, size_t n) {
  if (n) std::memcpy(out, buf.data() + at, n * sizeof(float));
  at += n * sizeof(float);
}

// Per (token, target rank) records of a batch, and where each token's went.
struct Outbox {
  std::vector<std::vector<char>> send;  // per rank
  std::vector<int64_t> target_offsets;  // [T + 1]
  std::vector<int32_t> targets;         // ascending per token
  // kDispatch only: per (token, target), the token's slots that rank serves.
  std::vector<int64_t> slot_offsets{0};
  std::vector<int32_t> slots;
};

// Scoring requests: to each rank hosting a segment of a probed list,
// (token, n, n probed codewords it hosts, d floats).
Outbox scoring_requests(const Placement& placement, const std::vector<int64_t>& probe_offsets,
                        const std::vector<int32_t>& probes, MatrixView tokens, int ranks);

// Expert dispatch: to each rank hosting a chosen expert, (token, n,
// n x (expert id, gate)) and, when the vectors travel (dense-replicated),
// the d floats.
Outbox expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                       bool ship_vectors, int ranks);

// The size of one record the builders above write (the simulator counts
// these without building the buffers; a test holds them equal): a request
// for `codewords` probed codewords, a dispatch of `experts` chosen experts.
inline int64_t request_record_bytes(int64_t codewords, int64_t d) {
  return 4 * (2 + codewords + d);
}
inline int64_t dispatch_record_bytes(int64_t experts, int64_t d, bool ship_vectors) {
  return 4 * (2 + 2 * experts) + (ship_vectors ? 4 * d : 0);
}

// Records flowing back per (token, target) record, and the backward's.
inline int64_t reply_bytes(int k) {
  return 8 * static_cast<int64_t>(k);
}  // k (id, logit)
inline int64_t vector_bytes(int64_t d) {
  return 4 * d;
}  // combine, grad dispatch / combine
inline int64_t per_pair_bytes(int64_t pairs) {
  return 4 * pairs;
}  // grad gates, grad logits

}  // namespace airmoe::runtime::wire
