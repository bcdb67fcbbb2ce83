// The distributed router over real MPI, at whatever P mpiexec gave: every
// rank's routes equal the single-process AirRouter's, requests reach exactly
// the candidate ranks, and the synced codebook is the single-process one.
#include <gtest/gtest.h>
#include <mpi.h>

#include <map>
#include <set>

#include "comm/mpi_communicator.h"
#include "router/dense_router.h"
#include "runtime_fixture.h"

namespace airmoe {
namespace {

using runtime::PlacementPolicy;
using test::GlobalData;
using test::RouteRows;

const GlobalData& data() {
  static const GlobalData g = GlobalData::make();
  return g;
}

TEST(MpiDistributedRouter, RoutesEqualSingleProcessForEveryPolicy) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const GlobalData& g = data();
  const AirRouter air(g.data.centers.view(), g.codebook);
  const DenseRouter dense(g.data.centers.view());
  const int P = comm.size(), k = 4;
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
  for (PlacementPolicy policy : test::kAllPolicies) {
    runtime::DistributedRouter router = g.make_router(comm, policy);
    for (int m : {1, 3, static_cast<int>(g.codebook.size())}) {
      const Routes r = router.route(g.tokens_of(comm.rank(), P), k, m);
      const RouteRows got = RouteRows::of(r, 0, r.tokens);
      const RouteRows want = RouteRows::of(air.route(g.data.tokens.view(), k, m), b, e);
      EXPECT_EQ(got.experts, want.experts) << runtime::to_string(policy) << " m=" << m;
      EXPECT_EQ(got.gates, want.gates) << runtime::to_string(policy) << " m=" << m;
      if (m == g.codebook.size()) {
        const RouteRows exact = RouteRows::of(dense.route(g.data.tokens.view(), k), b, e);
        EXPECT_EQ(got.experts, exact.experts);
        EXPECT_EQ(got.gates, exact.gates);
      }
      // The scoring ranks keep what they received, for the dispatch to come.
      EXPECT_EQ(router.received().vectors.rows(),
                static_cast<int64_t>(router.received().home_rank.size()));
    }
  }
}

TEST(MpiDistributedRouter, BiasedRoutesEqualSingleProcess) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const GlobalData& g = data();
  const Matrix bias = random_matrix(g.data.centers.rows(), 1, 2.0, 77);
  AirRouter air(g.data.centers.view(), g.codebook);
  air.set_bias(bias.view());
  const int P = comm.size(), k = 4;
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
  for (PlacementPolicy policy : test::kAllPolicies) {
    runtime::DistributedRouter router = g.make_router(comm, policy);
    router.set_bias(bias.view());
    for (GateMode mode : {GateMode::kChosen, GateMode::kSigmoid})
      for (int m : {1, 3, static_cast<int>(g.codebook.size())}) {
        const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), k, m, mode).routes;
        const RouteRows got = RouteRows::of(r, 0, r.tokens);
        const RouteRows want = RouteRows::of(air.route(g.data.tokens.view(), k, m, mode), b, e);
        EXPECT_EQ(got.experts, want.experts) << runtime::to_string(policy) << " m=" << m;
        EXPECT_EQ(got.gates, want.gates) << runtime::to_string(policy) << " m=" << m;
      }
  }
}

TEST(MpiDistributedRouter, RequestsReachExactlyTheCandidateRanks) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const GlobalData& g = data();
  const AirRouter air(g.data.centers.view(), g.codebook);
  const InvertedLists lists = g.lists();
  const int P = comm.size(), k = 4, m = 2;
  const int64_t d = g.data.tokens.cols();
  const Routes ref = air.route(g.data.tokens.view(), k, m);
  runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kLocality);
  const auto& owners = router.placement().owners();
  for (int64_t round = 0; round < 5; ++round) {
    const int64_t t = (round * P + comm.rank()) % g.data.tokens.rows();
    comm.meter().reset();
    router.route(MatrixView(g.data.tokens.row(t), 1, d), k, m);
    std::map<int, int64_t> hosted;
    for (int64_t p = ref.probe_offsets[t]; p < ref.probe_offsets[t + 1]; ++p) {
      std::set<int> ranks;
      for (int32_t e : lists.list(ref.probes[p])) ranks.insert(owners[e]);
      for (int r : ranks) ++hosted[r];
    }
    for (int peer = 0; peer < P; ++peer) {
      if (peer == comm.rank()) continue;
      const comm::TrafficCounts sent = comm.meter().sent("requests", peer);
      const auto it = hosted.find(peer);
      EXPECT_EQ(sent.messages, it == hosted.end() ? 0 : 1) << "token " << t << " peer " << peer;
      EXPECT_EQ(sent.bytes, it == hosted.end() ? 0 : 8 + 4 * it->second + 4 * d);
    }
  }
}

TEST(MpiDistributedRouter, CodebookSyncEqualsSingleProcess) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const GlobalData& g = data();
  Matrix moved = random_matrix(g.data.centers.rows(), g.data.centers.cols(), 0.3, 99);
  for (int64_t e = 0; e < moved.rows(); ++e)
    for (int64_t c = 0; c < moved.cols(); ++c) moved(e, c) += g.data.centers(e, c);
  AirRouter air(g.data.centers.view(), g.codebook);
  air.set_centers(moved.view());
  air.update_codebook(1.0, 3);
  runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kLocality);
  Matrix local(static_cast<int64_t>(router.local_experts().size()), moved.cols());
  for (size_t i = 0; i < router.local_experts().size(); ++i)
    std::copy_n(moved.row(router.local_experts()[i]), moved.cols(),
                local.row(static_cast<int64_t>(i)));
  router.set_local_centers(local.view());
  router.sync_codebook(1.0, 3);
  const MatrixView got = router.codebook().codewords(), want = air.codebook().codewords();
  EXPECT_EQ(std::vector<float>(got.data, got.data + got.rows * got.cols),
            std::vector<float>(want.data, want.data + want.rows * want.cols));
  EXPECT_EQ(router.lists().assignment(), air.lists().assignment());
  EXPECT_GT(comm.size() > 1 ? comm.meter().sent("kmeans_sync").bytes : 1, 0);
}

TEST(MpiDistributedRouter, BadTokenOnOneRankFailsEveryRank) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const GlobalData& g = data();
  runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
  Matrix tokens(2, g.data.tokens.cols(), 0.5f);
  if (comm.rank() == comm.size() - 1) tokens(0, 1) = std::numeric_limits<float>::infinity();
  try {
    router.route(tokens.view(), 4, 2);
    ADD_FAILURE() << "expected every rank to refuse";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("rank " + std::to_string(comm.size() - 1)), std::string::npos) << msg;
    EXPECT_NE(msg.find("tokens row 0"), std::string::npos) << msg;
  }
  // And the router still works afterwards: nothing was left half-sent.
  const Routes r = router.route(g.tokens_of(comm.rank(), comm.size()), 4, 2);
  EXPECT_EQ(r.tokens, g.tokens_of(comm.rank(), comm.size()).rows);
}

}  // namespace
}  // namespace airmoe

// The MoE layer over real MPI: every strategy equals the single-process
// reference, and the traffic simulator predicts this rank's meter exactly.
#include "moe_fixture.h"
#include "runtime/simulator.h"

namespace airmoe {
namespace {

TEST(MpiMoELayer, EqualsReferenceAndTheSimulatorPredictsTheMeter) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const GlobalData& g = data();
  runtime::MoEConfig cfg;
  cfg.k = 4;
  cfg.probes = 3;
  cfg.expert = {g.data.tokens.cols(), 3, runtime::Activation::kSilu};
  const Matrix dy = random_matrix(g.data.tokens.rows(), g.data.tokens.cols(), 1.0, 77);
  const int P = comm.size();
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
  const int64_t d = g.data.tokens.cols();
  for (runtime::Strategy s : {runtime::Strategy::kAir, runtime::Strategy::kDenseReplicated,
                              runtime::Strategy::kDenseBroadcast}) {
    const runtime::Plan plan = runtime::plan_and_broadcast(comm, PlacementPolicy::kLocality,
                                                           g.codebook, g.lists(), g.load);
    runtime::MoELayer layer(comm, s, cfg, g.codebook, g.assignment, plan.placement,
                            g.data.centers.view(), 123);
    comm.meter().reset();
    runtime::DispatchPlan dp;
    const Matrix out = layer.forward(g.tokens_of(comm.rank(), P), dp);
    const runtime::MoEGradients grads = layer.backward(dp, MatrixView(dy.row(b), e - b, d));
    const test::ReferenceResult ref = test::reference_layer(g, s, cfg, 123, dy.view());
    const size_t n = static_cast<size_t>((e - b) * d);
    EXPECT_LE(test::rel_error(out.data(), ref.out.row(b), n), 1e-5) << runtime::to_string(s);
    EXPECT_LE(test::rel_error(grads.d_tokens.data(), ref.d_tokens.row(b), n), 1e-5)
        << runtime::to_string(s);

    const AirRouter air(g.data.centers.view(), g.codebook);
    const int m = s == runtime::Strategy::kAir ? cfg.probes : static_cast<int>(g.codebook.size());
    const runtime::SimulatedTraffic sim =
        runtime::simulate_traffic(s, layer.placement(), air.route(g.data.tokens.view(), cfg.k, m),
                                  g.data.tokens.view(), true);
    for (const auto& [phase, per_rank] : sim.sent)
      EXPECT_EQ(per_rank[comm.rank()], comm.meter().sent(phase))
          << runtime::to_string(s) << " phase " << phase << " P=" << P;
  }
}

}  // namespace
}  // namespace airmoe

// The layer's collective checks shared with the in-process tests.
#include "layer_checks.h"

namespace airmoe {
namespace {

TEST(MpiMoELayer, EmptyRanksForEveryStrategy) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  for (runtime::Strategy s : {runtime::Strategy::kAir, runtime::Strategy::kDenseReplicated,
                              runtime::Strategy::kDenseBroadcast})
    test::check_layer_with_empty_ranks(comm, data(), s);
}

TEST(MpiMoELayer, DenseReplicatedRefusesCodebookSync) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_dense_replicated_refuses_codebook_sync(comm, data());
}

TEST(MpiMoELayer, CodebookSyncThenReplanRoutesWithTheNewCodebook) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_codebook_sync_then_replan(comm, data());
}

TEST(MpiMoELayer, StepStatsComeBackInThePlan) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_step_stats_in_plan(comm, data());
}

}  // namespace
}  // namespace airmoe
