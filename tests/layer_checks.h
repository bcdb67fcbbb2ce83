// Collective checks of the MoE layer, written once and run against every
// backend: with ranks as threads (test_moe_layer_edges.cpp, comm::run_ranks)
// and over MPI (test_runtime_mpi.cpp, mpiexec). Each takes this rank's
// communicator and is called by every rank together.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/errors.h"
#include "moe_fixture.h"
#include "router/air_router.h"
#include "runtime/moe_layer.h"
#include "test_util.h"

namespace airmoe::test {

inline runtime::MoEConfig small_layer_config(int64_t d) {
  runtime::MoEConfig cfg;
  cfg.k = 4;
  cfg.probes = 3;
  cfg.expert = {d, 3, runtime::Activation::kGelu};
  return cfg;
}

// Tokens only on the upper ranks, experts only on the lower ones: with P >= 3
// some rank has tokens and no experts, another experts and no tokens.
struct LopsidedSplit {
  int P;
  int expert_ranks() const { return std::max(1, (P + 1) / 2); }
  int first_token_rank() const { return P / 2; }
  std::pair<int64_t, int64_t> tokens(int64_t T, int rank) const {
    if (rank < first_token_rank()) return {0, 0};
    return GlobalData::token_range(T, rank - first_token_rank(), P - first_token_rank());
  }
  runtime::Placement placement(const GlobalData& g) const {
    std::vector<int32_t> owner(static_cast<size_t>(g.data.centers.rows()));
    for (size_t e = 0; e < owner.size(); ++e)
      owner[e] = static_cast<int32_t>(e % static_cast<size_t>(expert_ranks()));
    return runtime::Placement(P, owner, g.lists());
  }
};

// Forward and backward on ranks without tokens and ranks without experts end
// (no hang) and equal the single-process reference.
inline void check_layer_with_empty_ranks(comm::Communicator& comm, const GlobalData& g,
                                         runtime::Strategy strategy) {
  const runtime::MoEConfig cfg = small_layer_config(g.data.tokens.cols());
  const LopsidedSplit split{comm.size()};
  const int64_t T = g.data.tokens.rows(), d = g.data.tokens.cols();
  const Matrix dy = random_matrix(T, d, 1.0, 77);
  const ReferenceResult ref = reference_layer(g, strategy, cfg, 123, dy.view());
  runtime::MoELayer layer(comm, strategy, cfg, g.codebook, g.assignment, split.placement(g),
                          g.data.centers.view(), 123);
  const auto [b, e] = split.tokens(T, comm.rank());
  comm.meter().reset();
  runtime::ForwardResult fwd = layer.forward(MatrixView(g.data.tokens.row(b), e - b, d));
  const Matrix& out = fwd.output;
  const runtime::MoEGradients grads = layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, d));
  const std::string where = std::string(runtime::to_string(strategy)) +
                            " P=" + std::to_string(comm.size()) + " rank " +
                            std::to_string(comm.rank());
  ASSERT_EQ(out.rows(), e - b) << where;
  ASSERT_EQ(grads.d_tokens.rows(), e - b) << where;
  const size_t n = static_cast<size_t>((e - b) * d);
  if (n > 0) {
    EXPECT_LE(rel_error(out.data(), ref.out.row(b), n), 1e-5) << where;
    EXPECT_LE(rel_error(grads.d_tokens.data(), ref.d_tokens.row(b), n), 1e-5) << where;
  }
  if (comm.rank() >= split.expert_ranks()) {
    EXPECT_EQ(layer.experts().size(), 0) << where;
    // It served nothing, so it sent no output rows home.
    EXPECT_EQ(comm.meter().sent("combine"), comm::TrafficCounts{}) << where;
  }
}

// dense-replicated has no codebook: every rank refuses the sync together,
// with a UsageError saying so (it used to call through a null router).
inline void check_dense_replicated_refuses_codebook_sync(comm::Communicator& comm,
                                                         const GlobalData& g) {
  const runtime::MoEConfig cfg = small_layer_config(g.data.tokens.cols());
  const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
      comm, runtime::PlacementPolicy::kList, g.codebook, g.lists(), g.load);
  runtime::MoELayer layer(comm, runtime::Strategy::kDenseReplicated, cfg, g.codebook, g.assignment,
                          plan.placement, g.data.centers.view(), 123);
  AIRMOE_EXPECT_THROW_MSG(layer.sync_codebook(), UsageError,
                          "dense-replicated routes exactly and has no codebook to sync");
  // And the layer still works afterwards.
  const Matrix out = layer.forward(g.tokens_of(comm.rank(), comm.size())).output;
  EXPECT_EQ(out.rows(), g.tokens_of(comm.rank(), comm.size()).rows);
}

// Moved centers, a codebook sync, a re-plan: the layer routes with the synced
// codebook and lists (no stale copy), as the single-process router does
// after the same update.
inline void check_codebook_sync_then_replan(comm::Communicator& comm, const GlobalData& g) {
  const runtime::MoEConfig cfg = small_layer_config(g.data.tokens.cols());
  GlobalData moved = g;
  const Matrix shift = random_matrix(g.data.centers.rows(), g.data.centers.cols(), 0.3, 99);
  for (size_t i = 0; i < shift.size(); ++i) moved.data.centers.data()[i] += shift.data()[i];
  AirRouter air(moved.data.centers.view(), g.codebook);
  air.update_codebook(1.0, 1);
  moved.codebook = air.codebook();
  moved.assignment = air.lists().assignment();

  const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
      comm, runtime::PlacementPolicy::kRoundRobin, g.codebook, g.lists(), g.load);
  runtime::MoELayer layer(comm, runtime::Strategy::kAir, cfg, g.codebook, g.assignment,
                          plan.placement, g.data.centers.view(), 123);
  const Matrix local = moved.local_centers(layer.placement(), comm.rank());
  layer.set_local_centers(local.view());
  layer.sync_codebook(1.0);
  const MatrixView got = layer.codebook().codewords(), want = moved.codebook.codewords();
  EXPECT_EQ(std::vector<float>(got.data, got.data + got.rows * got.cols),
            std::vector<float>(want.data, want.data + want.rows * want.cols));
  EXPECT_EQ(layer.lists().assignment(), moved.assignment);
  layer.replan(runtime::PlacementPolicy::kLocality, moved.load);
  EXPECT_EQ(layer.lists().assignment(), moved.assignment) << "the re-plan kept the synced lists";

  const Matrix dy = random_matrix(g.data.tokens.rows(), g.data.tokens.cols(), 1.0, 77);
  const ReferenceResult ref = reference_layer(moved, runtime::Strategy::kAir, cfg, 123, dy.view());
  const runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), comm.size()));
  const Matrix& out = fwd.output;
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), comm.size());
  const RouteRows want_routes = RouteRows::of(ref.routes, b, e);
  const Routes& routes = fwd.handle.routes();
  EXPECT_EQ(RouteRows::of(routes, 0, routes.tokens).experts, want_routes.experts);
  if (out.size() > 0) {
    EXPECT_LE(rel_error(out.data(), ref.out.row(b), out.size()), 1e-5);
  }
}

// One step's timings and router FLOPs come back in its dispatch handle.
inline void check_step_stats_in_handle(comm::Communicator& comm, const GlobalData& g) {
  const runtime::MoEConfig cfg = small_layer_config(g.data.tokens.cols());
  const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
      comm, runtime::PlacementPolicy::kList, g.codebook, g.lists(), g.load);
  for (runtime::Strategy s : {runtime::Strategy::kAir, runtime::Strategy::kDenseReplicated}) {
    runtime::MoELayer layer(comm, s, cfg, g.codebook, g.assignment, plan.placement,
                            g.data.centers.view(), 123);
    const MatrixView x = g.tokens_of(comm.rank(), comm.size());
    runtime::DispatchHandle step = layer.forward(x).handle;
    const runtime::StepStats& stats = step.stats();
    const double d = static_cast<double>(g.data.tokens.cols());
    if (s == runtime::Strategy::kDenseReplicated) {
      EXPECT_EQ(stats.router_flops_per_token, 2.0 * static_cast<double>(g.data.centers.rows()) * d);
    } else if (x.rows > 0) {
      EXPECT_GT(stats.router_flops_per_token, 2.0 * static_cast<double>(g.codebook.size()) * d);
      EXPECT_LT(stats.router_flops_per_token,
                2.0 * static_cast<double>(g.data.centers.rows() + g.codebook.size()) * d);
    }
    EXPECT_GE(stats.seconds.route, 0.0);
    Matrix dy(x.rows, x.cols, 1.0f);
    layer.backward(step, dy.view());
    EXPECT_GT(stats.seconds.backward_dispatch + stats.seconds.backward_experts +
                  stats.seconds.backward_combine,
              0.0);
  }
}

}  // namespace airmoe::test
