// The distributed router with ranks as threads (comm/in_process.h): routes,
// traffic and codebook sync against the single-process AirRouter.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <set>

#include "comm/in_process.h"
#include "router/dense_router.h"
#include "router_checks.h"
#include "runtime/coordinator.h"
#include "runtime/moe_layer.h"
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

// The collective checks of router_checks.h, with ranks as threads at P = 1..4
// (test_runtime_mpi.cpp runs the same bodies over MPI).
class DistributedRouterChecks : public ::testing::TestWithParam<int> {
 protected:
  template <typename Check>
  void run(Check&& check) {
    const int P = GetParam();
    std::atomic<int> ran{0};
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      check(comm);
      ++ran;
    });
    EXPECT_EQ(ran.load(), P) << "every rank ran the check to its end";
  }
};

TEST_P(DistributedRouterChecks, RoutesEqualSingleProcessForEveryPolicy) {
  for (PlacementPolicy policy : kAllPolicies)
    run([&](comm::Communicator& comm) {
      test::check_routes_equal_single_process(comm, data(), policy);
    });
}

TEST_P(DistributedRouterChecks, BiasedRoutesEqualSingleProcessForEveryPolicy) {
  for (PlacementPolicy policy : kAllPolicies)
    run([&](comm::Communicator& comm) {
      test::check_biased_routes_equal_single_process(comm, data(), policy);
    });
}

TEST_P(DistributedRouterChecks, RequestsReachExactlyTheCandidateRanks) {
  run([](comm::Communicator& comm) {
    test::check_requests_reach_exactly_the_candidate_ranks(comm, data());
  });
}

TEST_P(DistributedRouterChecks, CodebookSyncEqualsSingleProcess) {
  run([](comm::Communicator& comm) {
    test::check_codebook_sync_equals_single_process(comm, data());
  });
}

TEST_P(DistributedRouterChecks, BadTokenOnOneRankFailsEveryRank) {
  run([](comm::Communicator& comm) { test::check_bad_token_fails_every_rank(comm, data()); });
}

TEST_P(DistributedRouterChecks, QueryListsEqualSingleProcessForEveryPolicy) {
  for (const bool biased : {false, true})
    for (PlacementPolicy policy : kAllPolicies)
      run([&](comm::Communicator& comm) {
        test::check_query_lists_equal_single_process(comm, data(), policy, biased);
      });
}

TEST_P(DistributedRouterChecks, DeeperCountedQueryListsEqualSingleProcess) {
  for (PlacementPolicy policy : kAllPolicies)
    run([&](comm::Communicator& comm) {
      test::check_query_lists_equal_single_process(comm, data(), policy, true, 12);
    });
}

TEST_P(DistributedRouterChecks, RequestKeysKeepRoutesAndPruneRequests) {
  for (const bool query : {false, true})
    for (const bool biased : {false, true})
      for (PlacementPolicy policy : kAllPolicies)
        run([&](comm::Communicator& comm) {
          test::check_request_keys_keep_routes(comm, data(), policy, biased, query);
        });
}

TEST_P(DistributedRouterChecks, RequestKeysFollowCenterUpdates) {
  run([](comm::Communicator& comm) {
    test::check_request_keys_follow_center_updates(comm, data());
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, DistributedRouterChecks, ::testing::Values(1, 2, 3, 4));

TEST(DistributedTraffic, RepliesAreKPairsPerRequest) {
  const GlobalData& g = data();
  const int P = 3, k = 4, m = 3;
  std::vector<comm::TrafficCounts> requests(P), replies(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
    comm.meter().reset();
    router.route_batch(g.tokens_of(comm.rank(), P), k, m);
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
      const runtime::PlacementPlan plan =
          runtime::plan_and_broadcast(comm, PlacementPolicy::kRoundRobin, dup, lists,
                                      std::vector<double>(static_cast<size_t>(dup.size()), 1.0));
      const Matrix local = g.local_centers(plan.placement, comm.rank());
      runtime::DistributedRouter router(comm, dup, assignment, plan.placement, local.view());
      // A probed list with no members (codeword 1) routes like one process.
      const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), 4, 2).routes;
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
      const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), 3, 1).routes;
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
    const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), 4, 2).routes;
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

TEST(DistributedErrors, MismatchedConfigurationFailsEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  std::atomic<int> failed{0};
  EXPECT_ANY_THROW(comm::run_ranks(P, [&](comm::Communicator& comm) {
    const runtime::PlacementPlan plan =
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
      router.route_batch(g.tokens_of(comm.rank(), 2), comm.rank() == 0 ? 4 : 5, 2);
    } catch (const std::exception&) {
      ++failed;
      throw;
    }
  }));
  EXPECT_EQ(failed.load(), 2);
}

// A bad bias on one rank, or different biases on different ranks: every
// rank raises together, naming the entry or the mismatch.
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

// experts_in_rank_order is local_experts(0), local_experts(1), ... joined.
TEST(Coordinator, ExpertsInRankOrderJoinEachRanksExperts) {
  const GlobalData& g = data();
  for (int P : {1, 3, 7})
    for (PlacementPolicy policy : kAllPolicies) {
      const runtime::Placement placement =
          runtime::plan_placement(policy, P, g.codebook, g.lists(), g.load).placement;
      std::vector<int32_t> joined;
      for (int r = 0; r < P; ++r) {
        const std::vector<int32_t> mine = placement.local_experts(r);
        joined.insert(joined.end(), mine.begin(), mine.end());
      }
      EXPECT_EQ(placement.experts_in_rank_order(), joined)
          << "P=" << P << " " << runtime::to_string(policy);
    }
}

TEST(Coordinator, PlansAreBalancedAndDeterministic) {
  const GlobalData g = GlobalData::make(2000, 16, 500, 40, 3);
  const InvertedLists lists = g.lists();
  for (PlacementPolicy policy : kAllPolicies) {
    for (int P : {1, 2, 4, 7}) {
      const runtime::PlacementPlan a =
          runtime::plan_placement(policy, P, g.codebook, lists, g.load);
      const runtime::PlacementPlan b =
          runtime::plan_placement(policy, P, g.codebook, lists, g.load);
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
  auto mean_ranks = [&](const runtime::PlacementPlan& plan) {
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

// Bad query-list input on one rank, or settings that differ between ranks:
// every rank raises together with a message naming the argument, the row and
// the rank; none hangs, and the router still routes with its old lists.
TEST(DistributedQueryLists, BadInputFailsEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  const int64_t d = g.data.tokens.cols();
  struct Case {
    const char* name;
    std::function<Matrix(int rank)> sample;
    std::function<QueryListOptions(int rank)> options;
    std::vector<std::string> expect;
  };
  const auto some = [&](int64_t rows, int64_t cols) { return random_matrix(rows, cols, 1.0, 9); };
  const auto same = [](int) { return test::query_options(); };
  const std::vector<Case> cases = {
      {"wrong dimension on rank 1",
       [&](int r) { return r == 1 ? some(20, d + 1) : some(20, d); },
       same,
       {"rank 1", "sample tokens", "columns"}},
      {"nan in rank 2's row 3",
       [&](int r) {
         Matrix m = some(20, d);
         if (r == 2) m(3, 1) = std::nanf("");
         return m;
       },
       same,
       {"rank 2", "sample tokens row 3"}},
      {"zero row on rank 0",
       [&](int r) {
         Matrix m = some(20, d);
         if (r == 0) std::fill_n(m.row(5), d, 0.0f);
         return m;
       },
       same,
       {"rank 0", "row 5 has zero norm"}},
      {"empty sample on every rank",
       [&](int) { return Matrix(0, d); },
       same,
       {"no tokens on any rank"}},
      {"C above the whole sample",
       [&](int) { return some(2, d); },
       [](int) {
         QueryListOptions o = test::query_options();
         o.codewords = 7;
         return o;
       },
       {"C = 7", "6 sample tokens"}},
      {"list length above E",
       [&](int) { return some(20, d); },
       [&](int) {
         QueryListOptions o = test::query_options();
         o.list_length = g.data.centers.rows() + 1;
         return o;
       },
       {"list length L"}},
      {"options differ on rank 2",
       [&](int) { return some(20, d); },
       [](int r) {
         QueryListOptions o = test::query_options();
         if (r == 2) o.seed = 4;
         return o;
       },
       {"query list options", "rank 2"}},
  };
  for (const Case& c : cases) {
    std::atomic<int> failed{0};
    std::vector<std::string> messages(static_cast<size_t>(P));
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kList);
      const Matrix sample = c.sample(comm.rank());
      try {
        router.refresh_query_lists(sample.view(), c.options(comm.rank()));
      } catch (const std::exception& e) {
        messages[comm.rank()] = e.what();
        ++failed;
      }
      EXPECT_FALSE(router.has_query_lists()) << c.name;
      const MatrixView mine = g.tokens_of(comm.rank(), P);
      EXPECT_EQ(router.route_batch(mine, 4, 2).routes.tokens, mine.rows) << c.name;
    });
    EXPECT_EQ(failed.load(), P) << c.name << ": every rank refuses, none hangs";
    for (const std::string& m : messages)
      for (const std::string& part : c.expect)
        EXPECT_NE(m.find(part), std::string::npos) << c.name << ": " << m;
  }
}

// Query lists survive center updates (their members' rows move) and are
// refused by the codebook sync; the MoE layer builds them on air and
// dense-broadcast (which then probes every new list), carries them through a
// replan, and dense-replicated refuses them on every rank.
TEST(DistributedQueryLists, CenterUpdatesKeepThemAndSyncIsRefused) {
  const GlobalData& g = data();
  const test::QuerySample sample;
  const QueryListOptions options = test::query_options();
  for (const int P : {1, 3}) {
    std::atomic<int> refused{0};
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      runtime::DistributedRouter router = g.make_router(comm, PlacementPolicy::kRoundRobin);
      router.refresh_query_lists(sample.part(comm.rank(), P), options);
      Matrix moved = random_matrix(g.data.centers.rows(), g.data.centers.cols(), 0.3, 99);
      for (int64_t e = 0; e < moved.rows(); ++e)
        for (int64_t c = 0; c < moved.cols(); ++c) moved(e, c) += g.data.centers(e, c);
      AirRouter air(g.data.centers.view(), TensorView(), sample.tokens.view(), options);
      air.set_centers(moved.view());
      Matrix local(static_cast<int64_t>(router.local_experts().size()), moved.cols());
      for (size_t i = 0; i < router.local_experts().size(); ++i)
        std::copy_n(moved.row(router.local_experts()[i]), moved.cols(),
                    local.row(static_cast<int64_t>(i)));
      router.set_local_centers(local.view());
      EXPECT_TRUE(router.has_query_lists());
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
      const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), 4, 3).routes;
      const Routes want = air.route(g.data.tokens.view(), 4, 3);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(want, b, e).experts);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(want, b, e).gates);
      try {
        router.sync_codebook(1.0, 1);
      } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("refresh_query_lists"), std::string::npos) << e.what();
        ++refused;
      }
    });
    EXPECT_EQ(refused.load(), P);
  }
}

TEST(DistributedQueryLists, MoELayerBuildsThemAndKeepsThemThroughAReplan) {
  const GlobalData& g = data();
  const test::QuerySample sample;
  const QueryListOptions options = test::query_options();
  const AirRouter air(g.data.centers.view(), TensorView(), sample.tokens.view(), options);
  const int P = 3;
  runtime::MoEConfig cfg;
  cfg.k = 4;
  cfg.probes = 3;
  cfg.expert = {g.data.tokens.cols(), 3, runtime::Activation::kSilu};
  for (runtime::Strategy s : {runtime::Strategy::kAir, runtime::Strategy::kDenseBroadcast,
                              runtime::Strategy::kDenseReplicated}) {
    std::atomic<int> refused{0};
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      const runtime::PlacementPlan plan =
          runtime::plan_and_broadcast(comm, PlacementPolicy::kList, g.codebook, g.lists(), g.load);
      runtime::MoELayer layer(comm, s, cfg, g.codebook, g.assignment, plan.placement,
                              g.data.centers.view(), 123);
      if (s == runtime::Strategy::kDenseReplicated) {
        try {
          layer.refresh_query_lists(sample.part(comm.rank(), P), options);
        } catch (const std::invalid_argument& e) {
          EXPECT_NE(std::string(e.what()).find("dense-replicated"), std::string::npos) << e.what();
          ++refused;
        }
        return;
      }
      layer.refresh_query_lists(sample.part(comm.rank(), P), options);
      EXPECT_TRUE(layer.has_query_lists());
      EXPECT_EQ(layer.query_lists_build_flops(), air.query_lists_build_flops());
      layer.replan(PlacementPolicy::kRoundRobin, std::vector<double>(options.codewords, 1.0));
      EXPECT_TRUE(layer.has_query_lists()) << "a replan keeps the query lists";
      const MatrixView got = layer.codebook().codewords(), want = air.codebook().codewords();
      EXPECT_EQ(std::vector<float>(got.data, got.data + got.rows * got.cols),
                std::vector<float>(want.data, want.data + want.rows * want.cols));
      const int m = s == runtime::Strategy::kAir ? cfg.probes : static_cast<int>(options.codewords);
      const runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
      const Routes& r = fwd.handle.routes();
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
      const Routes want_routes = air.route(g.data.tokens.view(), cfg.k, m);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(want_routes, b, e).experts)
          << runtime::to_string(s);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(want_routes, b, e).gates)
          << runtime::to_string(s);
    });
    if (s == runtime::Strategy::kDenseReplicated) {
      EXPECT_EQ(refused.load(), P);
    }
  }
}

}  // namespace
}  // namespace airmoe
