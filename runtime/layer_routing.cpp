#include "runtime/layer_routing.h"

#include <algorithm>

#include "core/checks.h"
#include "runtime/layer_routing_dense_replicated.h"
#include "runtime/layer_routing_distributed.h"

namespace airmoe::runtime {

const char* to_string(Strategy s) {
  switch (s) {
    case Strategy::kAir:
      return "air";
    case Strategy::kDenseReplicated:
      return "dense-replicated";
    case Strategy::kDenseBroadcast:
      return "dense-broadcast";
  }
  return "?";
}

Strategy strategy_from_string(const std::string& name) {
  if (name == "air") return Strategy::kAir;
  if (name == "dense-replicated") return Strategy::kDenseReplicated;
  if (name == "dense-broadcast") return Strategy::kDenseBroadcast;
  fail("strategy '" + name + "' is unknown (expected air, dense-replicated or dense-broadcast)");
}

Matrix hosted_rows(MatrixView centers, const std::vector<int32_t>& ids) {
  Matrix out(static_cast<int64_t>(ids.size()), centers.cols);
  for (size_t i = 0; i < ids.size(); ++i)
    std::copy_n(centers.row(ids[i]), centers.cols, out.row(static_cast<int64_t>(i)));
  return out;
}

std::unique_ptr<LayerRouting> make_layer_routing(comm::Communicator& comm, Strategy strategy,
                                                 int probes, Codebook codebook,
                                                 std::vector<int32_t> assignment,
                                                 Placement placement, MatrixView centers,
                                                 int request_key_bits) {
  if (strategy == Strategy::kDenseReplicated)
    return std::make_unique<DenseReplicatedRouting>(
        comm, std::move(codebook), std::move(assignment), std::move(placement), centers);
  const Matrix local = hosted_rows(centers, placement.local_experts(comm.rank()));
  const int m = strategy == Strategy::kAir ? probes : static_cast<int>(codebook.size());
  return std::make_unique<DistributedRouting>(comm, strategy, m, std::move(codebook),
                                              std::move(assignment), std::move(placement),
                                              local.view(), request_key_bits);
}

}  // namespace airmoe::runtime
