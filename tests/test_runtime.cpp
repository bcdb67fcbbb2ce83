// The distributed router with ranks as threads (comm/in_process.h): routes,
// traffic and codebook sync against the single-process AirRouter.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <set>

#include "comm/in_process.h"
#include "router/dense_router.h"
#include "runtime_fixture.h"
#include "test_util.h"

namespace airmoe {
namespace {

using runtime::PlacementPolicy;
using test::GlobalData;
using test::kAllPolicies;
using test::RouteRows;

const GlobalData& data() {
  static const GlobalData g = GlobalData::make();
  return g;
}

class DistributedRoutes : public ::testing::TestWithParam<std::tuple<int, PlacementPolicy>> {};

// Each rank's routes of its own tokens, by route(router, tokens), at P ranks.
template <typename Route>
std::vector<RouteRows> route_on_ranks(int P, PlacementPolicy policy, Route route) {
  std::vector<RouteRows> got(static_cast<size_t>(P));
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = data().make_router(comm, policy);
    const Routes r = route(router, data().tokens_of(comm.rank(), P));
    got[comm.rank()] = RouteRows::of(r, 0, r.tokens);
  });
  return got;
}

// Every rank's rows equal the single-process routes of its tokens.
void expect_rank_rows(const std::vector<RouteRows>& got, const Routes& want,
                      const std::string& what) {
  const int P = static_cast<int>(got.size());
  for (int rank = 0; rank < P; ++rank) {
    const auto [b, e] = GlobalData::token_range(want.tokens, rank, P);
    const RouteRows ref = RouteRows::of(want, b, e);
    EXPECT_EQ(got[rank].experts, ref.experts) << "rank " << rank << " " << what;
    EXPECT_EQ(got[rank].gates, ref.gates) << "rank " << rank << " " << what;
  }
}

TEST_P(DistributedRoutes, EqualTheSingleProcessRouter) {
  const auto [P, policy] = GetParam();
  const GlobalData& g = data();
  const AirRouter air(g.data.centers.view(), g.codebook);
  const DenseRouter dense(g.data.centers.view());
  const int k = 4;
  const int64_t C = g.codebook.size(), T = g.data.tokens.rows();
  for (int m : {1, 3, static_cast<int>(C)}) {
    const Routes want = air.route(g.data.tokens.view(), k, m);
    const Routes exact = dense.route(g.data.tokens.view(), k);
    const std::vector<RouteRows> got =
        route_on_ranks(P, policy, [&](runtime::DistributedRouter& router, MatrixView tokens) {
          return router.route(tokens, k, m);
        });
    expect_rank_rows(got, want, "m=" + std::to_string(m));
    for (int rank = 0; rank < P; ++rank) {
      const auto [b, e] = GlobalData::token_range(T, rank, P);
      if (m == C) {
        const RouteRows ex = RouteRows::of(exact, b, e);
        EXPECT_EQ(got[rank].experts, ex.experts) << "m = C must be exact routing";
        EXPECT_EQ(got[rank].gates, ex.gates);
      }
    }
  }
}

// With a selection bias (replicated on every rank) and either gate mode:
// the single-process AirRouter's routes, whatever P and the placement.
TEST_P(DistributedRoutes, BiasedEqualTheSingleProcessRouter) {
  const auto [P, policy] = GetParam();
  const GlobalData& g = data();
  const Matrix bias = random_matrix(g.data.centers.rows(), 1, 2.0, 77);
  AirRouter air(g.data.centers.view(), g.codebook);
  const int k = 4;
  const Routes unbiased = air.route(g.data.tokens.view(), k, 3);
  air.set_bias(bias.view());
  for (GateMode mode : {GateMode::kChosen, GateMode::kSigmoid}) {
    for (int m : {1, 3, static_cast<int>(g.codebook.size())}) {
      const Routes want = air.route(g.data.tokens.view(), k, m, mode);
      if (m == 3) {
        EXPECT_NE(want.experts, unbiased.experts) << "the bias moved no route";
      }
      const std::vector<RouteRows> got =
          route_on_ranks(P, policy, [&](runtime::DistributedRouter& router, MatrixView tokens) {
            router.set_bias(bias.view());
            return router.route_batch(tokens, k, m, mode).routes;
          });
      expect_rank_rows(got, want, std::string(to_string(mode)) + " m=" + std::to_string(m));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RanksAndPolicies, DistributedRoutes,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::ValuesIn(kAllPolicies)));

// Each rank routes one token at a time; the ranks the meter saw requests go to
// must be exactly the owners of the probed lists' members (computed here from
// the placement's owners and the single-process router's probes).
TEST(DistributedTraffic, RequestsReachExactlyTheCandidateRanks) {
  const GlobalData& g = data();
  const AirRouter air(g.data.centers.view(), g.codebook);
  const int P = 4, k = 4, m = 2;
  const InvertedLists lists = g.lists();
  const int64_t d = g.data.tokens.cols();
  const Routes ref = air.route(g.data.tokens.view(), k, m);
  std::mutex mu;
  int checked = 0;
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kLocality);
    const auto& owners = router.placement().owners();
    for (int64_t round = 0; round < 6; ++round) {
      const int64_t t = round * P + comm.rank();
      comm.meter().reset();
      router.route(MatrixView(g.data.tokens.row(t), 1, d), k, m);
      // Expected: per peer, the probed codewords it hosts a member of.
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
        const int64_t want_msgs = it == hosted.end() ? 0 : 1;
        const int64_t want_bytes = it == hosted.end() ? 0 : 8 + 4 * it->second + 4 * d;
        EXPECT_EQ(sent.messages, want_msgs) << "token " << t << " peer " << peer;
        EXPECT_EQ(sent.bytes, want_bytes) << "token " << t << " peer " << peer;
        // The reply: k (id, logit) pairs back from each peer that was asked.
      }
      std::lock_guard<std::mutex> lock(mu);
      ++checked;
    }
  });
  EXPECT_EQ(checked, 6 * P);
}

TEST(DistributedTraffic, RepliesAreKPairsPerRequest) {
  const GlobalData& g = data();
  const int P = 3, k = 4, m = 3;
  std::vector<comm::TrafficCounts> requests(P), replies(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
    comm.meter().reset();
    router.route(g.tokens_of(comm.rank(), P), k, m);
    requests[comm.rank()] = comm.meter().sent("requests");
    replies[comm.rank()] = comm.meter().sent("replies");
  });
  // Every request a rank received produces one reply of k (int32, float)
  // pairs; count the requests each rank received from the senders' meters.
  int64_t total_requests = 0, total_reply_bytes = 0;
  for (int r = 0; r < P; ++r) total_reply_bytes += replies[r].bytes;
  (void)total_requests;
  EXPECT_EQ(total_reply_bytes % (8 * k), 0);
  int64_t req_msgs = 0, rep_msgs = 0;
  for (int r = 0; r < P; ++r) {
    req_msgs += requests[r].messages;
    rep_msgs += replies[r].messages;
  }
  EXPECT_EQ(req_msgs, rep_msgs) << "one reply message per request message";
}

TEST(DistributedSync, CodebookIsIdenticalAcrossRanksAndEqualsSingleProcess) {
  const GlobalData& g = data();
  // Drift: shift every center a little, deterministically.
  Matrix moved = random_matrix(g.data.centers.rows(), g.data.centers.cols(), 0.3, 99);
  for (int64_t e = 0; e < moved.rows(); ++e)
    for (int64_t c = 0; c < moved.cols(); ++c) moved(e, c) += g.data.centers(e, c);
  AirRouter air(g.data.centers.view(), g.codebook);
  air.set_centers(moved.view());
  air.update_codebook(1.0, 3);
  const MatrixView want = air.codebook().codewords();
  const std::vector<float> want_cw(want.data, want.data + want.rows * want.cols);
  const Routes want_routes = air.route(g.data.tokens.view(), 4, 2);

  for (int P = 1; P <= 4; ++P) {
    std::vector<std::vector<float>> cw(static_cast<size_t>(P));
    std::vector<std::vector<int32_t>> assignment(static_cast<size_t>(P));
    std::vector<RouteRows> got(static_cast<size_t>(P));
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
      Matrix local(static_cast<int64_t>(router.local_experts().size()), moved.cols());
      for (size_t i = 0; i < router.local_experts().size(); ++i)
        std::copy_n(moved.row(router.local_experts()[i]), moved.cols(),
                    local.row(static_cast<int64_t>(i)));
      router.set_local_centers(local.view());
      router.sync_codebook(1.0, 3);
      const MatrixView v = router.codebook().codewords();
      cw[comm.rank()].assign(v.data, v.data + v.rows * v.cols);
      assignment[comm.rank()] = router.lists().assignment();
      const Routes r = router.route(g.tokens_of(comm.rank(), P), 4, 2);
      got[comm.rank()] = RouteRows::of(r, 0, r.tokens);
    });
    for (int rank = 0; rank < P; ++rank) {
      EXPECT_EQ(cw[rank], want_cw) << "P=" << P << " rank " << rank;
      EXPECT_EQ(assignment[rank], air.lists().assignment()) << "P=" << P << " rank " << rank;
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), rank, P);
      EXPECT_EQ(got[rank].experts, RouteRows::of(want_routes, b, e).experts);
      EXPECT_EQ(got[rank].gates, RouteRows::of(want_routes, b, e).gates);
    }
  }
}

TEST(DistributedSync, EmptiedCodewordIsRepairedLikeSingleProcess) {
  const GlobalData& g = data();
  // Duplicate codeword 0 into codeword 1: ties go to the lower index, so
  // codeword 1 owns nothing and the update must repair it.
  Matrix cw(g.codebook.size(), g.codebook.dim());
  std::copy_n(g.codebook.codewords().data, cw.size(), cw.data());
  std::copy_n(cw.row(0), cw.cols(), cw.row(1));
  const Codebook dup(cw.view());
  const auto unit = normalize_rows(g.data.centers.view(), "centers");
  const std::vector<int32_t> assignment = dup.assign(unit.view());
  ASSERT_EQ(std::count(assignment.begin(), assignment.end(), 1), 0);
  AirRouter air(g.data.centers.view(), dup);
  const Routes before = air.route(g.data.tokens.view(), 4, 2);
  air.update_codebook(1.0, 1);
  const MatrixView want = air.codebook().codewords();
  const std::vector<float> want_cw(want.data, want.data + want.rows * want.cols);
  ASSERT_GT(air.lists().list_size(1), 0) << "single-process repair";
  for (int P : {2, 3}) {
    std::vector<std::vector<float>> got(static_cast<size_t>(P));
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      const InvertedLists lists(assignment, dup.size());
      const runtime::Plan plan =
          runtime::plan_and_broadcast(comm, PlacementPolicy::kRoundRobin, dup, lists,
                                      std::vector<double>(static_cast<size_t>(dup.size()), 1.0));
      const Matrix local = g.local_centers(plan.placement, comm.rank());
      runtime::DistributedRouter router(comm, dup, assignment, plan.placement, local.view());
      // A probed list with no members (codeword 1) routes like one process.
      const Routes r = router.route(g.tokens_of(comm.rank(), P), 4, 2);
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(before, b, e).experts);
      router.sync_codebook(1.0, 1);
      const MatrixView v = router.codebook().codewords();
      got[comm.rank()].assign(v.data, v.data + v.rows * v.cols);
    });
    for (int rank = 0; rank < P; ++rank) EXPECT_EQ(got[rank], want_cw) << "P=" << P;
  }
}

TEST(DistributedEdges, RanksWithoutTokensOrExpertsAndMoreRanksThanLists) {
  // C = 2 lists on 4 ranks, 3 tokens: some ranks host nothing, some route
  // nothing; everything must still equal the single-process router.
  const GlobalData g = GlobalData::make(/*E=*/40, /*d=*/5, /*T=*/3, /*C=*/2, /*seed=*/11);
  const AirRouter air(g.data.centers.view(), g.codebook);
  for (PlacementPolicy policy : kAllPolicies) {
    const Routes want = air.route(g.data.tokens.view(), 3, 1);
    const int P = 4;
    std::vector<RouteRows> got(static_cast<size_t>(P));
    std::vector<int64_t> hosted(static_cast<size_t>(P));
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      runtime::DistributedRouter router = g.make_router(comm, policy);
      hosted[comm.rank()] = static_cast<int64_t>(router.local_experts().size());
      const Routes r = router.route(g.tokens_of(comm.rank(), P), 3, 1);
      got[comm.rank()] = RouteRows::of(r, 0, r.tokens);
    });
    for (int rank = 0; rank < P; ++rank) {
      const auto [b, e] = GlobalData::token_range(3, rank, P);
      EXPECT_EQ(got[rank].experts, RouteRows::of(want, b, e).experts) << runtime::to_string(policy);
      EXPECT_EQ(got[rank].gates, RouteRows::of(want, b, e).gates);
    }
    // 2 lists on 4 ranks: the list policy must split them to use every rank.
    if (policy == PlacementPolicy::kList) {
      EXPECT_EQ(std::count(hosted.begin(), hosted.end(), 0), 0);
    }
  }
}

TEST(DistributedEdges, AllExpertsOnOneRank) {
  const GlobalData& g = data();
  const AirRouter air(g.data.centers.view(), g.codebook);
  const Routes want = air.route(g.data.tokens.view(), 4, 2);
  const int P = 3;
  std::vector<RouteRows> got(static_cast<size_t>(P));
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    const runtime::Placement placement(
        P, std::vector<int32_t>(static_cast<size_t>(g.data.centers.rows()), 2), g.lists());
    const Matrix local = g.local_centers(placement, comm.rank());
    runtime::DistributedRouter router(comm, g.codebook, g.assignment, placement, local.view());
    const Routes r = router.route(g.tokens_of(comm.rank(), P), 4, 2);
    got[comm.rank()] = RouteRows::of(r, 0, r.tokens);
    // Only rank 2 is ever asked.
    for (int peer = 0; peer < 2; ++peer)
      if (peer != comm.rank()) {
        EXPECT_EQ(comm.meter().sent("requests", peer).messages, 0);
      }
  });
  for (int rank = 0; rank < P; ++rank) {
    const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), rank, P);
    EXPECT_EQ(got[rank].experts, RouteRows::of(want, b, e).experts);
  }
}

TEST(DistributedErrors, BadTokenOnOneRankFailsEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  std::atomic<int> failed{0};
  std::vector<std::string> messages(static_cast<size_t>(P));
  EXPECT_THROW(comm::run_ranks(P,
                               [&](comm::Communicator& comm) {
                                 runtime::DistributedRouter router =
                                     g.make_router(comm, PlacementPolicy::kList);
                                 Matrix tokens(2, g.data.tokens.cols(), 0.5f);
                                 if (comm.rank() == 1) tokens(1, 0) = std::nanf("");
                                 try {
                                   router.route(tokens.view(), 4, 2);
                                 } catch (const std::invalid_argument& e) {
                                   messages[comm.rank()] = e.what();
                                   ++failed;
                                   throw;
                                 }
                               }),
               std::invalid_argument);
  EXPECT_EQ(failed.load(), P) << "every rank refuses, none hangs";
  for (const auto& m : messages) {
    EXPECT_NE(m.find("rank 1"), std::string::npos) << m;
    EXPECT_NE(m.find("tokens row 1"), std::string::npos) << m;
  }
}

TEST(DistributedErrors, MismatchedConfigurationFailsEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  std::atomic<int> failed{0};
  EXPECT_ANY_THROW(comm::run_ranks(P, [&](comm::Communicator& comm) {
    const runtime::Plan plan =
        runtime::plan_and_broadcast(comm, PlacementPolicy::kList, g.codebook, g.lists(), g.load);
    const Matrix local = g.local_centers(plan.placement, comm.rank());
    Matrix cw(g.codebook.size(), g.codebook.dim());
    std::copy_n(g.codebook.codewords().data, cw.size(), cw.data());
    if (comm.rank() == 2) cw(0, 0) += 0.5f;  // rank 2 was given another codebook
    try {
      runtime::DistributedRouter router(comm, Codebook(cw.view()), g.assignment, plan.placement,
                                        local.view());
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("mismatch"), std::string::npos) << e.what();
      ++failed;
      throw;
    }
  }));
  EXPECT_EQ(failed.load(), P);
}

TEST(DistributedErrors, DifferentKOnOneRankIsRefused) {
  const GlobalData& g = data();
  std::atomic<int> failed{0};
  EXPECT_ANY_THROW(comm::run_ranks(2, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
    try {
      router.route(g.tokens_of(comm.rank(), 2), comm.rank() == 0 ? 4 : 5, 2);
    } catch (const std::exception&) {
      ++failed;
      throw;
    }
  }));
  EXPECT_EQ(failed.load(), 2);
}

// A bad bias on one rank, or different biases on different ranks: every
// rank raises together, naming the rank and the entry.
TEST(DistributedErrors, BadOrMismatchedBiasFailsEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  const int64_t E = g.data.centers.rows();
  for (const bool mismatch : {false, true}) {
    std::atomic<int> failed{0};
    std::vector<std::string> messages(static_cast<size_t>(P));
    EXPECT_ANY_THROW(comm::run_ranks(P, [&](comm::Communicator& comm) {
      runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
      Matrix bias(E, 1, 0.25f);
      if (comm.rank() == 1) bias(5, 0) = mismatch ? 0.5f : std::nanf("");
      try {
        router.set_bias(bias.view());
      } catch (const std::exception& e) {
        messages[comm.rank()] = e.what();
        ++failed;
        throw;
      }
    }));
    EXPECT_EQ(failed.load(), P) << "every rank refuses, none hangs";
    for (const auto& m : messages)
      EXPECT_NE(m.find(mismatch ? "selection bias" : "bias entry 5 is nan"), std::string::npos)
          << m;
  }
  // The shortlist gate mode is refused by every rank.
  std::atomic<int> failed{0};
  EXPECT_ANY_THROW(comm::run_ranks(2, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
    try {
      router.route_batch(g.tokens_of(comm.rank(), 2), 4, 2, GateMode::kShortlist);
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("not 'shortlist'"), std::string::npos) << e.what();
      ++failed;
      throw;
    }
  }));
  EXPECT_EQ(failed.load(), 2);
}

TEST(Coordinator, PlansAreBalancedAndDeterministic) {
  const GlobalData g = GlobalData::make(2000, 16, 500, 40, 3);
  const InvertedLists lists = g.lists();
  for (PlacementPolicy policy : kAllPolicies) {
    for (int P : {1, 2, 4, 7}) {
      const runtime::Plan a = runtime::plan_placement(policy, P, g.codebook, lists, g.load);
      const runtime::Plan b = runtime::plan_placement(policy, P, g.codebook, lists, g.load);
      EXPECT_EQ(a.placement.owners(), b.placement.owners());
      EXPECT_GE(a.imbalance, 1.0 - 1e-12);
      if (policy != PlacementPolicy::kRoundRobin) {
        EXPECT_LT(a.imbalance, 1.35) << runtime::to_string(policy) << " P=" << P;
      }
      // Every list's segments are the ranks of its members.
      for (int64_t c = 0; c < lists.lists(); ++c) {
        std::set<int32_t> ranks;
        for (int32_t e : lists.list(c)) ranks.insert(a.placement.owner(e));
        const auto seg = a.placement.list_ranks(c);
        EXPECT_EQ(std::vector<int32_t>(seg.begin(), seg.end()),
                  std::vector<int32_t>(ranks.begin(), ranks.end()));
      }
    }
  }
}

TEST(Coordinator, LocalityKeepsATokensProbesOnFewerRanks) {
  const GlobalData g = GlobalData::make(4000, 16, 800, 64, 9);
  const InvertedLists lists = g.lists();
  const ProbeSelection sel = select_probes(g.codebook, lists, g.data.tokens.view(), 4, 4);
  auto mean_ranks = [&](const runtime::Plan& plan) {
    double total = 0;
    for (int64_t t = 0; t < g.data.tokens.rows(); ++t) {
      std::set<int32_t> ranks;
      for (int64_t p = sel.offsets[t]; p < sel.offsets[t + 1]; ++p)
        for (int32_t r : plan.placement.list_ranks(sel.codewords[p])) ranks.insert(r);
      total += static_cast<double>(ranks.size());
    }
    return total / static_cast<double>(g.data.tokens.rows());
  };
  const int P = 8;
  const double rr = mean_ranks(
      runtime::plan_placement(PlacementPolicy::kRoundRobin, P, g.codebook, lists, g.load));
  const double list =
      mean_ranks(runtime::plan_placement(PlacementPolicy::kList, P, g.codebook, lists, g.load));
  const double loc =
      mean_ranks(runtime::plan_placement(PlacementPolicy::kLocality, P, g.codebook, lists, g.load));
  EXPECT_LT(list, rr);
  EXPECT_LE(loc, list);
}

TEST(Coordinator, BadInputIsRefused) {
  const GlobalData& g = data();
  const InvertedLists lists = g.lists();
  AIRMOE_EXPECT_THROW_MSG(
      runtime::plan_placement(PlacementPolicy::kList, 0, g.codebook, lists, g.load),
      std::invalid_argument, "ranks");
  AIRMOE_EXPECT_THROW_MSG(
      runtime::plan_placement(PlacementPolicy::kList, 2, g.codebook, lists, {1.0}),
      std::invalid_argument, "list loads");
  AIRMOE_EXPECT_THROW_MSG(runtime::placement_policy_from_string("random"), std::invalid_argument,
                          "random");
  AIRMOE_EXPECT_THROW_MSG(runtime::Placement(2, std::vector<int32_t>(lists.experts(), 5), lists),
                          std::invalid_argument, "rank 5");
}

}  // namespace
}  // namespace airmoe
