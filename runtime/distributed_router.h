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
#include <optional>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/exchange_buffer.h"
#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/list_scan.h"
#include "router/query_lists.h"
#include "router/request_keys.h"
#include "router/routes.h"
#include "router/spilled_lists.h"
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
  // Of requests: finding the contenders with the request keys (none: 0).
  double contenders = 0.0;
  // Of scoring: expanding the requests' (token, list) pairs into the blocks
  // to scan (ops probe_pairs). Host seconds: on an asynchronous device it
  // times the launch, not the kernel.
  double scoring_pairs = 0.0;
};

// Everything one route call produced, handed back (the router keeps no
// "last call" state for its callers to read later).
struct RouteResult {
  Routes routes;
  ReceivedTokens received;
  RouteTimings timings;
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
  // Gates: GateMode::kChosen or kSigmoid (the same on every rank; a
  // shortlist softmax would need every serving rank's normalizer).
  // Phases: shortlist, send_requests, score_segments, send_replies, merge.
  RouteResult route_batch(MatrixView tokens, int k, int probes, GateMode mode = GateMode::kChosen);

  // Collective spherical k-means step: each rank's stats over its own
  // experts, one all-reduce, the same update everywhere; then the lists and
  // the placement's segments are refreshed (experts stay where they are).
  // Refused on every rank with query lists (their codebook is trained on
  // tokens): refresh_query_lists() instead.
  void sync_codebook(double step = 1.0, int updates = 1);
  // The optimizer moved this rank's centers (same rows, same order). Query
  // lists keep their membership (as AirRouter::set_centers).
  void set_local_centers(MatrixView local_centers);

  // Collective: query-aware lists (router/query_lists.h) built from the
  // sample tokens of every rank (`sample_tokens`: this rank's part, [T_r, d],
  // T_r may be 0; the whole sample is the parts in rank order). The lists
  // and codebook equal build_query_lists' on the whole sample, bit for bit,
  // whatever P and however the sample is split:
  //   - each part is routed exactly (every current list probed: dense, with
  //     the selection bias) by route_batch;
  //   - the codebook is trained on the tokens by k-means whose statistics
  //     are all-reduced like sync_codebook's (runtime/kmeans_sync.h), the
  //     seeding sample gathered from the ranks holding it;
  //   - the pick counts are summed by one int64 all-reduce (exact);
  //   - every rank builds the same lists from the total; the experts stay
  //     where they are, and each list's segments are on the owners of its
  //     members (an expert may sit in several lists).
  // Checked on every rank before data moves (all raise together): the
  // options equal everywhere, the parts' dimension, finite nonzero rows, a
  // sample that is not empty on every rank, k and L in [1, E], C in [1, T].
  void refresh_query_lists(MatrixView sample_tokens, const QueryListOptions& options);
  // Collective: lists built elsewhere (a re-plan hands the current ones to
  // the router under the new placement); the same on every rank, or all
  // raise.
  void set_query_lists(QueryLists lists);
  bool has_query_lists() const { return query_.has_value(); }
  // The query lists in use (their codebook is codebook()); none: nullopt.
  std::optional<QueryLists> query_lists() const;
  // What building the query lists cost, over all ranks' sample (0: none).
  double query_lists_build_flops() const { return query_ ? query_->build_flops : 0.0; }
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

  // Collective: prune the scoring requests with `bits`-bit copies of every
  // expert's key (router/request_keys.h; 2 to 16 bits, 0 turns it off),
  // gathered from their owners onto every rank (request_keys().bytes():
  // E (d + 20) bytes each, 2 d + 20 above 8 bits). A token's requests then go only to the owners
  // of its contenders, the shortlisted experts that may still be in its
  // top-k; the routes stay the same, bit for bit, for any P and bits. The
  // same bits on every rank, or all raise.
  // set_local_centers keeps the keys and gathers each expert's drift since
  // they were made instead (4 bytes per expert, the phase
  // "request_keys:drift"), which widens the bound; once some expert's drift
  // exceeds its key's own rounding error, the keys are made and gathered
  // again (E (d + 20) bytes, the phase "request_keys").
  void set_request_keys(int bits);
  const RequestKeys& request_keys() const { return request_keys_; }
  const RequestKeyCounts& request_key_counts() const { return request_key_counts_; }

  const Codebook& codebook() const { return codebook_; }
  // Each expert's primary list (with query lists: its first); stage 1
  // extends its probes by these lists' sizes.
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
  // Sets the routes' contenders from the request keys.
  void find_contenders(Routes& routes, MatrixView tokens) const;
  void gather_request_keys();  // collective
  void update_request_keys();  // collective: the centers moved
  void send_requests(const Routes& routes, MatrixView tokens);
  // `pairs_seconds`: what the probe_pairs expansion took.
  LocalTopK score_segments(int k, ReceivedTokens& received, double& pairs_seconds);
  ScanRequests read_requests(ReceivedTokens& received) const;
  void send_replies(const LocalTopK& best, const ReceivedTokens& received, int k);
  void merge(Routes& routes);
  // Codebook sync phases.
  void rebuild_blocks();
  // Collective: every expert's nearest codeword of `codebook`, from its owner.
  std::vector<int32_t> gathered_assignment(const Codebook& codebook);
  void gather_assignment();
  // The lists in use laid out: primary lists, segments, placement, blocks.
  void apply_query_lists();
  void set_query_shortlist_sizes(Routes& routes) const;
  Matrix checked_unit_rows(MatrixView local_centers) const;
  void keep_local_centers(MatrixView local_centers, Matrix unit);
  void update_key_norm_bound();  // collective

  comm::Communicator& comm_;
  Codebook codebook_;
  InvertedLists lists_;
  struct QueryState {
    QueryListOptions options;
    ListMembership membership;
    double build_flops = 0.0;
  };
  std::optional<QueryState> query_;  // set: the lists are query-aware
  ListSegments segments_;            // with query lists: all of them, replicated
  Placement placement_;
  std::vector<int32_t> local_ids_;
  Matrix local_centers_;  // rows of local_ids_
  Matrix local_unit_;     // normalized rows, for k-means
  ListBlocks blocks_;     // this rank's segment of every list, on the codebook's ops
  Tensor bias_;           // the selection bias of all E experts, on the same ops; empty: none
  int request_key_bits_ = 0;
  RequestKeys request_keys_;  // all E experts' (with request_key_bits_ > 0)
  Matrix keyed_centers_;      // this rank's centers when the keys were made
  RequestKeyCounts request_key_counts_;
  // Exchange buffers, reused across calls (their contents are per call).
  wire::Outbox requests_;
  comm::ExchangeBuffer requests_in_, replies_, replies_in_;
  // max(1, largest center norm over all ranks), for require_finite_logits.
  double key_norm_bound_ = 1.0;
};

}  // namespace airmoe::runtime
