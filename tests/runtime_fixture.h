// Shared set-up for the distributed-router tests, in-process and over MPI:
// one global data set every rank can rebuild, the single-process AirRouter
// reference, and the per-rank slices.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "router/air_router.h"
#include "router/codebook.h"
#include "router/list_scan.h"
#include "core/synthetic.h"
#include "runtime/coordinator.h"
#include "runtime/distributed_router.h"

namespace airmoe::test {

struct GlobalData {
  SyntheticData data;
  Codebook codebook;
  std::vector<int32_t> assignment;
  std::vector<double> load;

  // Odd sizes on purpose: E, T and C share no factor with P = 2, 3, 4.
  static GlobalData make(int64_t E = 601, int64_t d = 16, int64_t T = 97, int64_t C = 23,
                         uint64_t seed = 5) {
    SyntheticConfig cfg;
    cfg.experts = E;
    cfg.dim = d;
    cfg.tokens = T;
    cfg.clusters = 7;
    cfg.latent_dim = 3;
    cfg.seed = seed;
    GlobalData g;
    g.data = make_synthetic(cfg);
    g.codebook = train_codebook(g.data.centers.view(), {C, 8, seed});
    g.assignment = g.codebook.assign(normalize_rows(g.data.centers.view(), "centers").view());
    const InvertedLists lists(g.assignment, C);
    const ProbeSelection sel = select_probes(g.codebook, lists, g.data.tokens.view(), 4, 3);
    g.load = runtime::list_load(lists, sel.codewords);
    return g;
  }

  InvertedLists lists() const { return InvertedLists(assignment, codebook.size()); }

  // This rank's contiguous block of tokens.
  static std::pair<int64_t, int64_t> token_range(int64_t T, int rank, int P) {
    return {T * rank / P, T * (rank + 1) / P};
  }
  MatrixView tokens_of(int rank, int P) const {
    const auto [b, e] = token_range(data.tokens.rows(), rank, P);
    return {data.tokens.row(b), e - b, data.tokens.cols()};
  }
  Matrix local_centers(const runtime::Placement& placement, int rank) const {
    const auto ids = placement.local_experts(rank);
    Matrix out(static_cast<int64_t>(ids.size()), data.centers.cols());
    for (size_t i = 0; i < ids.size(); ++i)
      std::copy_n(data.centers.row(ids[i]), data.centers.cols(), out.row(static_cast<int64_t>(i)));
    return out;
  }
  runtime::DistributedRouter make_router(comm::Communicator& comm,
                                         runtime::PlacementPolicy policy) const {
    const runtime::Plan plan = runtime::plan_and_broadcast(comm, policy, codebook, lists(), load);
    const Matrix local = local_centers(plan.placement, comm.rank());
    return runtime::DistributedRouter(comm, codebook, assignment, plan.placement, local.view());
  }
};

// Rows [begin, end) of routes, for comparing a rank's result with the
// single-process reference.
struct RouteRows {
  std::vector<int32_t> experts;
  std::vector<float> gates;
  static RouteRows of(const Routes& r, int64_t begin, int64_t end) {
    RouteRows out;
    out.experts.assign(r.experts.begin() + begin * r.k, r.experts.begin() + end * r.k);
    out.gates.assign(r.gates.begin() + begin * r.k, r.gates.begin() + end * r.k);
    return out;
  }
};

inline const runtime::PlacementPolicy kAllPolicies[] = {runtime::PlacementPolicy::kRoundRobin,
                                                        runtime::PlacementPolicy::kList,
                                                        runtime::PlacementPolicy::kLocality};

}  // namespace airmoe::test
