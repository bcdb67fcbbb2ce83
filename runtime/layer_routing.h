// How the MoE layer routes: one interface, one implementation per strategy,
// chosen at construction (make_layer_routing). Each implementation owns what
// its strategy needs -- the codebook, the inverted lists, the placement and
// the router centers -- so the layer keeps no copy that a codebook sync or a
// center update could leave stale. The layer reads them through here.
//   air              DistributedRouting, probing m lists (layer_routing_distributed.h)
//   dense-broadcast  DistributedRouting, probing every list
//   dense-replicated DenseReplicatedRouting (layer_routing_dense_replicated.h)
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "comm/communicator.h"
#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/query_lists.h"
#include "router/routes.h"
#include "runtime/distributed_router.h"
#include "runtime/placement.h"

namespace airmoe::runtime {

enum class Strategy { kAir, kDenseReplicated, kDenseBroadcast };
const char* to_string(Strategy s);
Strategy strategy_from_string(const std::string& name);

// What one routing call hands the dispatch (nothing is kept for later).
struct RoutedBatch {
  Routes routes;  // this rank's tokens
  // Fused dispatch: the token vectors this rank received while routing,
  // keyed by (home rank, token). Empty when the dispatch ships the vectors.
  ReceivedTokens received;
  double router_flops_per_token = 0.0;  // mean over this rank's tokens
};

class LayerRouting {
 public:
  virtual ~LayerRouting() = default;
  virtual Strategy strategy() const = 0;

  // Collective: routes this rank's tokens to k experts each.
  virtual RoutedBatch route(MatrixView tokens, int k) = 0;
  // True when the serving ranks do not hold the token vectors after routing,
  // so the dispatch must carry them.
  virtual bool dispatch_ships_vectors() const = 0;

  // Collective, called on every rank when some rank's centers moved: this
  // rank's hosted rows (checked by the caller) become the routing centers.
  virtual void set_local_centers(MatrixView local_centers) = 0;
  // Collective: the adaptive codebook step, or a UsageError on every rank
  // where the strategy has no codebook to sync.
  virtual void sync_codebook(double step) = 0;
  // Collective: query-aware lists from this rank's part of a sample
  // (DistributedRouter::refresh_query_lists), or a UsageError on every rank
  // where the strategy has no lists. With air, C must be at least the
  // probes m; dense-broadcast probes all C of the new codebook.
  virtual void refresh_query_lists(MatrixView sample_tokens, const QueryListOptions& options) = 0;
  virtual bool has_query_lists() const = 0;
  // The query lists in use (their codebook is codebook()), or none.
  virtual std::optional<QueryLists> query_lists() const = 0;
  // Collective: query lists built elsewhere (a checkpoint's), the same on
  // every rank: routes as the layer that built them did. Refused on every
  // rank where the strategy has no lists.
  virtual void set_query_lists(QueryLists lists) = 0;
  // What building the query lists in use cost (0: none).
  virtual double query_lists_build_flops() const = 0;
  // Collective, after a re-plan's migration: the new placement and this
  // rank's hosted rows under it.
  virtual void move_experts(Placement placement, MatrixView local_centers) = 0;
  // Collective: the selection bias of all E experts (runtime/selection_bias.h: checked on
  // every rank, the same everywhere); experts are selected by z + b, gates
  // come from z. It survives set_local_centers, sync_codebook and
  // move_experts.
  virtual void set_bias(MatrixView bias) = 0;
  virtual void clear_bias() = 0;        // collective
  virtual TensorView bias() const = 0;  // f32 [E, 1]; empty: none
  // How the request keys were kept current (none: zeros).
  virtual RequestKeyCounts request_key_counts() const = 0;
  // Collective: request keys of `bits` bits from now on (0: off); checked
  // by the caller. dense-replicated sends no requests and ignores them.
  virtual void set_request_keys(int bits) = 0;

  virtual const Codebook& codebook() const = 0;
  virtual const InvertedLists& lists() const = 0;
  virtual const Placement& placement() const = 0;
  // This rank's hosted centers, rows in placement().local_experts(rank) order.
  virtual const Matrix& local_centers() const = 0;
};

// centers: every expert's center [E, d] as this rank knows it (checked by
// the caller). request_key_bits: air and dense-broadcast prune their scoring
// requests with keys of that many bits (DistributedRouter::set_request_keys;
// 0: off); dense-replicated sends none and ignores it. Collective.
std::unique_ptr<LayerRouting> make_layer_routing(comm::Communicator& comm, Strategy strategy,
                                                 int probes, Codebook codebook,
                                                 std::vector<int32_t> assignment,
                                                 Placement placement, MatrixView centers,
                                                 int request_key_bits = 0);

// The rows of `centers` a rank hosts, in local_experts order.
Matrix hosted_rows(MatrixView centers, const std::vector<int32_t>& ids);

}  // namespace airmoe::runtime
