#include "runtime/layer_routing_distributed.h"

#include <optional>
#include <string>

#include "core/checks.h"
#include "router/metrics.h"

namespace airmoe::runtime {

DistributedRouting::DistributedRouting(comm::Communicator& comm, Strategy strategy, int probes,
                                       Codebook codebook, std::vector<int32_t> assignment,
                                       Placement placement, MatrixView local_centers,
                                       int request_key_bits)
    : comm_(comm),
      strategy_(strategy),
      probes_(probes),
      router_(std::make_unique<DistributedRouter>(comm, std::move(codebook), std::move(assignment),
                                                  std::move(placement), local_centers)) {
  if (request_key_bits != 0) router_->set_request_keys(request_key_bits);
}

RoutedBatch DistributedRouting::route(MatrixView tokens, int k) {
  RouteResult result = router_->route_batch(tokens, k, probes_);
  RoutedBatch batch;
  // Stage 1 against all C codewords, stage 2 against the shortlist. With
  // request keys the home rank first bounds the whole shortlist with them
  // (as many multiply-adds again); the owners then scan only the kept
  // ranks' share, counted here as the whole shortlist (an upper bound).
  const auto d = static_cast<double>(codebook().dim());
  const double stage2 = 2.0 * shortlist_stats(result.routes).mean * d;
  batch.router_flops_per_token = 2.0 * static_cast<double>(codebook().size()) * d + stage2 +
                                 (router_->request_keys().empty() ? 0.0 : stage2);
  batch.routes = std::move(result.routes);
  batch.received = std::move(result.received);
  return batch;
}

void DistributedRouting::set_local_centers(MatrixView local_centers) {
  router_->set_local_centers(local_centers);
}

void DistributedRouting::sync_codebook(double step) {
  router_->sync_codebook(step, 1);
}

// Collective: air probes m of the query lists' C codewords.
void DistributedRouting::require_probes_fit(int64_t codewords, const char* call) {
  comm::check_together(comm_, call, [&] {
    if (strategy_ == Strategy::kAir && codewords < probes_)
      fail("query lists: C = " + std::to_string(codewords) +
           " codewords are fewer than the layer's probes m = " + std::to_string(probes_));
  });
}

void DistributedRouting::refresh_query_lists(MatrixView sample_tokens,
                                             const QueryListOptions& options) {
  require_probes_fit(options.codewords, "refresh_query_lists");
  router_->refresh_query_lists(sample_tokens, options);
  if (strategy_ == Strategy::kDenseBroadcast) probes_ = static_cast<int>(codebook().size());
}

void DistributedRouting::set_query_lists(QueryLists lists) {
  require_probes_fit(lists.codebook.size(), "set_query_lists");
  router_->set_query_lists(std::move(lists));
  if (strategy_ == Strategy::kDenseBroadcast) probes_ = static_cast<int>(codebook().size());
}

void DistributedRouting::move_experts(Placement placement, MatrixView local_centers) {
  // The codebook, lists and bias are the router's current ones (synced or
  // not); the bias is agreed again, as every rank moves together.
  auto next =
      std::make_unique<DistributedRouter>(comm_, router_->codebook(), router_->lists().assignment(),
                                          std::move(placement), local_centers);
  if (router_->has_bias()) next->set_bias(router_->bias().matrix());
  if (std::optional<QueryLists> query = router_->query_lists())
    next->set_query_lists(std::move(*query));
  if (const int bits = router_->request_keys().bits()) next->set_request_keys(bits);
  router_ = std::move(next);
}

}  // namespace airmoe::runtime
