// air and dense-broadcast: the distributed router, which owns the codebook,
// lists, placement and this rank's centers. air probes m lists per token;
// dense-broadcast probes all C (every token reaches every rank hosting a
// segment: exact routing with sharded centers). The scoring ranks keep the
// token vectors they received, so the dispatch sends decisions only.
#pragma once

#include <memory>

#include "runtime/layer_routing.h"

namespace airmoe::runtime {

class DistributedRouting final : public LayerRouting {
 public:
  // probes: m for air, or the codebook size for dense-broadcast.
  DistributedRouting(comm::Communicator& comm, Strategy strategy, int probes, Codebook codebook,
                     std::vector<int32_t> assignment, Placement placement, MatrixView local_centers,
                     int request_key_bits = 0);

  Strategy strategy() const override { return strategy_; }
  RoutedBatch route(MatrixView tokens, int k) override;
  bool dispatch_ships_vectors() const override { return false; }
  void set_local_centers(MatrixView local_centers) override;
  void sync_codebook(double step) override;
  void refresh_query_lists(MatrixView sample_tokens, const QueryListOptions& options) override;
  bool has_query_lists() const override { return router_->has_query_lists(); }
  std::optional<QueryLists> query_lists() const override { return router_->query_lists(); }
  void set_query_lists(QueryLists lists) override;
  double query_lists_build_flops() const override { return router_->query_lists_build_flops(); }
  void move_experts(Placement placement, MatrixView local_centers) override;
  void set_bias(MatrixView bias) override { router_->set_bias(bias); }
  void clear_bias() override { router_->clear_bias(); }
  TensorView bias() const override { return router_->bias(); }
  RequestKeyCounts request_key_counts() const override { return router_->request_key_counts(); }
  void set_request_keys(int bits) override { router_->set_request_keys(bits); }

  const Codebook& codebook() const override { return router_->codebook(); }
  const InvertedLists& lists() const override { return router_->lists(); }
  const Placement& placement() const override { return router_->placement(); }
  const Matrix& local_centers() const override { return router_->local_centers(); }

 private:
  void require_probes_fit(int64_t codewords, const char* call);

  comm::Communicator& comm_;
  Strategy strategy_;
  int probes_;
  std::unique_ptr<DistributedRouter> router_;
};

}  // namespace airmoe::runtime
