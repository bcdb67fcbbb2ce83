// AIR routing across ranks. Each rank routes its own tokens against experts
// it mostly does not hold:
//   1. shortlist locally against the replicated codebook;
//   2. send each token (vector + the probed codewords that rank hosts a
//      segment of) only to the ranks hosting a segment of a probed list;
//   3. those ranks scan their segments and reply with a local top-k;
//   4. the home rank merges to the global top-k and forms the gates.
// The result equals the single-process AirRouter's, bit for bit, for any
// number of ranks and any placement.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/list_scan.h"
#include "router/routes.h"
#include "runtime/placement.h"

namespace airmoe::runtime {

// The token vectors a rank received for scoring in the last route() call,
// kept for the dispatch that follows: expert FFNs run where the tokens
// already are.
struct ReceivedTokens {
  std::vector<int32_t> home_rank;   // [R]
  std::vector<int32_t> home_token;  // [R], token index on its home rank
  Matrix vectors;                   // [R, d]
};

struct RouteTimings {
  double shortlist = 0.0, requests = 0.0, scoring = 0.0, replies = 0.0, merge = 0.0;
};

class DistributedRouter {
 public:
  // `assignment` is every expert's list (replicated); `local_centers` holds
  // the rows of placement.local_experts(comm.rank()), in that (ascending
  // id) order. Collective: checks that all ranks hold the same codebook,
  // lists and placement.
  DistributedRouter(comm::Communicator& comm, Codebook codebook, std::vector<int32_t> assignment,
                    Placement placement, MatrixView local_centers);

  // Collective. tokens: this rank's [T_r, d] (T_r may be 0).
  // Gates: GateMode::kChosen.
  Routes route(MatrixView tokens, int k, int probes);

  // Collective spherical k-means step: each rank's stats over its own
  // experts, one all-reduce, the same update everywhere; then the lists and
  // the placement's segments are refreshed (experts stay where they are).
  void sync_codebook(double step = 1.0, int updates = 1);
  // The optimizer moved this rank's centers (same rows, same order).
  void set_local_centers(MatrixView local_centers);

  const Codebook& codebook() const { return codebook_; }
  const InvertedLists& lists() const { return lists_; }
  const Placement& placement() const { return placement_; }
  const std::vector<int32_t>& local_experts() const { return local_ids_; }
  const ReceivedTokens& received() const { return received_; }
  const RouteTimings& timings() const { return timings_; }
  comm::Communicator& communicator() { return comm_; }

 private:
  void rebuild_blocks();
  void gather_assignment();
  // Collective: key_norm_bound_ from every rank's centers.
  void update_key_norm_bound();

  comm::Communicator& comm_;
  Codebook codebook_;
  InvertedLists lists_;
  Placement placement_;
  std::vector<int32_t> local_ids_;
  Matrix local_centers_;  // rows of local_ids_
  Matrix local_unit_;     // normalized rows, for k-means
  ListBlocks blocks_;     // this rank's segment of every list
  ReceivedTokens received_;
  RouteTimings timings_;
  // max(1, largest center norm over all ranks): lets the home rank refuse a
  // token whose logits could overflow before any request leaves it.
  double key_norm_bound_ = 1.0;
};

}  // namespace airmoe::runtime
