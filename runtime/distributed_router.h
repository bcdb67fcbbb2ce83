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
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/exchange_buffer.h"
#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/list_scan.h"
#include "router/routes.h"
#include "runtime/placement.h"
#include "runtime/wire.h"

namespace airmoe::runtime {

// The token vectors a rank received for scoring in one route call, kept by
// the caller for the dispatch that follows: expert FFNs run where the tokens
// already are.
struct ReceivedTokens {
  std::vector<int32_t> home_rank;   // [R]
  std::vector<int32_t> home_token;  // [R], token index on its home rank
  Matrix vectors;                   // [R, d]
};

struct RouteTimings {
  double shortlist = 0.0, requests = 0.0, scoring = 0.0, replies = 0.0, merge = 0.0;
};

// Everything one route call produced, handed back (the router keeps no
// "last call" state for its callers to read later).
struct RouteResult {
  Routes routes;
  ReceivedTokens received;
  RouteTimings timings;
};

// Collective: `bias` checked on every rank (router/routes.h checked_bias; all
// raise together), then the ranks compare a digest, so a bias that differs
// between ranks fails everywhere instead of routing differently. Returns the
// checked copy on `compute`'s device. Every router the runtime replicates
// the bias into (distributed, dense-replicated) goes through here.
Tensor agreed_bias(comm::Communicator& comm, const Compute& compute, MatrixView bias,
                   int64_t experts);
// Collective: every rank clears its bias, or all raise.
void agree_no_bias(comm::Communicator& comm);

class DistributedRouter {
 public:
  // `assignment` is every expert's list (replicated); `local_centers` holds
  // the rows of placement.local_experts(comm.rank()), in that (ascending
  // id) order. Collective: checks that all ranks hold the same codebook,
  // lists and placement.
  DistributedRouter(comm::Communicator& comm, Codebook codebook, std::vector<int32_t> assignment,
                    Placement placement, MatrixView local_centers);

  // Collective. tokens: this rank's [T_r, d] (T_r may be 0).
  // Gates: GateMode::kChosen or kSigmoid (the same on every rank; a
  // shortlist softmax would need every serving rank's normalizer).
  // Phases: shortlist, send_requests, score_segments, send_replies, merge.
  RouteResult route_batch(MatrixView tokens, int k, int probes, GateMode mode = GateMode::kChosen);

  // Collective spherical k-means step: each rank's stats over its own
  // experts, one all-reduce, the same update everywhere; then the lists and
  // the placement's segments are refreshed (experts stay where they are).
  void sync_codebook(double step = 1.0, int updates = 1);
  // The optimizer moved this rank's centers (same rows, same order).
  void set_local_centers(MatrixView local_centers);
  // Collective: the selection bias b of all E experts (router/routes.h
  // checked_bias), replicated: the serving ranks rank their segments' experts
  // by z + b and the home rank merges by it, so the routes stay the
  // single-process AirRouter's for any P. Every rank checks its own (and all
  // raise together), then the ranks compare a digest: the same bias
  // everywhere, or nobody routes. Nothing else is rebuilt.
  void set_bias(MatrixView bias);
  void clear_bias();  // collective
  bool has_bias() const { return bias_.rows() > 0; }
  TensorView bias() const { return bias_; }  // f32 [E, 1] on the ops' device; empty: none

  const Codebook& codebook() const { return codebook_; }
  const InvertedLists& lists() const { return lists_; }
  const Placement& placement() const { return placement_; }
  const std::vector<int32_t>& local_experts() const { return local_ids_; }
  const Matrix& local_centers() const { return local_centers_; }
  comm::Communicator& communicator() { return comm_; }

 private:
  // Per received request, this rank's local top-k (id -1 past the end).
  struct LocalTopK {
    std::vector<float> z;
    std::vector<int32_t> id;
  };
  // The (request, probed list) pairs the received requests ask to scan, in
  // request order, and each request's range of them.
  struct ScanRequests {
    std::vector<int32_t> query;  // received request (row of the vectors)
    std::vector<int32_t> list;
    std::vector<int64_t> offsets;  // [R + 1]
  };

  void check_route_args(MatrixView tokens, int k, int probes, GateMode mode);
  Routes shortlist(MatrixView tokens, int k, int probes, GateMode mode) const;
  void send_requests(const Routes& routes, MatrixView tokens);
  LocalTopK score_segments(int k, ReceivedTokens& received);
  ScanRequests read_requests(ReceivedTokens& received) const;
  void send_replies(const LocalTopK& best, const ReceivedTokens& received, int k);
  void merge(Routes& routes);
  // Codebook sync phases.
  using RepairRow = std::pair<int32_t, std::vector<float>>;
  KMeansStats reduce_sums(const KMeansStats& local);
  void reduce_farthest(const KMeansStats& local, KMeansStats& total);
  std::vector<RepairRow> repair_rows(const KMeansStats& total);
  void rebuild_blocks();
  void gather_assignment();
  Matrix checked_unit_rows(MatrixView local_centers) const;
  void keep_local_centers(MatrixView local_centers, Matrix unit);
  void update_key_norm_bound();  // collective

  comm::Communicator& comm_;
  Codebook codebook_;
  InvertedLists lists_;
  Placement placement_;
  std::vector<int32_t> local_ids_;
  Matrix local_centers_;  // rows of local_ids_
  Matrix local_unit_;     // normalized rows, for k-means
  ListBlocks blocks_;     // this rank's segment of every list, on the codebook's ops
  Tensor bias_;           // the selection bias of all E experts, on the same ops; empty: none
  // Exchange buffers, reused across calls (their contents are per call).
  wire::Outbox requests_;
  comm::ExchangeBuffer requests_in_, replies_, replies_in_;
  // max(1, largest center norm over all ranks), for require_finite_logits.
  double key_norm_bound_ = 1.0;
};

}  // namespace airmoe::runtime
