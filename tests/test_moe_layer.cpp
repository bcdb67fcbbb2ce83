// The distributed MoE layer (three strategies) against a single-process
// reference, with ranks as threads.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <type_traits>

#include "comm/in_process.h"
#include "moe_fixture.h"
#include "ops/bf16.h"
#include "router/request_keys.h"
#include "runtime/simulator.h"
#include "runtime/wire.h"
#include "test_util.h"

namespace airmoe {
namespace {

using runtime::MoEConfig;
using runtime::MoELayer;
using runtime::PlacementPolicy;
using runtime::Strategy;
using test::GlobalData;

const GlobalData& data() {
  static const GlobalData g = GlobalData::make(/*E=*/601, /*d=*/16, /*T=*/97, /*C=*/23, 5);
  return g;
}

MoEConfig config() {
  MoEConfig cfg;
  cfg.k = 4;
  cfg.probes = 3;
  cfg.expert = {16, 3, runtime::Activation::kGelu};
  return cfg;
}

Matrix upstream(const GlobalData& g) {
  return random_matrix(g.data.tokens.rows(), g.data.tokens.cols(), 1.0, 77);
}

MoELayer make_layer(comm::Communicator& comm, const GlobalData& g, Strategy s,
                    PlacementPolicy policy, const MoEConfig& cfg) {
  const runtime::PlacementPlan plan =
      runtime::plan_and_broadcast(comm, policy, g.codebook, g.lists(), g.load);
  return MoELayer(comm, s, cfg, g.codebook, g.assignment, plan.placement, g.data.centers.view(),
                  /*expert_seed=*/123);
}

class LayerEqualsReference
    : public ::testing::TestWithParam<std::tuple<int, Strategy, PlacementPolicy>> {};

TEST_P(LayerEqualsReference, ForwardAndEveryGradient) {
  const auto [P, strategy, policy] = GetParam();
  const GlobalData& g = data();
  MoEConfig cfg = config();
  cfg.dense_expert_grads = true;  // the checks below read the dense layout
  const Matrix dy = upstream(g);
  const test::ReferenceResult ref = test::reference_layer(g, strategy, cfg, 123, dy.view());
  const int64_t d = g.data.tokens.cols(), h = cfg.expert.hidden;
  std::mutex mu;
  std::map<int32_t, std::vector<float>> center_grads;  // union over ranks
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, strategy, policy, cfg);
    const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
    runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
    const Matrix& out = fwd.output;
    const MatrixView my_dy(dy.row(b), e - b, d);
    const runtime::MoEGradients grads = layer.backward(fwd.handle, my_dy);
    const size_t n = static_cast<size_t>((e - b) * d);
    EXPECT_LE(test::rel_error(out.data(), ref.out.row(b), n), 1e-5)
        << "output, rank " << comm.rank();
    EXPECT_LE(test::rel_error(grads.d_tokens.data(), ref.d_tokens.row(b), n), 1e-5)
        << "d_tokens, rank " << comm.rank();
    // Expert parameter gradients, asked for in the dense layout: each hosted
    // expert's rows of the reference.
    ASSERT_EQ(grads.dense_experts.w1.size(), static_cast<size_t>(layer.experts().size() * h * d));
    for (int64_t i = 0; i < layer.experts().size(); ++i) {
      const int32_t id = layer.experts().ids()[i];
      const size_t w = static_cast<size_t>(h * d);
      EXPECT_LE(
          test::rel_error(grads.dense_experts.w1.data() + i * w, ref.experts.w1.data() + id * w, w),
          1e-5)
          << "dW1 of expert " << id;
      EXPECT_LE(
          test::rel_error(grads.dense_experts.w2.data() + i * w, ref.experts.w2.data() + id * w, w),
          1e-5)
          << "dW2 of expert " << id;
    }
    std::lock_guard<std::mutex> lock(mu);
    for (size_t r = 0; r < grads.d_centers.rows.size(); ++r) {
      const int32_t id = grads.d_centers.rows[r];
      EXPECT_EQ(center_grads.count(id), 0u) << "center " << id << " has gradients on two ranks";
      const float* v = grads.d_centers.values.row(static_cast<int64_t>(r));
      center_grads[id].assign(v, v + d);
    }
  });
  // Center gradients: exactly the reference's rows, each within tolerance.
  ASSERT_EQ(center_grads.size(), ref.d_centers.rows.size());
  for (size_t r = 0; r < ref.d_centers.rows.size(); ++r) {
    const int32_t id = ref.d_centers.rows[r];
    ASSERT_EQ(center_grads.count(id), 1u) << "center " << id;
    EXPECT_LE(
        test::rel_error(center_grads[id].data(), ref.d_centers.values.row(static_cast<int64_t>(r)),
                        static_cast<size_t>(d)),
        1e-5)
        << "center " << id;
  }
}

INSTANTIATE_TEST_SUITE_P(RanksStrategiesPolicies, LayerEqualsReference,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(Strategy::kAir,
                                                              Strategy::kDenseReplicated,
                                                              Strategy::kDenseBroadcast),
                                            ::testing::Values(PlacementPolicy::kRoundRobin,
                                                              PlacementPolicy::kLocality)));

// A selection bias that moves routes: N(0, 1) per expert, against logits of
// a few tenths.
Matrix selection_bias(int64_t experts) {
  return random_matrix(experts, 1, 1.0, 991);
}

// Selection by z + b, gates and every gradient from z: the layer equals the
// single-process biased routers' reference on every strategy and P, and the
// bias survives a replan and a center update (routers are rebuilt there).
class LayerWithBias : public ::testing::TestWithParam<std::tuple<int, Strategy>> {};

TEST_P(LayerWithBias, EqualsBiasedReferenceBeforeAndAfterReplan) {
  const auto [P, strategy] = GetParam();
  const GlobalData& g = data();
  const MoEConfig cfg = config();
  const Matrix dy = upstream(g), bias = selection_bias(g.data.centers.rows());
  const test::ReferenceResult ref =
      test::reference_layer(g, strategy, cfg, 123, dy.view(), bias.view());
  const test::ReferenceResult plain = test::reference_layer(g, strategy, cfg, 123, dy.view());
  ASSERT_NE(ref.routes.experts, plain.routes.experts) << "the bias must move some route";
  const int64_t d = g.data.tokens.cols();
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, strategy, PlacementPolicy::kRoundRobin, cfg);
    layer.set_bias(bias.view());
    ASSERT_EQ(layer.bias().rows, g.data.centers.rows());
    const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
    const size_t n = static_cast<size_t>((e - b) * d);
    const MatrixView my_dy(dy.row(b), e - b, d);
    for (const char* when : {"before replan", "after replan"}) {
      runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
      const runtime::MoEGradients grads = layer.backward(fwd.handle, my_dy);
      EXPECT_LE(test::rel_error(fwd.output.data(), ref.out.row(b), n), 1e-5)
          << "output, rank " << comm.rank() << ", " << when;
      EXPECT_LE(test::rel_error(grads.d_tokens.data(), ref.d_tokens.row(b), n), 1e-5)
          << "d_tokens, rank " << comm.rank() << ", " << when;
      layer.replan(PlacementPolicy::kLocality, g.load);
    }
    // Moved centers: dense-replicated rebuilds its replica; the bias stays.
    Matrix moved = layer.local_centers();
    for (int64_t i = 0; i < moved.rows(); ++i) moved(i, 0) += 0.01f;
    layer.set_local_centers(moved.view());
    ASSERT_EQ(layer.bias().rows, g.data.centers.rows()) << "rank " << comm.rank();
    EXPECT_EQ(0, std::memcmp(layer.bias().as<float>(), bias.data(), bias.size() * sizeof(float)));
    layer.set_local_centers(runtime::hosted_rows(g.data.centers.view(), layer.hosted()).view());
    layer.clear_bias();
    EXPECT_EQ(layer.bias().rows, 0);
    const Matrix unbiased = layer.forward(g.tokens_of(comm.rank(), P)).output;
    EXPECT_LE(test::rel_error(unbiased.data(), plain.out.row(b), n), 1e-5)
        << "cleared, rank " << comm.rank();
  });
}

INSTANTIATE_TEST_SUITE_P(RanksStrategies, LayerWithBias,
                         ::testing::Combine(::testing::Values(1, 2, 3),
                                            ::testing::Values(Strategy::kAir,
                                                              Strategy::kDenseReplicated,
                                                              Strategy::kDenseBroadcast)));

// A bias that is bad on one rank, differs between ranks, or is cleared on one
// rank while set on another fails on every rank, and the layer goes on.
TEST(MoELayer, BadOrDifferingBiasRaisesOnEveryRank) {
  const GlobalData& g = data();
  const int64_t E = g.data.centers.rows();
  const Matrix bias = selection_bias(E), short_bias = selection_bias(E - 1);
  Matrix other = selection_bias(E);
  other(7, 0) += 1.0f;
  const int P = 3;
  for (const Strategy s : {Strategy::kAir, Strategy::kDenseReplicated}) {
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      MoELayer layer = make_layer(comm, g, s, PlacementPolicy::kRoundRobin, config());
      const bool odd = comm.rank() == 1;
      AIRMOE_EXPECT_THROW_MSG(layer.set_bias(odd ? short_bias.view() : bias.view()),
                              std::invalid_argument, "rank 1: bias has 600 entries");
      AIRMOE_EXPECT_THROW_MSG(layer.set_bias(odd ? other.view() : bias.view()), std::runtime_error,
                              "selection bias");
      if (odd)
        AIRMOE_EXPECT_THROW_MSG(layer.clear_bias(), std::runtime_error, "selection bias");
      else
        AIRMOE_EXPECT_THROW_MSG(layer.set_bias(bias.view()), std::runtime_error, "selection bias");
      EXPECT_EQ(layer.bias().rows, 0) << "a refused bias is not kept";
      layer.set_bias(bias.view());
      EXPECT_EQ(layer.forward(g.tokens_of(comm.rank(), P)).output.rows(),
                g.tokens_of(comm.rank(), P).rows);
    });
  }
}

TEST(MoELayer, AirWithAllProbesEqualsDenseReplicated) {
  const GlobalData& g = data();
  MoEConfig cfg = config();
  cfg.probes = static_cast<int>(g.codebook.size());
  const int P = 3;
  std::vector<Matrix> air(P), dense(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer a = make_layer(comm, g, Strategy::kAir, PlacementPolicy::kList, cfg);
    air[comm.rank()] = a.forward(g.tokens_of(comm.rank(), P)).output;
    MoELayer b = make_layer(comm, g, Strategy::kDenseReplicated, PlacementPolicy::kList, cfg);
    dense[comm.rank()] = b.forward(g.tokens_of(comm.rank(), P)).output;
  });
  for (int r = 0; r < P; ++r) EXPECT_EQ(air[r].storage(), dense[r].storage()) << "rank " << r;
}

TEST(MoELayer, AirDispatchSendsNoTokenVectors) {
  // Fused dispatch: decisions are a header (records, pairs) per rank served,
  // (token, n) per record and (expert, gate) per pair, no vectors;
  // dense-replicated ships the d floats as well.
  const GlobalData& g = data();
  const MoEConfig cfg = config();
  const int P = 4;
  std::vector<int64_t> air_bytes(P), dense_bytes(P), dense_msgs(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer a = make_layer(comm, g, Strategy::kAir, PlacementPolicy::kLocality, cfg);
    comm.meter().reset();
    const Routes routes = a.forward(g.tokens_of(comm.rank(), P)).handle.routes();
    air_bytes[comm.rank()] = comm.meter().sent("dispatch").bytes;
    // One record per (token, other rank serving it), one pair per expert there.
    int64_t pairs_remote = 0, records_remote = 0;
    std::set<int32_t> served;  // remote ranks with a message
    for (int64_t t = 0; t < routes.tokens; ++t) {
      std::set<int32_t> remote;
      for (int j = 0; j < routes.k; ++j) {
        const int32_t owner = a.placement().owner(routes.experts_of(t)[j]);
        if (owner == comm.rank()) continue;
        remote.insert(owner);
        ++pairs_remote;
      }
      records_remote += static_cast<int64_t>(remote.size());
      served.insert(remote.begin(), remote.end());
    }
    EXPECT_EQ(air_bytes[comm.rank()],
              8 * static_cast<int64_t>(served.size()) + 8 * records_remote + 8 * pairs_remote);
    MoELayer b = make_layer(comm, g, Strategy::kDenseReplicated, PlacementPolicy::kLocality, cfg);
    comm.meter().reset();
    b.forward(g.tokens_of(comm.rank(), P));
    dense_bytes[comm.rank()] = comm.meter().sent("dispatch").bytes;
  });
  for (int r = 0; r < P; ++r) EXPECT_LT(air_bytes[r], dense_bytes[r]);
}

void check_replan_migrates_parameters(const MoEConfig& cfg) {
  const GlobalData& g = data();
  const int P = 3;
  std::vector<Matrix> before(P), after(P);
  std::vector<std::map<int32_t, std::vector<float>>> params_before(P), params_after(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, Strategy::kAir, PlacementPolicy::kRoundRobin, cfg);
    auto snapshot = [&](std::map<int32_t, std::vector<float>>& out) {
      const int64_t w1 = cfg.expert.w1_size(), w2 = cfg.expert.w2_size();
      for (int64_t i = 0; i < layer.experts().size(); ++i) {
        std::vector<float> v(layer.experts().w1(i), layer.experts().w1(i) + w1);
        v.insert(v.end(), layer.experts().w2(i), layer.experts().w2(i) + w2);
        v.insert(v.end(), layer.local_centers().row(i),
                 layer.local_centers().row(i) + cfg.expert.dim);
        out[layer.experts().ids()[i]] = v;
      }
    };
    runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
    before[comm.rank()] = std::move(fwd.output);
    snapshot(params_before[comm.rank()]);
    const std::vector<int32_t> hosted_before = layer.hosted();
    comm.meter().reset();
    const runtime::PlacementPlan next = layer.replan(PlacementPolicy::kLocality, g.load);
    // Migration is one sparse exchange: a message to each rank that gains
    // experts from this one, exactly their records, no counts to the others.
    std::vector<comm::TrafficCounts> want(static_cast<size_t>(P));
    for (const int32_t id : hosted_before) {
      const int to = next.placement.owner(id);
      if (to != comm.rank())
        want[to].bytes += runtime::wire::migrant_record_bytes(cfg.expert.w1_rows(),
                                                              cfg.expert.hidden, cfg.expert.dim);
    }
    for (int q = 0; q < P; ++q) {
      if (want[q].bytes > 0) want[q].messages = 1;
      EXPECT_EQ(comm.meter().sent("migration", q), want[q])
          << "rank " << comm.rank() << " to " << q;
    }
    EXPECT_EQ(comm.meter().sent("migration:counts"), comm::TrafficCounts{});
    EXPECT_EQ(comm.meter().sent("migration:barrier").messages, comm::barrier_rounds(P));
    if (P > 1) {
      EXPECT_GT(comm.meter().sent("migration").bytes, 0);
    }
    // The handle from before the re-plan is refused, on every rank.
    AIRMOE_EXPECT_THROW_MSG(layer.backward(fwd.handle, g.tokens_of(comm.rank(), P)),
                            std::invalid_argument, "another placement");
    snapshot(params_after[comm.rank()]);
    after[comm.rank()] = layer.forward(g.tokens_of(comm.rank(), P)).output;
  });
  std::map<int32_t, std::vector<float>> all_before, all_after;
  for (int r = 0; r < P; ++r) {
    all_before.insert(params_before[r].begin(), params_before[r].end());
    all_after.insert(params_after[r].begin(), params_after[r].end());
  }
  EXPECT_EQ(all_before.size(), static_cast<size_t>(g.data.centers.rows()));
  EXPECT_EQ(all_before, all_after) << "every parameter arrives intact";
  for (int r = 0; r < P; ++r)
    EXPECT_LE(test::rel_error(after[r].data(), before[r].data(), after[r].size()), 1e-6)
        << "rank " << r;
}

TEST(MoELayer, ReplanMigratesParametersAndLosesNothing) {
  check_replan_migrates_parameters(config());
}

// SwiGLU experts carry 2h W1 rows (gate, then up) when they migrate.
TEST(MoELayer, ReplanMigratesSwigluParameters) {
  MoEConfig cfg = config();
  cfg.expert.activation = runtime::Activation::kSwiglu;
  check_replan_migrates_parameters(cfg);
}

// One step of a SwiGLU layer at P ranks, gathered: every token's output and
// input gradient, every touched expert's gradients and every center's.
struct SwigluStep {
  std::map<int64_t, std::vector<float>> out, d_tokens;  // global token row ->
  std::map<int32_t, std::vector<float>> d_w1, d_w2, d_centers;
};

SwigluStep swiglu_step(int P, Strategy strategy) {
  const GlobalData& g = data();
  MoEConfig cfg = config();
  cfg.expert.activation = runtime::Activation::kSwiglu;
  const Matrix dy = upstream(g);
  const int64_t d = g.data.tokens.cols();
  SwigluStep all;
  std::mutex mu;
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, strategy, PlacementPolicy::kLocality, cfg);
    const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
    runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
    const runtime::MoEGradients grads = layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, d));
    const runtime::SparseExpertGrads& t = grads.touched_experts;
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t i = b; i < e; ++i) {
      all.out[i].assign(fwd.output.row(i - b), fwd.output.row(i - b) + d);
      all.d_tokens[i].assign(grads.d_tokens.row(i - b), grads.d_tokens.row(i - b) + d);
    }
    const int64_t w1 = cfg.expert.w1_size(), w2 = cfg.expert.w2_size();
    for (int64_t i = 0; i < t.size(); ++i) {
      all.d_w1[t.ids[i]].assign(t.w1.data() + i * w1, t.w1.data() + (i + 1) * w1);
      all.d_w2[t.ids[i]].assign(t.w2.data() + i * w2, t.w2.data() + (i + 1) * w2);
    }
    for (size_t r = 0; r < grads.d_centers.rows.size(); ++r) {
      const float* v = grads.d_centers.values.row(static_cast<int64_t>(r));
      all.d_centers[grads.d_centers.rows[r]].assign(v, v + d);
    }
  });
  return all;
}

void expect_near_maps(const std::map<int64_t, std::vector<float>>& got,
                      const std::map<int64_t, std::vector<float>>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (const auto& [key, v] : want) {
    ASSERT_EQ(got.count(key), 1u) << what << " " << key;
    EXPECT_LE(test::rel_error(got.at(key).data(), v.data(), v.size()), 1e-6) << what << " " << key;
  }
}

void expect_near_maps(const std::map<int32_t, std::vector<float>>& got,
                      const std::map<int32_t, std::vector<float>>& want, const std::string& what) {
  expect_near_maps(std::map<int64_t, std::vector<float>>(got.begin(), got.end()),
                   std::map<int64_t, std::vector<float>>(want.begin(), want.end()), what);
}

// A SwiGLU layer is the same layer at every P, on every strategy: outputs
// and every gradient (gate, up and down rows of each touched expert, the
// centers, the tokens) equal P = 1's up to the rounding of the combine.
TEST(MoELayer, SwigluLayerIsTheSameAtEveryP) {
  for (const Strategy strategy :
       {Strategy::kAir, Strategy::kDenseReplicated, Strategy::kDenseBroadcast}) {
    const SwigluStep one = swiglu_step(1, strategy);
    ASSERT_FALSE(one.d_w1.empty());
    for (int P = 2; P <= 3; ++P) {
      const std::string where =
          std::string(runtime::to_string(strategy)) + " P=" + std::to_string(P);
      const SwigluStep at_p = swiglu_step(P, strategy);
      expect_near_maps(at_p.out, one.out, where + " output of token");
      expect_near_maps(at_p.d_tokens, one.d_tokens, where + " d_tokens of token");
      expect_near_maps(at_p.d_w1, one.d_w1, where + " d[gate; up] of expert");
      expect_near_maps(at_p.d_w2, one.d_w2, where + " d_down of expert");
      expect_near_maps(at_p.d_centers, one.d_centers, where + " d_center of expert");
    }
  }
}

TEST(MoELayer, AllTokensOnOneRanksExpertsAndIdleRanks) {
  // Every expert on rank 1: it serves every pair (no capacity limit, nothing
  // dropped: buffers are sized from the dispatch's exact counts).
  const GlobalData& g = data();
  const MoEConfig cfg = config();
  const Matrix dy = upstream(g);
  const test::ReferenceResult ref = test::reference_layer(g, Strategy::kAir, cfg, 123, dy.view());
  const int P = 3;
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    const runtime::Placement placement(
        P, std::vector<int32_t>(static_cast<size_t>(g.data.centers.rows()), 1), g.lists());
    MoELayer layer(comm, Strategy::kAir, cfg, g.codebook, g.assignment, placement,
                   g.data.centers.view(), 123);
    const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
    comm.meter().reset();
    const Matrix out = layer.forward(g.tokens_of(comm.rank(), P)).output;
    EXPECT_LE(test::rel_error(out.data(), ref.out.row(b), out.size()), 1e-5);
    // Only rank 1 serves, so only it sends output rows home.
    EXPECT_EQ(comm.meter().sent("combine").bytes > 0, comm.rank() == 1);
  });
}

TEST(MoELayer, MismatchedExpertShapesBetweenRanksAreRefused) {
  const GlobalData& g = data();
  std::vector<std::string> messages(3);
  EXPECT_ANY_THROW(comm::run_ranks(3, [&](comm::Communicator& comm) {
    MoEConfig cfg = config();
    if (comm.rank() == 2) cfg.expert.hidden = 5;
    try {
      make_layer(comm, g, Strategy::kAir, PlacementPolicy::kList, cfg);
    } catch (const std::exception& e) {
      messages[comm.rank()] = e.what();
      throw;
    }
  }));
  for (const auto& m : messages) EXPECT_NE(m.find("rank 2 differs"), std::string::npos) << m;
}

// Backward returns the touched experts' gradients; the dense layout only
// when the configuration asks for it, and then it is to_dense of the
// touched ones, bit for bit.
TEST(MoELayer, DenseExpertGradientsOnlyWhenAskedFor) {
  const GlobalData& g = data();
  EXPECT_FALSE(MoEConfig{}.dense_expert_grads);
  const Matrix dy = upstream(g);
  const int P = 2;
  for (bool dense : {false, true}) {
    MoEConfig cfg = config();
    cfg.dense_expert_grads = dense;
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      MoELayer layer = make_layer(comm, g, Strategy::kAir, PlacementPolicy::kList, cfg);
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
      runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
      const runtime::MoEGradients grads =
          layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, dy.cols()));
      EXPECT_GT(grads.touched_experts.size(), 0) << "rank " << comm.rank();
      if (!dense) {
        EXPECT_TRUE(grads.dense_experts.w1.empty());
        EXPECT_TRUE(grads.dense_experts.w2.empty());
        return;
      }
      const runtime::DenseExpertGrads want = layer.experts().to_dense(grads.touched_experts);
      EXPECT_EQ(grads.dense_experts.w1, want.w1);
      EXPECT_EQ(grads.dense_experts.w2, want.w2);
    });
  }
}

// The dispatch handle is the layer's: move-only, and an empty one (moved
// from, or never returned by forward) is refused, by backward on every rank
// together.
static_assert(!std::is_copy_constructible_v<runtime::DispatchHandle>);
static_assert(std::is_nothrow_move_constructible_v<runtime::DispatchHandle>);

TEST(MoELayer, EmptyDispatchHandleIsRefusedOnEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  std::vector<std::string> messages(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, Strategy::kAir, PlacementPolicy::kList, config());
    runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
    runtime::DispatchHandle kept = std::move(fwd.handle);
    EXPECT_TRUE(kept.valid());
    EXPECT_FALSE(fwd.handle.valid());  // NOLINT(bugprone-use-after-move): what is tested
    AIRMOE_EXPECT_THROW_MSG(runtime::DispatchHandle().routes(), UsageError, "the handle is empty");
    runtime::DispatchHandle& used = comm.rank() == 1 ? fwd.handle : kept;
    try {
      layer.backward(used, fwd.output.view());
    } catch (const std::invalid_argument& e) {
      messages[comm.rank()] = e.what();
    }
  });
  for (int r = 0; r < P; ++r)
    EXPECT_NE(messages[r].find("rank 1: DispatchHandle: the handle is empty"), std::string::npos)
        << "rank " << r << ": " << messages[r];
}

float bf16_round(float x) {
  return widen_bf16(narrow_bf16(x));
}

// The forward of a bf16 wire, built from the single-process routes: each
// token's pairs grouped by serving rank (ascending), each group's partial
// output sum computed by one shard of every expert on the token vector the
// serving rank holds (rounded to bf16 when dispatch ships it), rounded to
// bf16 on its way home, and summed there in rank order.
Matrix bf16_wire_reference(const GlobalData& g, Strategy s, const MoEConfig& cfg,
                           const Routes& routes, const runtime::Placement& placement) {
  const int64_t T = routes.tokens, d = g.data.tokens.cols();
  std::vector<int32_t> all(static_cast<size_t>(g.data.centers.rows()));
  for (size_t e = 0; e < all.size(); ++e) all[e] = static_cast<int32_t>(e);
  const runtime::ExpertShard shard = runtime::ExpertShard::random(cfg.expert, all, 123);
  Matrix out(T, d);
  for (int64_t t = 0; t < T; ++t)
    for (int q = 0; q < placement.ranks(); ++q) {
      runtime::ExpertPairs pairs;
      for (int j = 0; j < routes.k; ++j)
        if (placement.owner(routes.experts_of(t)[j]) == q) {
          pairs.token.push_back(0);
          pairs.expert.push_back(routes.experts_of(t)[j]);
          pairs.gate.push_back(routes.gates_of(t)[j]);
        }
      if (pairs.size() == 0) continue;
      Matrix x(1, d), partial(1, d);
      for (int64_t c = 0; c < d; ++c)
        x(0, c) =
            s == Strategy::kDenseReplicated ? bf16_round(g.data.tokens(t, c)) : g.data.tokens(t, c);
      shard.forward(x.view(), pairs, partial);
      for (int64_t c = 0; c < d; ++c) out(t, c) += bf16_round(partial(0, c));
    }
  return out;
}

// A bf16 wire rounds the vectors it carries and nothing else: the forward
// equals the reference that rounds the same vectors; forward and gradients
// stay within bf16 rounding of the f32 wire's (and differ from them: the
// rounding happened). Routes do not depend on the wire dtype.
TEST(MoELayer, Bf16WireRoundsTheVectorsItCarries) {
  const GlobalData& g = data();
  MoEConfig cfg = config();
  cfg.wire_dtype = DType::kBF16;
  const Matrix dy = upstream(g);
  const int P = 3;
  const int64_t d = g.data.tokens.cols();
  for (Strategy s : {Strategy::kAir, Strategy::kDenseReplicated, Strategy::kDenseBroadcast}) {
    const test::ReferenceResult f32 = test::reference_layer(g, s, config(), 123, dy.view());
    std::vector<Matrix> out(P), d_tokens(P);
    std::vector<Routes> routes(P);
    runtime::Placement placement;
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      MoELayer layer = make_layer(comm, g, s, PlacementPolicy::kLocality, cfg);
      if (comm.rank() == 0) placement = layer.placement();
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
      runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
      routes[comm.rank()] = fwd.handle.routes();
      d_tokens[comm.rank()] = layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, d)).d_tokens;
      out[comm.rank()] = std::move(fwd.output);
    });
    const Matrix want = bf16_wire_reference(g, s, cfg, f32.routes, placement);
    const std::string what = runtime::to_string(s);
    double out_change = 0.0, grad_change = 0.0;
    for (int r = 0; r < P; ++r) {
      const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), r, P);
      const size_t n = static_cast<size_t>((e - b) * d);
      EXPECT_EQ(routes[r].experts, runtime::slice_routes(f32.routes, b, e).experts) << what;
      EXPECT_LE(test::rel_error(out[r].data(), want.row(b), n), 1e-6) << what << " rank " << r;
      const double o = test::rel_error(out[r].data(), f32.out.row(b), n);
      const double dt = test::rel_error(d_tokens[r].data(), f32.d_tokens.row(b), n);
      EXPECT_LE(o, 1e-2) << what << " output, rank " << r;
      EXPECT_LE(dt, 1e-2) << what << " d_tokens, rank " << r;
      out_change = std::max(out_change, o);
      grad_change = std::max(grad_change, dt);
    }
    EXPECT_GT(out_change, 1e-5) << what << ": the output shows no bf16 rounding";
    EXPECT_GT(grad_change, 1e-5) << what << ": d_tokens shows no bf16 rounding";
  }
}

// A wire dtype the wire does not carry fails every rank, naming the field;
// ranks with different wire dtypes fail together before any data moves.
TEST(MoELayer, BadOrMismatchedWireDtypeFailsEveryRank) {
  const GlobalData& g = data();
  const int P = 3;
  std::vector<std::string> bad(P), mixed(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoEConfig cfg = config();
    cfg.wire_dtype = comm.rank() == 2 ? DType::kF64 : DType::kF32;
    try {
      make_layer(comm, g, Strategy::kAir, PlacementPolicy::kList, cfg);
    } catch (const std::invalid_argument& e) {
      bad[comm.rank()] = e.what();
    }
    cfg.wire_dtype = comm.rank() == 1 ? DType::kBF16 : DType::kF32;
    try {
      make_layer(comm, g, Strategy::kDenseReplicated, PlacementPolicy::kList, cfg);
    } catch (const ConfigMismatchError& e) {
      mixed[comm.rank()] = e.what();
    }
  });
  for (int r = 0; r < P; ++r) {
    EXPECT_NE(bad[r].find("rank 2: wire_dtype: the wire carries f32 or bf16 vectors, not f64"),
              std::string::npos)
        << "rank " << r << ": " << bad[r];
    EXPECT_NE(mixed[r].find("MoE layer configuration): rank 1 differs"), std::string::npos)
        << "rank " << r << ": " << mixed[r];
  }
}

TEST(MoELayer, BadInputFailsEveryRank) {
  const GlobalData& g = data();
  const MoEConfig cfg = config();
  const int P = 2;
  std::vector<std::string> messages(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, Strategy::kDenseReplicated, PlacementPolicy::kList, cfg);
    runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
    Matrix wrong(fwd.handle.routes().tokens + (comm.rank() == 1 ? 1 : 0), g.data.tokens.cols());
    try {
      layer.backward(fwd.handle, wrong.view());
    } catch (const std::invalid_argument& e) {
      messages[comm.rank()] = e.what();
    }
  });
  for (const auto& m : messages) EXPECT_NE(m.find("rank 1: d_out is"), std::string::npos) << m;
  EXPECT_THROW(runtime::strategy_from_string("magic"), std::invalid_argument);
}

}  // namespace
}  // namespace airmoe

namespace airmoe {
namespace {

// What each rank's meter counted per phase in one forward and backward.
using Metered = std::vector<std::map<std::string, comm::TrafficCounts>>;

comm::TrafficCounts metered_total(const Metered& real, const std::string& phase) {
  comm::TrafficCounts sum;
  for (const auto& rank : real)
    if (rank.count(phase)) sum += rank.at(phase);
  return sum;
}

// The simulator's per-rank, per-phase counts equal the meter of real runs,
// for either wire dtype, and at P = 4 with 8-bit request keys (the
// simulated routes carry the same contenders); and on the meter, bf16 halves the vector bytes of
// dispatch (where vectors travel), combine, grad_dispatch and grad_combine.
TEST(TrafficSimulator, EqualsTheMeterOfRealRuns) {
  const GlobalData& g = data();
  const Matrix dy = upstream(g);
  const int64_t d = g.data.tokens.cols();
  for (int P : {2, 4}) {
    for (Strategy strategy :
         {Strategy::kAir, Strategy::kDenseReplicated, Strategy::kDenseBroadcast}) {
      std::map<DType, Metered> by_dtype;
      for (DType wire : {DType::kF32, DType::kBF16}) {
        MoEConfig cfg = config();
        cfg.wire_dtype = wire;
        cfg.request_key_bits = P == 4 ? 8 : 0;
        Metered& real = by_dtype[wire];
        real.resize(static_cast<size_t>(P));
        runtime::Placement placement;
        comm::ExchangeKind kind{};
        comm::run_ranks(P, [&](comm::Communicator& comm) {
          MoELayer layer = make_layer(comm, g, strategy, PlacementPolicy::kLocality, cfg);
          if (comm.rank() == 0) {
            placement = layer.placement();
            kind = comm.exchange_kind();  // the simulator asks the communicator
          }
          const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
          comm.meter().reset();
          runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), P));
          layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, dy.cols()));
          for (const auto& phase : comm.meter().phases())
            real[comm.rank()][phase] = comm.meter().sent(phase);
        });
        const AirRouter air(g.data.centers.view(), g.codebook);
        Routes routes =
            strategy == Strategy::kAir
                ? air.route(g.data.tokens.view(), cfg.k, cfg.probes)
                : air.route(g.data.tokens.view(), cfg.k, static_cast<int>(g.codebook.size()));
        if (cfg.request_key_bits != 0)
          set_contenders(routes, g.data.tokens.view(),
                         RequestKeys(g.data.centers.view(), cfg.request_key_bits), g.lists());
        const runtime::SimulatedTraffic sim = runtime::simulate_traffic(
            strategy, placement, routes, g.data.tokens.view(), true, kind, wire);
        ASSERT_FALSE(sim.sent.empty());
        for (const auto& [phase, per_rank] : sim.sent)
          for (int r = 0; r < P; ++r) {
            const comm::TrafficCounts got =
                real[r].count(phase) ? real[r][phase] : comm::TrafficCounts{};
            EXPECT_EQ(per_rank[r], got)
                << runtime::to_string(strategy) << " P=" << P << " " << to_string(wire) << " phase "
                << phase << " rank " << r << ": simulated " << per_rank[r].bytes << " B, metered "
                << got.bytes << " B";
          }
        // And every metered phase of the data path is simulated.
        for (const auto& [phase, counts] : real[0])
          if (phase.rfind("checks", 0) != 0 && phase.rfind("placement", 0) != 0) {
            EXPECT_TRUE(sim.sent.count(phase)) << "phase " << phase << " is not simulated";
          }
      }
      const Metered &f32 = by_dtype[DType::kF32], &bf16 = by_dtype[DType::kBF16];
      const std::string what =
          std::string(runtime::to_string(strategy)) + " P=" + std::to_string(P);
      const comm::TrafficCounts combine = metered_total(f32, "combine");
      ASSERT_GT(combine.bytes, 0) << what;
      ASSERT_EQ(combine.bytes % (4 * d), 0) << what;
      for (const char* phase : {"combine", "grad_dispatch", "grad_combine"}) {
        EXPECT_EQ(metered_total(bf16, phase).bytes * 2, metered_total(f32, phase).bytes)
            << what << " " << phase;
        EXPECT_EQ(metered_total(bf16, phase).messages, metered_total(f32, phase).messages)
            << what << " " << phase;
      }
      // Dispatch: one vector per record where they travel, as many records
      // as combine rows.
      const int64_t vectors = strategy == Strategy::kDenseReplicated ? combine.bytes : 0;
      EXPECT_EQ(metered_total(f32, "dispatch").bytes - metered_total(bf16, "dispatch").bytes,
                vectors / 2)
          << what;
      for (const char* phase : {"requests", "replies", "grad_gates", "grad_logits"})
        EXPECT_EQ(metered_total(bf16, phase), metered_total(f32, phase)) << what << " " << phase;
    }
  }
}

}  // namespace
}  // namespace airmoe

namespace airmoe {
namespace {

TEST(MoELayer, MovedCentersReachRoutingOnEveryStrategy) {
  GlobalData moved = data();
  Matrix shift = random_matrix(moved.data.centers.rows(), moved.data.centers.cols(), 0.2, 31);
  for (size_t i = 0; i < shift.size(); ++i) moved.data.centers.data()[i] += shift.data()[i];
  const MoEConfig cfg = config();
  const Matrix dy = upstream(data());
  const int P = 3;
  for (Strategy s : {Strategy::kAir, Strategy::kDenseReplicated, Strategy::kDenseBroadcast}) {
    const test::ReferenceResult ref = test::reference_layer(moved, s, cfg, 123, dy.view());
    std::vector<double> err(P, 1.0);
    std::vector<int64_t> synced(P, -1);
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      MoELayer layer = make_layer(comm, data(), s, PlacementPolicy::kList, cfg);
      Matrix local(layer.experts().size(), cfg.expert.dim);
      for (int64_t i = 0; i < local.rows(); ++i)
        std::copy_n(moved.data.centers.row(layer.hosted()[i]), local.cols(), local.row(i));
      layer.set_local_centers(local.view());
      comm.meter().reset();
      layer.set_local_centers(local.view());  // unchanged now: only the flag exchange
      synced[comm.rank()] =
          comm.meter().sent("center_sync").bytes + comm.meter().sent("list_sync").bytes;
      const Matrix out = layer.forward(data().tokens_of(comm.rank(), P)).output;
      const auto [b, e] = GlobalData::token_range(data().data.tokens.rows(), comm.rank(), P);
      err[comm.rank()] = test::rel_error(out.data(), ref.out.row(b), out.size());
    });
    for (int r = 0; r < P; ++r) {
      EXPECT_LE(err[r], 1e-5) << runtime::to_string(s) << " rank " << r;
      EXPECT_EQ(synced[r], 0) << "nothing moves when no center changed";
    }
  }
}

}  // namespace
}  // namespace airmoe

// ---- Collective checks shared with the MPI tests (layer_checks.h), run here
// with ranks as threads; and the wire decoder.
#include "layer_checks.h"
#include "runtime/wire.h"

namespace airmoe {
namespace {

class LayerWithEmptyRanks : public ::testing::TestWithParam<std::tuple<int, runtime::Strategy>> {};

TEST_P(LayerWithEmptyRanks, ForwardAndBackwardEqualTheReference) {
  const auto [P, strategy] = GetParam();
  comm::run_ranks(P, [&, strategy = strategy](comm::Communicator& comm) {
    test::check_layer_with_empty_ranks(comm, data(), strategy);
  });
}

INSTANTIATE_TEST_SUITE_P(RanksAndStrategies, LayerWithEmptyRanks,
                         ::testing::Combine(::testing::Values(3, 4),
                                            ::testing::Values(Strategy::kAir,
                                                              Strategy::kDenseReplicated,
                                                              Strategy::kDenseBroadcast)));

TEST(MoELayer, TwoTokensOnFourRanksAndFewerExpertsThanRanks) {
  // The shape that hung airmoe_bench layer (-T 2 on 4 ranks), and E = 3 < P.
  const GlobalData few = GlobalData::make(/*E=*/3, /*d=*/8, /*T=*/2, /*C=*/2, /*seed=*/3);
  MoEConfig cfg;
  cfg.k = 2;
  cfg.probes = 1;
  cfg.expert = {8, 2, runtime::Activation::kRelu};
  for (Strategy s : {Strategy::kAir, Strategy::kDenseReplicated, Strategy::kDenseBroadcast}) {
    const Matrix dy = random_matrix(2, 8, 1.0, 5);
    const test::ReferenceResult ref = test::reference_layer(few, s, cfg, 123, dy.view());
    comm::run_ranks(4, [&](comm::Communicator& comm) {
      MoELayer layer = make_layer(comm, few, s, PlacementPolicy::kRoundRobin, cfg);
      const auto [b, e] = GlobalData::token_range(2, comm.rank(), 4);
      runtime::ForwardResult fwd = layer.forward(few.tokens_of(comm.rank(), 4));
      const Matrix& out = fwd.output;
      const runtime::MoEGradients grads =
          layer.backward(fwd.handle, MatrixView(dy.row(b), e - b, 8));
      if (e > b) {
        EXPECT_LE(test::rel_error(out.data(), ref.out.row(b), out.size()), 1e-5);
        EXPECT_LE(test::rel_error(grads.d_tokens.data(), ref.d_tokens.row(b), out.size()), 1e-5);
      }
    });
  }
}

TEST(MoELayer, DenseReplicatedRefusesCodebookSyncOnEveryRank) {
  comm::run_ranks(3, [&](comm::Communicator& comm) {
    test::check_dense_replicated_refuses_codebook_sync(comm, data());
  });
}

TEST(MoELayer, CodebookSyncThenReplanRoutesWithTheNewCodebook) {
  for (int P : {1, 3})
    comm::run_ranks(
        P, [&](comm::Communicator& comm) { test::check_codebook_sync_then_replan(comm, data()); });
}

TEST(MoELayer, StepStatsComeBackInTheHandle) {
  comm::run_ranks(
      2, [&](comm::Communicator& comm) { test::check_step_stats_in_handle(comm, data()); });
}

TEST(MoELayer, OverflowingLogitsFailEveryRankTogether) {
  // Logits that overflow would give NaN gates. The home rank refuses such a
  // token before any data moves (require_finite_logits), and every rank fails
  // together instead of waiting (issue 13). The serving rank's own gate check
  // (ExpertShard::forward, raised together in serve()) stays as a second line.
  const GlobalData& g = data();
  const MoEConfig cfg = config();
  const int P = 3;
  std::vector<std::string> messages(P);
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    MoELayer layer = make_layer(comm, g, Strategy::kDenseReplicated, PlacementPolicy::kList, cfg);
    Matrix x(2, g.data.tokens.cols(), 3e38f);
    try {
      layer.forward(x.view());
    } catch (const std::invalid_argument& e) {
      messages[comm.rank()] = e.what();
    }
  });
  for (int r = 0; r < P; ++r)
    EXPECT_NE(messages[r].find("rank 0: tokens row 0: logits overflow float32"), std::string::npos)
        << "rank " << r << ": " << messages[r];
}

TEST(Wire, TruncatedMessageNamesTheSourceRankAndTheRecord) {
  const std::vector<char> bytes(12);
  runtime::wire::Reader in(bytes, 2);
  EXPECT_EQ(in.take<int32_t>("token index"), 0);
  float v[16];
  AIRMOE_EXPECT_THROW_MSG(in.take_n(v, 16, "token vector"), InternalError,
                          "message from rank 2 truncated: needs 64 bytes for token vector, 8 left");
  runtime::wire::Reader rest(bytes, 1);
  rest.take<int32_t>("token index");
  AIRMOE_EXPECT_THROW_MSG(rest.expect_done("combine"), InternalError,
                          "message from rank 1 has 8 bytes left over after combine");
}

TEST(Wire, TruncatedRecordIsRefusedByTheRecordDecoder) {
  // A dispatch record from rank 2 announcing 1 pair but cut after the
  // expert id: the decoder names the rank and the field, reads nothing past.
  comm::ExchangeBuffer recv;
  const int64_t bytes[3] = {0, 0, 12};
  recv.reset(bytes);
  const int32_t record[3] = {5, 1, 42};
  std::memcpy(recv.begin(2), record, sizeof(record));
  std::vector<int32_t> experts;
  AIRMOE_EXPECT_THROW_MSG(
      runtime::wire::read_records(recv,
                                  [&](runtime::wire::Reader& in, int32_t, int32_t n) {
                                    for (int32_t i = 0; i < n; ++i) {
                                      experts.push_back(in.take<int32_t>("dispatch expert id"));
                                      in.take<float>("dispatch gate");
                                    }
                                  }),
      InternalError, "message from rank 2 truncated: needs 4 bytes for dispatch gate, 0 left");
  EXPECT_EQ(experts, std::vector<int32_t>{42});
}

TEST(Wire, BuildersFillExactlyTheCountedBytes) {
  // Every record the dispatch builder writes lands in the segment of its
  // target rank, and the segments are exactly full (Writer::finish).
  const GlobalData& g = data();
  const AirRouter air(g.data.centers.view(), g.codebook);
  const Routes routes = air.route(g.data.tokens.view(), 4, 3);
  const runtime::Placement placement(
      3, std::vector<int32_t>(static_cast<size_t>(g.data.centers.rows()), 1), g.lists());
  const runtime::wire::Outbox box =
      runtime::wire::expert_dispatch(placement, routes, g.data.tokens.view(), true, DType::kF32, 3);
  EXPECT_EQ(box.send.bytes(0), 0);
  EXPECT_EQ(box.send.bytes(2), 0);
  EXPECT_EQ(box.send.bytes(1), 8 + g.data.tokens.rows() * (8 + 8 * 4 + 4 * g.data.tokens.cols()));
}

// The dispatch message to one rank, in sections: header (records, pairs),
// token indices, pair counts, expert ids, gates, then the vectors as one
// [records, d] block in the wire dtype (bf16: rounded to nearest even).
TEST(Wire, DispatchMessageIsInSections) {
  const int64_t d = 3;
  Routes routes = make_routes(2, 2, GateMode::kChosen);
  routes.experts = {1, 0, 2, 1};  // token 0: experts 1, 0; token 1: experts 2, 1
  routes.gates = {0.75f, 0.25f, 0.5f, 0.5f};
  const Matrix tokens = random_matrix(2, d, 1.0, 9);
  // Experts 0 and 1 on rank 1, expert 2 on rank 0.
  const InvertedLists lists(std::vector<int32_t>{0, 0, 0}, 1);
  const runtime::Placement placement(2, {1, 1, 0}, lists);
  for (DType wire : {DType::kF32, DType::kBF16}) {
    const runtime::wire::Outbox box =
        runtime::wire::expert_dispatch(placement, routes, tokens.view(), true, wire, 2);
    const int64_t e = static_cast<int64_t>(dtype_size(wire));
    ASSERT_EQ(box.send.bytes(0), 4 * (2 + 2 * 1 + 2 * 1) + 1 * d * e) << to_string(wire);
    ASSERT_EQ(box.send.bytes(1), 4 * (2 + 2 * 2 + 2 * 3) + 2 * d * e) << to_string(wire);
    // Rank 1: records for tokens 0 (slots 0, 1: experts 1, 0) and 1 (slot 1: expert 1).
    const char* m = box.send.begin(1);
    int32_t ints[10];
    std::memcpy(ints, m, sizeof(ints));
    EXPECT_EQ(std::vector<int32_t>(ints, ints + 9),
              (std::vector<int32_t>{2, 3, 0, 1, 2, 1, 1, 0, 1}))
        << "header, tokens, counts, expert ids";
    float gates[3];
    std::memcpy(gates, m + 4 * 9, sizeof(gates));
    EXPECT_EQ(std::vector<float>(gates, gates + 3), (std::vector<float>{0.75f, 0.25f, 0.5f}));
    const char* vectors = m + 4 * 12;
    for (int64_t t = 0; t < 2; ++t)
      for (int64_t c = 0; c < d; ++c) {
        float got;
        if (wire == DType::kF32) {
          std::memcpy(&got, vectors + 4 * (t * d + c), 4);
        } else {
          uint16_t bits;
          std::memcpy(&bits, vectors + 2 * (t * d + c), 2);
          got = widen_bf16(bits);
        }
        const float want =
            wire == DType::kF32 ? tokens(t, c) : widen_bf16(narrow_bf16(tokens(t, c)));
        EXPECT_EQ(got, want) << to_string(wire) << " token " << t << " element " << c;
      }
    // And the reader gives back the same records.
    runtime::wire::Reader in(box.send.segment(1), 1);
    const runtime::wire::DispatchMessage back = runtime::wire::read_dispatch(in, d, true, wire);
    EXPECT_EQ(back.tokens, (std::vector<int32_t>{0, 1}));
    EXPECT_EQ(back.pair_offsets, (std::vector<int64_t>{0, 2, 3}));
    EXPECT_EQ(back.experts, (std::vector<int32_t>{1, 0, 1}));
    EXPECT_EQ(back.gates, (std::vector<float>{0.75f, 0.25f, 0.5f}));
    ASSERT_EQ(back.vectors.size(), static_cast<size_t>(2 * d));
    for (int64_t c = 0; c < d; ++c)
      EXPECT_EQ(back.vectors[d + c],
                wire == DType::kF32 ? tokens(1, c) : widen_bf16(narrow_bf16(tokens(1, c))));
  }
}

// A dispatch message whose header, counts or length disagree is refused,
// naming the source rank, before anything is sized from the header.
TEST(Wire, DispatchDecoderRefusesMessagesThatDoNotAddUp) {
  auto read = [](std::span<const int32_t> words, int source, bool ship, DType wire) {
    runtime::wire::Reader in(
        std::span<const char>(reinterpret_cast<const char*>(words.data()), words.size_bytes()),
        source);
    return runtime::wire::read_dispatch(in, 4, ship, wire);
  };
  // Header: 1 record, 2 pairs; the record's count says 3.
  const int32_t counts_off[8] = {1, 2, 0, 3, 4, 5, 0, 0};
  AIRMOE_EXPECT_THROW_MSG(read(counts_off, 2, false, DType::kF32), InternalError,
                          "dispatch message from rank 2 has pair counts that do not add up to its "
                          "2 pairs");
  // A bf16 message (4 elements: 8 bytes) read as f32 is shorter than its
  // header says.
  const int32_t bf16_vectors[8] = {1, 1, 0, 1, 4, 0, 0, 0};
  EXPECT_EQ(read(bf16_vectors, 1, true, DType::kBF16).vectors.size(), 4u);
  AIRMOE_EXPECT_THROW_MSG(read(bf16_vectors, 1, true, DType::kF32), InternalError,
                          "dispatch message from rank 1 has 32 bytes; its header (1 records, 1 "
                          "pairs) says 40");
  // A header announcing a billion records in 8 bytes allocates nothing.
  const int32_t huge[2] = {1000000000, 0};
  AIRMOE_EXPECT_THROW_MSG(read(huge, 3, false, DType::kF32), InternalError,
                          "dispatch message from rank 3 has 8 bytes; its header (1000000000 "
                          "records, 0 pairs) says 8000000008");
}

TEST(Wire, UnknownWireDtypeIsRefusedNamingTheArgument) {
  EXPECT_EQ(runtime::wire::wire_dtype_from_string("f32"), DType::kF32);
  EXPECT_EQ(runtime::wire::wire_dtype_from_string("bf16"), DType::kBF16);
  AIRMOE_EXPECT_THROW_MSG(runtime::wire::wire_dtype_from_string("fp8", "--wire-dtype"), UsageError,
                          "--wire-dtype: unknown wire dtype 'fp8' (f32 or bf16)");
  AIRMOE_EXPECT_THROW_MSG(runtime::wire::check_wire_dtype(DType::kI32), UsageError,
                          "wire_dtype: the wire carries f32 or bf16 vectors, not i32");
}

}  // namespace
}  // namespace airmoe
