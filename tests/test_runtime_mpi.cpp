// The distributed router over real MPI, at whatever P mpiexec gave: every
// rank's routes equal the single-process AirRouter's, requests reach exactly
// the candidate ranks, and the synced codebook is the single-process one.
#include <gtest/gtest.h>
#include <mpi.h>

#include "comm/mpi_communicator.h"
#include "router_checks.h"
#include "runtime_fixture.h"

namespace airmoe {
namespace {

using runtime::PlacementPolicy;
using test::GlobalData;

const GlobalData& data() {
  static const GlobalData g = GlobalData::make();
  return g;
}

// The collective checks of router_checks.h over MPI, at whatever P mpiexec
// gave (test_runtime.cpp runs the same bodies with ranks as threads).
TEST(MpiDistributedRouter, RoutesEqualSingleProcessForEveryPolicy) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  for (PlacementPolicy policy : test::kAllPolicies)
    test::check_routes_equal_single_process(comm, data(), policy);
}

TEST(MpiDistributedRouter, BiasedRoutesEqualSingleProcess) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  for (PlacementPolicy policy : test::kAllPolicies)
    test::check_biased_routes_equal_single_process(comm, data(), policy);
}

TEST(MpiDistributedRouter, RequestsReachExactlyTheCandidateRanks) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_requests_reach_exactly_the_candidate_ranks(comm, data());
}

TEST(MpiDistributedRouter, CodebookSyncEqualsSingleProcess) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_codebook_sync_equals_single_process(comm, data());
}

TEST(MpiDistributedRouter, QueryListsEqualSingleProcess) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  for (const bool biased : {false, true})
    for (PlacementPolicy policy : test::kAllPolicies)
      test::check_query_lists_equal_single_process(comm, data(), policy, biased);
  test::check_query_lists_equal_single_process(comm, data(), PlacementPolicy::kLocality, true, 12);
}

TEST(MpiDistributedRouter, RequestKeysKeepRoutesAndPruneRequests) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  for (const bool query : {false, true})
    for (const bool biased : {false, true})
      test::check_request_keys_keep_routes(comm, data(), PlacementPolicy::kLocality, biased, query);
}

TEST(MpiDistributedRouter, RequestKeysFollowCenterUpdates) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_request_keys_follow_center_updates(comm, data());
}

TEST(MpiDistributedRouter, BadTokenOnOneRankFailsEveryRank) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_bad_token_fails_every_rank(comm, data());
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
    const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
        comm, PlacementPolicy::kLocality, g.codebook, g.lists(), g.load);
    runtime::MoELayer layer(comm, s, cfg, g.codebook, g.assignment, plan.placement,
                            g.data.centers.view(), 123);
    comm.meter().reset();
    runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
    const Matrix& out = fwd.output;
    const runtime::MoEGradients grads = layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, d));
    const test::ReferenceResult ref = test::reference_layer(g, s, cfg, 123, dy.view());
    const size_t n = static_cast<size_t>((e - b) * d);
    EXPECT_LE(test::rel_error(out.data(), ref.out.row(b), n), 1e-5) << runtime::to_string(s);
    EXPECT_LE(test::rel_error(grads.d_tokens.data(), ref.d_tokens.row(b), n), 1e-5)
        << runtime::to_string(s);

    const AirRouter air(g.data.centers.view(), g.codebook);
    const int m = s == runtime::Strategy::kAir ? cfg.probes : static_cast<int>(g.codebook.size());
    const runtime::SimulatedTraffic sim =
        runtime::simulate_traffic(s, layer.placement(), air.route(g.data.tokens.view(), cfg.k, m),
                                  g.data.tokens.view(), true, comm.exchange_kind(), cfg.wire_dtype);
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

TEST(MpiMoELayer, StepStatsComeBackInTheHandle) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  test::check_step_stats_in_handle(comm, data());
}

}  // namespace
}  // namespace airmoe
