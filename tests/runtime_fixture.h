// Shared set-up for the distributed-router tests, in-process and over MPI:
// one global data set every rank can rebuild, the single-process AirRouter
// reference, and the per-rank slices.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/in_process.h"
#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/codebook.h"
#include "router/list_scan.h"
#include "runtime/builder.h"

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
    // The runtime's own set-up (runtime/builder.h) on one rank: the codebook,
    // lists and load every rank of a test then shares.
    runtime::LayerSpec spec;
    spec.experts = E;
    spec.dim = d;
    spec.codewords = C;
    spec.kmeans_iterations = 8;
    spec.kmeans_seed = seed;
    spec.k = static_cast<int>(std::min<int64_t>(4, E));
    spec.probes = static_cast<int>(std::min<int64_t>(3, C));  // the sample probes m = 3
    comm::run_ranks(1, [&](comm::Communicator& comm) {
      runtime::SharedIndex index =
          runtime::agree_on_index(comm, spec, g.data.centers.view(), g.data.tokens.view());
      g.codebook = std::move(index.codebook);
      g.assignment = std::move(index.assignment);
      g.load = std::move(index.list_load);
    });
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
    const runtime::SharedIndex index{codebook, assignment, load};
    runtime::LayerSpec spec;
    spec.placement = policy;
    const runtime::PlacementPlan plan = runtime::place_experts(comm, spec, index);
    return std::move(*runtime::make_router(comm, index, plan.placement, data.centers.view()));
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
