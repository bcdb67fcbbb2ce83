// Collective checks of the distributed router, written once and run on both
// transports: with ranks as threads (test_runtime.cpp, comm::run_ranks) and
// over MPI (test_runtime_mpi.cpp, mpiexec), as comm_checks.h does for the
// communicators. Each takes this rank's communicator, is called by every
// rank together, and checks with EXPECTs (never ASSERTs, so that no rank
// leaves a collective sequence early).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "router/dense_router.h"
#include "runtime_fixture.h"
#include "test_util.h"

namespace airmoe::test {

// Every rank's routes equal the single-process AirRouter's rows of its
// tokens, bit for bit, at m = 1, 3 and C (m = C: the dense router's); the
// scoring ranks hand back the token vectors they received.
inline void check_routes_equal_single_process(comm::Communicator& comm, const GlobalData& g,
                                              runtime::PlacementPolicy policy) {
  const AirRouter air(g.data.centers.view(), g.codebook);
  const int P = comm.size(), k = 4;
  const int C = static_cast<int>(g.codebook.size());
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
  runtime::DistributedRouter router = g.make_router(comm, policy);
  for (int m : {1, 3, C}) {
    const runtime::RouteResult r = router.route_batch(g.tokens_of(comm.rank(), P), k, m);
    const RouteRows got = RouteRows::of(r.routes, 0, r.routes.tokens);
    const RouteRows want = RouteRows::of(air.route(g.data.tokens.view(), k, m), b, e);
    const std::string where = std::string(runtime::to_string(policy)) + " P=" + std::to_string(P) +
                              " rank " + std::to_string(comm.rank()) + " m=" + std::to_string(m);
    EXPECT_EQ(got.experts, want.experts) << where;
    EXPECT_EQ(got.gates, want.gates) << where;
    if (m == C) {
      const RouteRows exact =
          RouteRows::of(DenseRouter(g.data.centers.view()).route(g.data.tokens.view(), k), b, e);
      EXPECT_EQ(got.experts, exact.experts) << where << ": m = C must be exact routing";
      EXPECT_EQ(got.gates, exact.gates) << where;
    }
    // The scoring ranks keep what they received, for the dispatch to come.
    EXPECT_EQ(r.received.vectors.rows(), static_cast<int64_t>(r.received.home_rank.size()))
        << where;
    EXPECT_EQ(r.received.home_token.size(), r.received.home_rank.size()) << where;
  }
}

// With a selection bias (replicated on every rank) and chosen or sigmoid
// gates: every rank's routes equal the biased single-process AirRouter's, bit
// for bit, at m = 1, 3 and C, whatever P and the placement.
inline void check_biased_routes_equal_single_process(comm::Communicator& comm, const GlobalData& g,
                                                     runtime::PlacementPolicy policy) {
  const Matrix bias = random_matrix(g.data.centers.rows(), 1, 2.0, 77);
  AirRouter air(g.data.centers.view(), g.codebook);
  const int P = comm.size(), k = 4;
  const Routes unbiased = air.route(g.data.tokens.view(), k, 3);
  air.set_bias(bias.view());
  EXPECT_NE(air.route(g.data.tokens.view(), k, 3).experts, unbiased.experts)
      << "the bias moved no route";
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
  runtime::DistributedRouter router = g.make_router(comm, policy);
  router.set_bias(bias.view());
  for (GateMode mode : {GateMode::kChosen, GateMode::kSigmoid})
    for (int m : {1, 3, static_cast<int>(g.codebook.size())}) {
      const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), k, m, mode).routes;
      const RouteRows got = RouteRows::of(r, 0, r.tokens);
      const RouteRows want = RouteRows::of(air.route(g.data.tokens.view(), k, m, mode), b, e);
      const std::string where = std::string(runtime::to_string(policy)) +
                                " P=" + std::to_string(P) + " rank " + std::to_string(comm.rank()) +
                                " " + to_string(mode) + " m=" + std::to_string(m);
      EXPECT_EQ(got.experts, want.experts) << where;
      EXPECT_EQ(got.gates, want.gates) << where;
    }
}

// Each rank routes one token at a time; the ranks the meter saw requests go
// to must be exactly the owners of the probed lists' members (from the
// placement's owners and the single-process router's probes), each request
// carrying (token, n) header, n probed codewords and the vector.
inline void check_requests_reach_exactly_the_candidate_ranks(comm::Communicator& comm,
                                                             const GlobalData& g) {
  const AirRouter air(g.data.centers.view(), g.codebook);
  const InvertedLists lists = g.lists();
  const int P = comm.size(), k = 4, m = 2;
  const int64_t d = g.data.tokens.cols();
  const Routes ref = air.route(g.data.tokens.view(), k, m);
  runtime::DistributedRouter router = g.make_router(comm, runtime::PlacementPolicy::kLocality);
  const auto& owners = router.placement().owners();
  for (int64_t round = 0; round < 5; ++round) {
    const int64_t t = (round * P + comm.rank()) % g.data.tokens.rows();
    comm.meter().reset();
    router.route_batch(MatrixView(g.data.tokens.row(t), 1, d), k, m);
    // Expected: per peer, the probed codewords it hosts a member of.
    std::map<int, int64_t> hosted;
    for (int64_t p = ref.probe_offsets[t]; p < ref.probe_offsets[t + 1]; ++p) {
      std::set<int> ranks;
      for (int32_t e : lists.list(ref.probed_codewords[p])) ranks.insert(owners[e]);
      for (int r : ranks) ++hosted[r];
    }
    for (int peer = 0; peer < P; ++peer) {
      if (peer == comm.rank()) continue;
      const comm::TrafficCounts sent = comm.meter().sent("requests", peer);
      const auto it = hosted.find(peer);
      EXPECT_EQ(sent.messages, it == hosted.end() ? 0 : 1) << "token " << t << " peer " << peer;
      EXPECT_EQ(sent.bytes, it == hosted.end() ? 0 : 8 + 4 * it->second + 4 * d)
          << "token " << t << " peer " << peer;
    }
  }
}

// Centers moved, then a distributed codebook sync: the codebook and lists on
// every rank are the single-process router's after the same update, bit for
// bit, and so are the routes with them.
inline void check_codebook_sync_equals_single_process(comm::Communicator& comm,
                                                      const GlobalData& g) {
  // Drift: shift every center a little, deterministically.
  Matrix moved = random_matrix(g.data.centers.rows(), g.data.centers.cols(), 0.3, 99);
  for (int64_t e = 0; e < moved.rows(); ++e)
    for (int64_t c = 0; c < moved.cols(); ++c) moved(e, c) += g.data.centers(e, c);
  AirRouter air(g.data.centers.view(), g.codebook);
  air.set_centers(moved.view());
  air.update_codebook(1.0, 3);
  runtime::DistributedRouter router = g.make_router(comm, runtime::PlacementPolicy::kList);
  Matrix local(static_cast<int64_t>(router.local_experts().size()), moved.cols());
  for (size_t i = 0; i < router.local_experts().size(); ++i)
    std::copy_n(moved.row(router.local_experts()[i]), moved.cols(),
                local.row(static_cast<int64_t>(i)));
  router.set_local_centers(local.view());
  comm.meter().reset();
  router.sync_codebook(1.0, 3);
  const std::string where =
      "P=" + std::to_string(comm.size()) + " rank " + std::to_string(comm.rank());
  const MatrixView got = router.codebook().codewords(), want = air.codebook().codewords();
  EXPECT_EQ(std::vector<float>(got.data, got.data + got.rows * got.cols),
            std::vector<float>(want.data, want.data + want.rows * want.cols))
      << where;
  EXPECT_EQ(router.lists().assignment(), air.lists().assignment()) << where;
  if (comm.size() > 1) {
    EXPECT_GT(comm.meter().sent("kmeans_sync").bytes, 0) << where;
  }
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), comm.size());
  const Routes r = router.route_batch(g.tokens_of(comm.rank(), comm.size()), 4, 2).routes;
  const Routes want_routes = air.route(g.data.tokens.view(), 4, 2);
  EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(want_routes, b, e).experts)
      << where;
  EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(want_routes, b, e).gates) << where;
}

// A NaN in one token of the last rank: every rank refuses the call together,
// naming that rank and the row, and the router still routes afterwards
// (nothing was left half-sent).
inline void check_bad_token_fails_every_rank(comm::Communicator& comm, const GlobalData& g) {
  const int bad_rank = comm.size() - 1;
  runtime::DistributedRouter router = g.make_router(comm, runtime::PlacementPolicy::kList);
  Matrix tokens(2, g.data.tokens.cols(), 0.5f);
  if (comm.rank() == bad_rank) tokens(1, 0) = std::nanf("");
  try {
    router.route_batch(tokens.view(), 4, 2);
    ADD_FAILURE() << "rank " << comm.rank() << ": expected every rank to refuse";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("rank " + std::to_string(bad_rank)), std::string::npos) << msg;
    EXPECT_NE(msg.find("tokens row 1"), std::string::npos) << msg;
  }
  const MatrixView mine = g.tokens_of(comm.rank(), comm.size());
  EXPECT_EQ(router.route_batch(mine, 4, 2).routes.tokens, mine.rows);
}

// A sample for query lists, apart from the routed tokens, and its split:
// contiguous parts in rank order, the last rank holding none when P > 2 (a
// rank with no sample still takes part).
struct QuerySample {
  static constexpr int64_t kTokens = 203;
  Matrix tokens = random_matrix(kTokens, 16, 1.0, 4242);
  static std::pair<int64_t, int64_t> range(int rank, int P) {
    const int parts = P > 2 ? P - 1 : P;
    if (rank >= parts) return {kTokens, kTokens};
    return GlobalData::token_range(kTokens, rank, parts);
  }
  MatrixView part(int rank, int P) const {
    const auto [b, e] = range(rank, P);
    return {tokens.row(b), e - b, tokens.cols()};
  }
};

inline QueryListOptions query_options() {
  return {.codewords = 9, .list_length = 40, .k = 4, .kmeans_iterations = 5, .seed = 3};
}

// Query lists built from a sample split over the ranks: codebook, lists and
// build FLOPs equal build_query_lists' on the whole sample, bit for bit; the
// routes (ids, gates, shortlist sizes) equal the single-process AirRouter's
// built from that sample at m = 1, 3 and C, and m = C equals dense routing;
// all with or without a selection bias, whatever P and the placement, and
// for lists that count the sample's top-k deeper than the routes' k
// (`list_k`; 0: query_options().k, the routes' k).
inline void check_query_lists_equal_single_process(comm::Communicator& comm, const GlobalData& g,
                                                   runtime::PlacementPolicy policy, bool biased,
                                                   int list_k = 0) {
  const QuerySample sample;
  QueryListOptions options = query_options();
  if (list_k > 0) options.k = list_k;
  const Matrix bias = biased ? random_matrix(g.data.centers.rows(), 1, 2.0, 77) : Matrix();
  const TensorView bias_view = biased ? TensorView(bias.view()) : TensorView();
  const QueryLists want =
      build_query_lists(g.data.centers.view(), bias_view, sample.tokens.view(), options);
  const AirRouter air(g.data.centers.view(), bias_view, sample.tokens.view(), options);
  const int P = comm.size(), k = 4, C = static_cast<int>(options.codewords);
  const std::string where = std::string(runtime::to_string(policy)) + " P=" + std::to_string(P) +
                            " rank " + std::to_string(comm.rank()) +
                            (biased ? " biased" : " unbiased") + " list_k " +
                            std::to_string(options.k);
  runtime::DistributedRouter router = g.make_router(comm, policy);
  if (biased) router.set_bias(bias.view());
  comm.meter().reset();
  router.refresh_query_lists(sample.part(comm.rank(), P), options);
  if (P > 1) {
    EXPECT_GT(comm.meter().sent("query_lists").bytes, 0) << where;
  }

  ASSERT_TRUE(router.has_query_lists()) << where;
  const QueryLists got = *router.query_lists();
  const MatrixView gc = got.codebook.codewords(), wc = want.codebook.codewords();
  EXPECT_EQ(std::vector<float>(gc.data, gc.data + gc.rows * gc.cols),
            std::vector<float>(wc.data, wc.data + wc.rows * wc.cols))
      << where;
  EXPECT_EQ(got.membership.offsets, want.membership.offsets) << where;
  EXPECT_EQ(got.membership.lists, want.membership.lists) << where;
  EXPECT_GT(got.membership.entries(), got.membership.experts()) << where << ": lists overlap";
  EXPECT_EQ(router.query_lists_build_flops(), want.build_flops) << where;
  EXPECT_EQ(router.query_lists_build_flops(),
            query_lists_build_flops(QuerySample::kTokens, g.data.centers.rows(),
                                    g.data.centers.cols(), options))
      << where;

  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
  DenseRouter dense(g.data.centers.view());
  if (biased) dense.set_bias(bias.view());
  for (int m : {1, 3, C}) {
    const Routes r = router.route_batch(g.tokens_of(comm.rank(), P), k, m).routes;
    const Routes single = air.route(g.data.tokens.view(), k, m);
    const std::string at = where + " m=" + std::to_string(m);
    EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(single, b, e).experts) << at;
    EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(single, b, e).gates) << at;
    EXPECT_EQ(r.shortlist_size, std::vector<int32_t>(single.shortlist_size.begin() + b,
                                                     single.shortlist_size.begin() + e))
        << at;
    if (m == C) {
      const Routes exact = dense.route(g.data.tokens.view(), k);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(exact, b, e).experts)
          << at << ": every list probed must be exact routing";
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(exact, b, e).gates) << at;
    }
  }
}

// Token t's request bytes to peers other than this rank, counted from the
// placement's segments and the contenders: (token, n) header, n probed
// codewords the peer hosts and the vector, for every peer hosting a probed
// list that owns a contender.
inline int64_t expected_pruned_request_bytes(const runtime::Placement& placement, const Routes& r,
                                             int64_t t, int me, int64_t d) {
  std::map<int, int64_t> hosted;
  for (int64_t p = r.probe_offsets[t]; p < r.probe_offsets[t + 1]; ++p)
    for (int32_t rank : placement.list_ranks(r.probed_codewords[p])) ++hosted[rank];
  std::set<int> owners;
  for (int64_t i = r.contender_offsets[t]; i < r.contender_offsets[t + 1]; ++i)
    owners.insert(placement.owner(r.contenders[i]));
  int64_t bytes = 0;
  for (const auto& [rank, n] : hosted)
    if (rank != me && owners.count(rank)) bytes += 8 + 4 * n + 4 * d;
  return bytes;
}

// With request keys (8 bits, and 3 and 12 at m = C): every rank's routes equal the
// single-process AirRouter's bit for bit (ids, gates, logits), plain or
// query lists, with or without a selection bias, at m = 1, 3 and C; each
// token's contenders hold its experts; its requests carry exactly what the
// contenders' owners among the probed lists' ranks should get; and with
// every list probed at P > 1 the keys send fewer request bytes in all.
inline void check_request_keys_keep_routes(comm::Communicator& comm, const GlobalData& g,
                                           runtime::PlacementPolicy policy, bool biased,
                                           bool query) {
  const QuerySample sample;
  const QueryListOptions options = query_options();
  const Matrix bias = biased ? random_matrix(g.data.centers.rows(), 1, 2.0, 77) : Matrix();
  const TensorView bias_view = biased ? TensorView(bias.view()) : TensorView();
  AirRouter air = query ? AirRouter(g.data.centers.view(), bias_view, sample.tokens.view(), options)
                        : AirRouter(g.data.centers.view(), g.codebook);
  if (biased && !query) air.set_bias(bias.view());
  const int P = comm.size(), k = 4, me = comm.rank();
  const int64_t d = g.data.centers.cols();
  runtime::DistributedRouter router = g.make_router(comm, policy);
  if (biased) router.set_bias(bias.view());
  if (query) router.refresh_query_lists(sample.part(me, P), options);
  const int C = static_cast<int>(router.codebook().size());
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), me, P);
  const std::string where = std::string(runtime::to_string(policy)) + " P=" + std::to_string(P) +
                            " rank " + std::to_string(me) + (biased ? " biased" : "") +
                            (query ? " query lists" : " plain lists");
  int64_t bytes[2] = {0, 0};  // at m = C: without keys, with
  for (int bits : {8, 3, 12}) {
    for (int m : {1, 3, C}) {
      if (bits != 8 && m != C) continue;
      const std::string at = where + " " + std::to_string(bits) + " bits m=" + std::to_string(m);
      router.set_request_keys(0);
      comm.meter().reset();
      const Routes plain = router.route_batch(g.tokens_of(me, P), k, m).routes;
      if (m == C && bits == 8) bytes[0] = comm.meter().sent("requests").bytes;
      router.set_request_keys(bits);
      EXPECT_EQ(router.request_keys().experts(), g.data.centers.rows()) << at;
      comm.meter().reset();
      const Routes r = router.route_batch(g.tokens_of(me, P), k, m).routes;
      if (m == C && bits == 8) bytes[1] = comm.meter().sent("requests").bytes;
      const Routes single = air.route(g.data.tokens.view(), k, m);
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(single, b, e).experts) << at;
      EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(single, b, e).gates) << at;
      EXPECT_EQ(r.logits, plain.logits) << at;
      EXPECT_EQ(r.shortlist_size, plain.shortlist_size) << at;
      ASSERT_EQ(r.contender_offsets.size(), static_cast<size_t>(r.tokens + 1)) << at;
      int64_t want = 0;
      for (int64_t t = 0; t < r.tokens; ++t) {
        const std::span<const int32_t> c(r.contenders.data() + r.contender_offsets[t],
                                         r.contender_offsets[t + 1] - r.contender_offsets[t]);
        for (const int32_t* x = r.experts_of(t); x != r.experts_of(t) + k; ++x)
          EXPECT_TRUE(std::binary_search(c.begin(), c.end(), *x)) << at << " token " << t;
        want += expected_pruned_request_bytes(router.placement(), r, t, me, d);
      }
      EXPECT_EQ(comm.meter().sent("requests").bytes, want) << at;
    }
  }
  int64_t totals[2] = {bytes[0], bytes[1]};
  comm.allreduce_sum(totals, 2);
  if (P > 1) {
    EXPECT_LT(totals[1], totals[0]) << where << ": the keys pruned no request at m = C";
  }
  router.set_request_keys(0);
  EXPECT_TRUE(router.request_keys().empty()) << where;
}

// With request keys, the centers move: a small move gathers only each
// expert's drift ("request_keys:drift"), a large one new keys
// ("request_keys"); either way the routes stay the single-process
// AirRouter's after the same move, bit for bit.
inline void check_request_keys_follow_center_updates(comm::Communicator& comm,
                                                     const GlobalData& g) {
  const int P = comm.size(), k = 4, m = 3, me = comm.rank();
  AirRouter air(g.data.centers.view(), g.codebook);
  runtime::DistributedRouter router = g.make_router(comm, runtime::PlacementPolicy::kList);
  router.set_request_keys(8);
  const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), me, P);
  Matrix moved(g.data.centers.rows(), g.data.centers.cols());
  for (const double scale : {1e-5, 0.3}) {
    const Matrix noise = random_matrix(moved.rows(), moved.cols(), scale, 31);
    for (int64_t x = 0; x < moved.rows(); ++x)
      for (int64_t c = 0; c < moved.cols(); ++c) moved(x, c) = g.data.centers(x, c) + noise(x, c);
    air.set_centers(moved.view());
    Matrix local(static_cast<int64_t>(router.local_experts().size()), moved.cols());
    for (size_t i = 0; i < router.local_experts().size(); ++i)
      std::copy_n(moved.row(router.local_experts()[i]), moved.cols(),
                  local.row(static_cast<int64_t>(i)));
    comm.meter().reset();
    router.set_local_centers(local.view());
    const std::string where =
        "P=" + std::to_string(P) + " rank " + std::to_string(me) + " move " + std::to_string(scale);
    if (P > 1) {
      const bool small = scale < 1e-3;
      EXPECT_EQ(comm.meter().sent("request_keys").bytes > 0, !small) << where;
      EXPECT_GT(comm.meter().sent("request_keys:drift").bytes, 0) << where;
    }
    EXPECT_EQ(router.request_keys().drift().empty(), scale > 1e-3) << where;
    const Routes r = router.route_batch(g.tokens_of(me, P), k, m).routes;
    const Routes single = air.route(g.data.tokens.view(), k, m);
    EXPECT_EQ(RouteRows::of(r, 0, r.tokens).experts, RouteRows::of(single, b, e).experts) << where;
    EXPECT_EQ(RouteRows::of(r, 0, r.tokens).gates, RouteRows::of(single, b, e).gates) << where;
  }
}

}  // namespace airmoe::test
