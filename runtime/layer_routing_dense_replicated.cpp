#include "runtime/layer_routing_dense_replicated.h"

#include <algorithm>

#include "core/checks.h"
#include "runtime/selection_bias.h"

namespace airmoe::runtime {

DenseReplicatedRouting::DenseReplicatedRouting(comm::Communicator& comm, Codebook codebook,
                                               std::vector<int32_t> assignment, Placement placement,
                                               MatrixView centers)
    : comm_(comm),
      codebook_(std::move(codebook)),
      lists_(assignment, codebook_.size()),
      placement_(std::move(placement)),
      local_centers_(hosted_rows(centers, placement_.local_experts(comm.rank()))),
      router_(centers) {}

RoutedBatch DenseReplicatedRouting::route(MatrixView tokens, int k) {
  comm::check_together(comm_, "MoE forward", [&] {
    check_route_args(tokens, router_.dim(), k, router_.experts(), router_.key_norm_bound());
  });
  RoutedBatch batch;
  batch.routes = router_.route(tokens, k);
  batch.router_flops_per_token = router_.flops_per_token();
  return batch;
}

void DenseReplicatedRouting::set_local_centers(MatrixView local_centers) {
  std::copy_n(local_centers.data, local_centers_.size(), local_centers_.data());
  // Every replica takes every rank's new rows.
  const int64_t d = codebook_.dim();
  std::vector<int32_t> ids;
  std::vector<float> rows;
  {
    comm::PhaseScope phase(comm_, "center_sync");
    ids = comm::allgatherv_vector<int32_t>(comm_, placement_.local_experts(comm_.rank()));
    rows = comm::allgatherv_vector<float>(
        comm_, std::span<const float>(local_centers_.data(), local_centers_.size()));
  }
  const MatrixView old = router_.centers();
  Matrix all(old.rows, old.cols);
  std::copy_n(old.data, old.rows * old.cols, all.data());
  for (size_t i = 0; i < ids.size(); ++i)
    std::copy_n(rows.data() + i * static_cast<size_t>(d), d, all.row(ids[i]));
  DenseRouter next(all.view());
  if (router_.bias().rows > 0) next.set_bias(router_.bias());  // the bias stays
  router_ = std::move(next);
}

void DenseReplicatedRouting::set_bias(MatrixView bias) {
  router_.set_bias(agreed_bias(comm_, router_.compute(), bias, router_.experts()));
}

void DenseReplicatedRouting::clear_bias() {
  agree_no_bias(comm_);
  router_.clear_bias();
}

void DenseReplicatedRouting::sync_codebook(double) {
  comm::check_together(comm_, "sync_codebook",
                       [] { fail("dense-replicated routes exactly and has no codebook to sync"); });
}

void DenseReplicatedRouting::refresh_query_lists(MatrixView, const QueryListOptions&) {
  refuse_query_lists("refresh_query_lists");
}

void DenseReplicatedRouting::set_query_lists(QueryLists) {
  refuse_query_lists("set_query_lists");
}

void DenseReplicatedRouting::refuse_query_lists(const char* call) {
  comm::check_together(comm_, call, [] {
    fail("dense-replicated routes exactly and has no lists to replace with query lists");
  });
}

void DenseReplicatedRouting::move_experts(Placement placement, MatrixView local_centers) {
  // Centers only change ranks: the replica of all E stays as it is.
  placement_ = std::move(placement);
  local_centers_ = Matrix(local_centers.rows, local_centers.cols);
  std::copy_n(local_centers.data, local_centers.rows * local_centers.cols, local_centers_.data());
}

}  // namespace airmoe::runtime
