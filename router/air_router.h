// Adaptive inverted-index routing (AIR): a spherical k-means codebook picks a
// shortlist (the inverted lists of the token's top-m codewords), and exact
// logits are computed only on that shortlist, grouped by list: the tokens
// that probe a list are scored against its members in one block GEMM.
#pragma once

#include <cstdint>
#include <optional>

#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/list_scan.h"
#include "router/query_lists.h"
#include "router/routes.h"
#include "router/spilled_lists.h"

namespace airmoe::inline router {

// How experts are laid out in the inverted lists. Off by default: both
// options trade list building time for recall at an equal shortlist, and are
// single-process options (the distributed runtime uses plain lists).
struct ListOptions {
  // Balanced lists: at most list_cap experts have a list as their primary
  // (0: no cap); an expert whose nearest list is full goes to its next
  // nearest with room, so every probe costs about the same.
  int64_t list_cap = 0;
  // Spilled lists: each expert also sits in `spills` more lists, chosen by
  // SOAR with weight spill_lambda; with a cap, each list takes at most
  // spills * list_cap spilled entries.
  int spills = 0;
  double spill_lambda = 1.0;
};

struct AirConfig {
  int64_t codewords = 256;
  int kmeans_iterations = 10;
  uint64_t seed = 1234;
  int64_t list_cap = 0;  // 0: no cap
  int spills = 0;        // see ListOptions
  double spill_lambda = 1.0;
};

class AirRouter {
 public:
  // Trains the codebook on `centers` ([E, d], finite, no zero row).
  AirRouter(MatrixView centers, const AirConfig& config, Compute compute = host_compute());
  // Uses a given codebook (its dimension must match); the router runs on
  // the codebook's ops.
  AirRouter(MatrixView centers, Codebook codebook, int64_t list_cap = 0);
  AirRouter(MatrixView centers, Codebook codebook, const ListOptions& options);
  // Query-aware lists (router/query_lists.h): a codebook trained on
  // `sample_tokens` and each codeword's list the experts their exact top-k
  // under `bias` (empty: none; it becomes the router's bias) picks most.
  // The sample should be tokens the router will not be measured on.
  AirRouter(MatrixView centers, TensorView bias, MatrixView sample_tokens,
            const QueryListOptions& options, Compute compute = host_compute());
  // Query lists built elsewhere (e.g. from all-reduced PickCounts); the
  // router runs on their codebook's ops. Their membership must be over
  // centers.rows experts.
  AirRouter(MatrixView centers, QueryLists lists);

  int64_t experts() const { return centers_.rows(); }
  int64_t dim() const { return centers_.cols(); }
  int64_t codewords() const { return codebook_.size(); }
  const Compute& compute() const { return codebook_.compute(); }
  // Later calls run on `stream` (the caller's CUDA stream; the host ignores it).
  void set_stream(Stream stream) { codebook_.set_stream(stream); }
  // The centers by expert id on the ops' device; as a MatrixView only with
  // host ops.
  TensorView keys() const { return centers_; }
  MatrixView centers() const { return centers_.view().matrix(); }
  const Codebook& codebook() const { return codebook_; }
  // Each expert's primary list (what the distributed runtime places).
  const InvertedLists& lists() const { return lists_; }
  // The lists as stage 2 scans them: with spills, more entries than experts.
  const ListSegments& segments() const { return segments_; }
  const ListOptions& list_options() const { return options_; }
  // Whether the lists are query-aware, and what building them last cost.
  bool has_query_lists() const { return query_.has_value(); }
  double query_lists_build_flops() const { return query_ ? query_->build_flops : 0.0; }
  // The query lists' membership (each expert's lists, CSR, in priority
  // order), what a saved router restores them from; null for plain lists.
  const ListMembership* query_membership() const { return query_ ? &query_->membership : nullptr; }

  // The selection bias b (router/routes.h checked_bias: E finite entries):
  // experts are selected by z + b, gates formed from the unbiased z. A copy
  // and a check; nothing else is rebuilt, so it may change every step.
  void set_bias(TensorView bias);
  void clear_bias() { bias_ = Tensor(); }
  TensorView bias() const { return bias_; }  // f32 [E, 1] on the ops' device; empty: none

  // Probes the top `probes` codewords (1 <= probes <= C), and more, in score
  // order, until the shortlist holds at least k experts. `probes` is a
  // per-call knob: nothing is rebuilt when it changes.
  Routes route(MatrixView tokens, int k, int probes, GateMode mode = GateMode::kChosen) const;
  DeviceRoutes route(TensorView tokens, int k, int probes, GateMode mode = GateMode::kChosen) const;
  RouterGradients backward(MatrixView tokens, const Routes& routes, MatrixView d_gates) const;
  DeviceRouterGradients backward(TensorView tokens, const DeviceRoutes& routes,
                                 TensorView d_gates) const;

  // Training: the optimizer moved W. The codebook stays as it is and the
  // lists are rebuilt against it; call update_codebook() to adapt it. The
  // bias stays, unless the expert count changed (then it is cleared).
  // Query lists keep their membership (the expert count may not change):
  // they go stale as the centers and the bias move, since they hold the
  // winners of the centers and bias they were counted under (set_bias
  // keeps them too); refresh_lists() recounts them.
  void set_centers(MatrixView centers);
  // `updates` adaptive k-means steps (EMA weight `step`) on the current
  // centers, then the lists are rebuilt. Not for query lists (their
  // codebook is trained on tokens): use refresh_lists().
  void update_codebook(double step = 1.0, int updates = 1);
  // Query lists only: rebuilt (codebook and counts, the same options) from
  // `sample_tokens` routed exactly under the current centers and bias. Its
  // cost is query_lists_build_flops().
  void refresh_lists(MatrixView sample_tokens);

  // 2 C d for the probe scores plus 2 d per shortlisted expert (with spills
  // or query lists, each distinct expert counts once: it is scored once).
  // Building query lists is counted apart (query_lists_build_flops()).
  double flops_per_token(double mean_shortlist) const;

 private:
  void rebuild_lists();
  // The lists of each expert in priority order, CSR: what ListSegments takes.
  ListMembership center_lists() const;

  Codebook codebook_;    // and the ops everything here runs on
  Tensor centers_;       // [E, d], by expert id
  Tensor unit_centers_;  // normalized rows, for assignment and k-means
  ListOptions options_;
  struct QueryState {
    QueryListOptions options;
    ListMembership membership;
    double build_flops = 0.0;
  };
  std::optional<QueryState> query_;  // set: the lists are query-aware
  InvertedLists lists_;              // primary lists
  Tensor list_sizes_;                // their sizes, for stage 1
  Tensor bias_;                      // the selection bias; empty: none
  ListSegments segments_;            // primary and spilled entries, cut for deduplication
  ListBlocks blocks_;                // centers_ rows segment after segment: one block each
  // max(1, largest center norm): bounds both the probe scores (unit
  // codewords) and the logits, for check_route_args.
  double key_norm_bound_ = 1.0;
};

}  // namespace airmoe::inline router
