// dense-replicated, standard expert parallelism (Megatron, DeepSpeed, Tutel):
// every rank holds all E centers and routes exactly and locally; the
// dispatch then carries the token vectors to the experts' ranks. It keeps the
// codebook and lists only for re-planning; routing is exact, so there is no
// codebook to sync.
#pragma once

#include "router/dense_router.h"
#include "runtime/layer_routing.h"

namespace airmoe::runtime {

class DenseReplicatedRouting final : public LayerRouting {
 public:
  DenseReplicatedRouting(comm::Communicator& comm, Codebook codebook,
                         std::vector<int32_t> assignment, Placement placement, MatrixView centers);

  Strategy strategy() const override { return Strategy::kDenseReplicated; }
  RoutedBatch route(MatrixView tokens, int k) override;
  bool dispatch_ships_vectors() const override { return true; }
  void set_local_centers(MatrixView local_centers) override;
  void sync_codebook(double step) override;
  void refresh_query_lists(MatrixView sample_tokens, const QueryListOptions& options) override;
  bool has_query_lists() const override { return false; }
  std::optional<QueryLists> query_lists() const override { return std::nullopt; }
  void set_query_lists(QueryLists lists) override;
  double query_lists_build_flops() const override { return 0.0; }
  RequestKeyCounts request_key_counts() const override { return {}; }
  void set_request_keys(int) override {}
  void move_experts(Placement placement, MatrixView local_centers) override;
  void set_bias(MatrixView bias) override;
  void clear_bias() override;
  TensorView bias() const override { return router_.bias(); }

  const Codebook& codebook() const override { return codebook_; }
  const InvertedLists& lists() const override { return lists_; }
  const Placement& placement() const override { return placement_; }
  const Matrix& local_centers() const override { return local_centers_; }

 private:
  void refuse_query_lists(const char* call);  // collective: on every rank

  comm::Communicator& comm_;
  Codebook codebook_;
  InvertedLists lists_;
  Placement placement_;
  Matrix local_centers_;  // hosted rows, in local_experts order
  DenseRouter router_;    // all E centers: the replica
};

}  // namespace airmoe::runtime
