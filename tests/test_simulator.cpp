// The traffic simulator's exchange rules and its weak-scaling sample: a
// sample of every rank equals the full simulation, and the sparse rule
// counts the real peers plus a dissemination barrier.
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/exchange_rule.h"
#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/request_keys.h"
#include "runtime/coordinator.h"
#include "runtime/simulator.h"
#include "runtime/wire.h"
#include "runtime_fixture.h"

namespace airmoe {
namespace {

using comm::ExchangeKind;
using runtime::SimulatedTraffic;
using runtime::Strategy;
using test::GlobalData;

const GlobalData& data() {
  static const GlobalData g = GlobalData::make(/*E=*/601, /*d=*/16, /*T=*/97, /*C=*/23, 5);
  return g;
}

const Strategy kStrategies[] = {Strategy::kAir, Strategy::kDenseReplicated,
                                Strategy::kDenseBroadcast};

// With `pruned`, the routes' contenders from 8-bit request keys (the
// requests of the distributed router with set_request_keys(8)).
Routes routes_for(const GlobalData& g, Strategy s, bool pruned = false) {
  const AirRouter air(g.data.centers.view(), g.codebook);
  const int m = s == Strategy::kAir ? 3 : static_cast<int>(g.codebook.size());
  Routes r = air.route(g.data.tokens.view(), 4, m);
  if (pruned)
    set_contenders(r, g.data.tokens.view(), RequestKeys(g.data.centers.view(), 8), g.lists());
  return r;
}

runtime::Placement placement_for(const GlobalData& g, int P) {
  return runtime::plan_placement(runtime::PlacementPolicy::kLocality, P, g.codebook, g.lists(),
                                 g.load)
      .placement;
}

// Each rank's contiguous block, as simulate_traffic splits the tokens.
struct Blocks {
  std::vector<Routes> routes;
  std::vector<runtime::RankBlock> blocks;
};
Blocks every_rank(const Routes& routes, int P) {
  Blocks out;
  const int64_t T = routes.tokens;
  out.routes.reserve(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r) {
    const auto [b, e] = GlobalData::token_range(T, r, P);
    out.routes.push_back(runtime::slice_routes(routes, b, e));
    out.blocks.push_back({r, &out.routes.back()});
  }
  return out;
}

// Phases that leave home: the sample counts them on the sender, as the full
// simulation does.
bool leaves_home(const std::string& phase) {
  for (const char* p : {"requests", "dispatch", "grad_dispatch", "grad_logits"})
    if (phase.rfind(p, 0) == 0) return true;
  return phase.find(':') != std::string::npos;  // control messages: always the sender's
}

TEST(TrafficSimulator, SampleOfEveryRankEqualsTheFullSimulation) {
  const GlobalData& g = data();
  for (int P : {1, 2, 3, 5})
    for (Strategy s : kStrategies)
      for (ExchangeKind kind : {ExchangeKind::kSparse, ExchangeKind::kCountsFirst})
        for (DType wire : {DType::kF32, DType::kBF16}) {
          const Routes routes = routes_for(g, s, /*pruned=*/P == 3);
          const runtime::Placement placement = placement_for(g, P);
          const SimulatedTraffic full = runtime::simulate_traffic(
              s, placement, routes, g.data.tokens.view(), true, kind, wire);
          const Blocks all = every_rank(routes, P);
          const SimulatedTraffic sample = runtime::simulate_sample(
              s, placement, all.blocks, g.data.tokens.cols(), true, kind, wire);
          const std::string what = std::string(runtime::to_string(s)) + " P=" + std::to_string(P) +
                                   (kind == ExchangeKind::kSparse ? " sparse " : " dense ") +
                                   to_string(wire) + (P == 3 ? " with request keys" : "");
          EXPECT_TRUE(sample.sampled) << what;
          EXPECT_EQ(sample.rank_ids, full.rank_ids) << what;
          EXPECT_DOUBLE_EQ(sample.mean_ranks_per_token, full.mean_ranks_per_token) << what;
          ASSERT_EQ(sample.sent.size(), full.sent.size()) << what;
          for (const auto& [phase, per_rank] : full.sent) {
            ASSERT_TRUE(sample.sent.count(phase)) << what << " phase " << phase;
            EXPECT_EQ(sample.total(phase), full.total(phase)) << what << " phase " << phase;
            if (leaves_home(phase)) {
              EXPECT_EQ(sample.sent.at(phase), per_rank) << what << " " << phase;
            }
          }
        }
}

TEST(TrafficSimulator, SparseRuleCountsRealPeersAndTheBarrier) {
  const GlobalData& g = data();
  for (int P : {1, 3, 4, 7})
    for (Strategy s : kStrategies) {
      const Routes routes = routes_for(g, s);
      const runtime::Placement placement = placement_for(g, P);
      const SimulatedTraffic dense =
          runtime::simulate_traffic(s, placement, routes, g.data.tokens.view(), true,
                                    ExchangeKind::kCountsFirst, DType::kF32);
      const SimulatedTraffic sparse = runtime::simulate_traffic(
          s, placement, routes, g.data.tokens.view(), true, ExchangeKind::kSparse, DType::kF32);
      const int64_t rounds = P == 1 ? 0 : P <= 2 ? 1 : P <= 4 ? 2 : 3;  // ceil(log2 P)
      int phases = 0;
      for (const auto& [phase, per_rank] : dense.sent) {
        const auto colon = phase.find(':');
        if (colon == std::string::npos) {
          // The payload does not depend on the exchange.
          EXPECT_EQ(sparse.sent.at(phase), per_rank) << phase << " P=" << P;
          continue;
        }
        ++phases;
        EXPECT_EQ(phase.substr(colon), ":counts");
        for (const comm::TrafficCounts& c : per_rank)
          EXPECT_EQ(c, (comm::TrafficCounts{8 * (P - 1), P - 1})) << phase << " P=" << P;
        const std::string barrier = phase.substr(0, colon) + ":barrier";
        ASSERT_TRUE(sparse.sent.count(barrier)) << barrier;
        for (const comm::TrafficCounts& c : sparse.sent.at(barrier))
          EXPECT_EQ(c, (comm::TrafficCounts{0, rounds})) << barrier << " P=" << P;
        EXPECT_FALSE(sparse.sent.count(phase)) << phase << " in a sparse simulation";
      }
      EXPECT_EQ(phases, s == Strategy::kDenseReplicated ? 6 : 8);
    }
}

// The simulator counts message sizes instead of building the buffers: its
// requests and dispatch equal the sizes of the buffers wire.h builds, for
// either wire dtype.
TEST(TrafficSimulator, CountsWhatTheWireBuildersBuild) {
  const GlobalData& g = data();
  const int P = 3;
  const runtime::Placement placement = placement_for(g, P);
  for (const bool pruned : {false, true})
    for (Strategy s : kStrategies)
      for (DType wire : {DType::kF32, DType::kBF16}) {
        const Routes routes = routes_for(g, s, pruned);
        const SimulatedTraffic sim = runtime::simulate_traffic(
            s, placement, routes, g.data.tokens.view(), false, ExchangeKind::kSparse, wire);
        for (int home = 0; home < P; ++home) {
          const auto [b, e] = GlobalData::token_range(routes.tokens, home, P);
          const Routes mine = runtime::slice_routes(routes, b, e);
          const MatrixView block = g.tokens_of(home, P);
          comm::TrafficCounts requests, dispatch;
          auto add = [&](const runtime::wire::Outbox& out, comm::TrafficCounts& c) {
            for (int q = 0; q < P; ++q) {
              const int64_t n = out.send.bytes(q);
              if (comm::is_payload_message(home, q, n)) c += comm::TrafficCounts{n, 1};
            }
          };
          add(runtime::wire::expert_dispatch(placement, mine, block,
                                             s == Strategy::kDenseReplicated, wire, P),
              dispatch);
          EXPECT_EQ(sim.sent.at("dispatch")[home], dispatch)
              << runtime::to_string(s) << " " << to_string(wire);
          if (s == Strategy::kDenseReplicated) continue;
          add(runtime::wire::scoring_requests(placement, mine, block, P), requests);
          EXPECT_EQ(sim.sent.at("requests")[home], requests) << runtime::to_string(s);
          EXPECT_GT(requests.bytes, 0);
        }
      }
}

// Request keys send a token's requests only to its contenders' owners: fewer
// request and reply bytes (the routes, so the dispatch, are the same).
TEST(TrafficSimulator, RequestKeysCutRequestsAndRepliesOnly) {
  const GlobalData& g = data();
  const runtime::Placement placement = placement_for(g, 5);
  for (Strategy s : {Strategy::kAir, Strategy::kDenseBroadcast}) {
    const SimulatedTraffic plain =
        runtime::simulate_traffic(s, placement, routes_for(g, s), g.data.tokens.view(), true,
                                  ExchangeKind::kSparse, DType::kF32);
    const SimulatedTraffic pruned =
        runtime::simulate_traffic(s, placement, routes_for(g, s, true), g.data.tokens.view(), true,
                                  ExchangeKind::kSparse, DType::kF32);
    const std::string what = runtime::to_string(s);
    EXPECT_LT(pruned.total("requests").bytes, plain.total("requests").bytes) << what;
    EXPECT_LT(pruned.total("replies").bytes, plain.total("replies").bytes) << what;
    EXPECT_LT(pruned.mean_ranks_per_token, plain.mean_ranks_per_token) << what;
    EXPECT_EQ(pruned.total("dispatch"), plain.total("dispatch")) << what;
    EXPECT_EQ(pruned.total("combine"), plain.total("combine")) << what;
  }
}

// bf16 on the wire halves the vector part of every phase that carries token
// vectors (dispatch's only where vectors travel: dense-replicated) and
// changes nothing else: the same messages, the same headers, ids and gates.
TEST(TrafficSimulator, Bf16HalvesTheVectorBytes) {
  const GlobalData& g = data();
  const int64_t d = g.data.tokens.cols();
  for (int P : {1, 3, 4})
    for (Strategy s : kStrategies) {
      const Routes routes = routes_for(g, s);
      const runtime::Placement placement = placement_for(g, P);
      const SimulatedTraffic f32 = runtime::simulate_traffic(
          s, placement, routes, g.data.tokens.view(), true, ExchangeKind::kSparse, DType::kF32);
      const SimulatedTraffic bf16 = runtime::simulate_traffic(
          s, placement, routes, g.data.tokens.view(), true, ExchangeKind::kSparse, DType::kBF16);
      const std::string what = std::string(runtime::to_string(s)) + " P=" + std::to_string(P);
      ASSERT_EQ(f32.sent.size(), bf16.sent.size()) << what;
      // One combine row per dispatch record: its vector part in f32.
      const comm::TrafficCounts combine = f32.total("combine");
      if (P > 1) {
        EXPECT_GT(combine.bytes, 0) << what;
      }
      EXPECT_EQ(combine.bytes % (4 * d), 0) << what;
      const int64_t dispatched_vectors = s == Strategy::kDenseReplicated ? combine.bytes : 0;
      for (const auto& [phase, per_rank] : f32.sent) {
        const comm::TrafficCounts a = f32.total(phase), b = bf16.total(phase);
        EXPECT_EQ(a.messages, b.messages) << what << " " << phase;
        if (phase == "combine" || phase == "grad_dispatch" || phase == "grad_combine") {
          EXPECT_EQ(b.bytes * 2, a.bytes) << what << " " << phase;
        } else if (phase == "dispatch") {
          EXPECT_EQ(a.bytes - b.bytes, dispatched_vectors / 2) << what << " " << phase;
        } else {
          EXPECT_EQ(a.bytes, b.bytes) << what << " " << phase;
        }
      }
    }
}

// A rank's batch drawn on its own equals its rows of the whole data set.
TEST(TrafficSimulator, SyntheticTokensOfOneRankEqualTheirRows) {
  SyntheticConfig cfg;
  cfg.experts = 300;
  cfg.dim = 8;
  cfg.tokens = 50;
  const SyntheticData all = make_synthetic(cfg);
  const SyntheticGenerator gen(cfg);
  const Matrix block = gen.tokens(20, 13);
  for (int64_t t = 0; t < 13; ++t)
    for (int64_t c = 0; c < 8; ++c) ASSERT_EQ(block(t, c), all.tokens(20 + t, c));
  ASSERT_EQ(gen.centers().size(), all.centers.size());
  EXPECT_TRUE(std::equal(all.centers.data(), all.centers.data() + all.centers.size(),
                         gen.centers().data()));
  EXPECT_THROW(gen.tokens(-1, 2), std::invalid_argument);
}

TEST(TrafficSimulator, ExchangeRuleBarrierRounds) {
  EXPECT_EQ(comm::barrier_rounds(1), 0);
  EXPECT_EQ(comm::barrier_rounds(2), 1);
  EXPECT_EQ(comm::barrier_rounds(3), 2);
  EXPECT_EQ(comm::barrier_rounds(4), 2);
  EXPECT_EQ(comm::barrier_rounds(5), 3);
  EXPECT_EQ(comm::barrier_rounds(4096), 12);
  EXPECT_EQ(comm::barrier_rounds(4097), 13);
  EXPECT_EQ(comm::control_traffic(ExchangeKind::kSparse, 4096), (comm::TrafficCounts{0, 12}));
  EXPECT_EQ(comm::control_traffic(ExchangeKind::kCountsFirst, 4096),
            (comm::TrafficCounts{8 * 4095, 4095}));
}

}  // namespace
}  // namespace airmoe
