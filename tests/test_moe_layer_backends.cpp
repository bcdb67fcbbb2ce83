// The MoE layer on every compute backend (backend_params.h): with its
// experts and vectors on the backend's device, forward, backward, a re-plan
// (its migration) and a second step give the host layer's output, input
// gradients, expert and center gradients -- bit for bit on the CPU backends,
// within kTol on cuda (erf and exp differ there) -- for every strategy, both
// wire dtypes and P = 1..3 ranks as threads; through the device API and the
// host API alike.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "backend_params.h"
#include "comm/in_process.h"
#include "moe_fixture.h"
#include "ops/bf16.h"
#include "ops/boundary.h"
#include "runtime/moe_layer.h"
#include "test_util.h"

namespace airmoe {
namespace {

using runtime::MoELayer;
using runtime::PlacementPolicy;
using runtime::Strategy;
using test::GlobalData;

constexpr double kTol = 1e-5;  // relative, on cuda

const GlobalData& data() {
  static const GlobalData g = GlobalData::make(/*E=*/601, /*d=*/16, /*T=*/97, /*C=*/23, 5);
  return g;
}

runtime::MoEConfig config(DType wire) {
  runtime::MoEConfig cfg;
  cfg.k = 4;
  cfg.probes = 3;
  cfg.expert = {16, 3, runtime::Activation::kGelu};
  cfg.wire_dtype = wire;
  return cfg;
}

// What one rank's step gave, on the host.
struct StepResult {
  std::vector<float> output, d_tokens;
  std::vector<int32_t> expert_ids, center_rows;
  std::vector<float> w1, w2, centers;
};

// One rank's two steps: forward and backward, a re-plan, forward and
// backward again.
using RunStep = StepResult (*)(MoELayer&, MatrixView, MatrixView);

StepResult host_step(MoELayer& layer, MatrixView x, MatrixView dy) {
  runtime::ForwardResult fwd = layer.forward(x);
  runtime::MoEGradients g = layer.backward(fwd.handle, dy);
  const Matrix& c = g.d_centers.values;
  return {fwd.output.storage(),
          g.d_tokens.storage(),
          g.touched_experts.ids,
          g.d_centers.rows,
          {g.touched_experts.w1.begin(), g.touched_experts.w1.end()},
          {g.touched_experts.w2.begin(), g.touched_experts.w2.end()},
          {c.data(), c.data() + c.size()}};
}

StepResult device_step(MoELayer& layer, MatrixView x, MatrixView dy) {
  const Compute& c = layer.compute();
  const Staged tokens(c, x), d_out(c, dy);
  runtime::DeviceForwardResult fwd = layer.forward(tokens.view());
  const runtime::DeviceMoEGradients g = layer.backward(fwd.handle, d_out.view());
  return {host_vector<float>(c, fwd.output),
          host_vector<float>(c, g.d_tokens),
          g.touched_expert_ids,
          host_vector<int32_t>(c, g.d_centers.rows),
          host_vector<float>(c, g.touched_experts.w1),
          host_vector<float>(c, g.touched_experts.w2),
          host_vector<float>(c, g.d_centers.values)};
}

// Every rank's two steps, rank by rank.
std::vector<StepResult> run(int P, Strategy s, DType wire, Compute compute, RunStep step) {
  const GlobalData& g = data();
  const Matrix dy = random_matrix(g.data.tokens.rows(), g.data.tokens.cols(), 1.0, 77);
  std::vector<StepResult> out(static_cast<size_t>(2 * P));
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
        comm, PlacementPolicy::kRoundRobin, g.codebook, g.lists(), g.load);
    MoELayer layer(comm, s, config(wire), g.codebook, g.assignment, plan.placement,
                   g.data.centers.view(), /*expert_seed=*/123, compute);
    const auto [b, e] = GlobalData::token_range(g.data.tokens.rows(), comm.rank(), P);
    const MatrixView x = g.tokens_of(comm.rank(), P), d_out(dy.row(b), e - b, dy.cols());
    out[static_cast<size_t>(comm.rank())] = step(layer, x, d_out);
    layer.replan(PlacementPolicy::kLocality, g.load);  // experts migrate
    out[static_cast<size_t>(P + comm.rank())] = step(layer, x, d_out);
  });
  return out;
}

class LayerOnBackend : public test::BackendTest {
 protected:
  template <typename T>
  void expect_same(const std::vector<T>& got, const std::vector<T>& want,
                   const std::string& what) const {
    test::expect_same_values(got, want, what, libm_bits(), kTol);
  }
  void expect_same(const StepResult& got, const StepResult& want, const std::string& what) const {
    expect_same(got.output, want.output, what + ": output");
    expect_same(got.d_tokens, want.d_tokens, what + ": d_tokens");
    EXPECT_EQ(got.expert_ids, want.expert_ids) << what << ": touched experts";
    expect_same(got.w1, want.w1, what + ": W1 gradients");
    expect_same(got.w2, want.w2, what + ": W2 gradients");
    EXPECT_EQ(got.center_rows, want.center_rows) << what << ": center rows";
    expect_same(got.centers, want.centers, what + ": center gradients");
  }
};

TEST_P(LayerOnBackend, EqualsTheHostLayer) {
  for (int P = 1; P <= 3; ++P)
    for (Strategy s : {Strategy::kAir, Strategy::kDenseReplicated, Strategy::kDenseBroadcast})
      for (DType wire : {DType::kF32, DType::kBF16}) {
        const std::vector<StepResult> want = run(P, s, wire, host_compute(), host_step);
        const std::vector<StepResult> device = run(P, s, wire, compute(), device_step);
        const std::vector<StepResult> host_api = run(P, s, wire, compute(), host_step);
        for (size_t i = 0; i < want.size(); ++i) {
          const std::string what = std::string(runtime::to_string(s)) + " wire " + to_string(wire) +
                                   " P=" + std::to_string(P) + " rank " + std::to_string(i % P) +
                                   (i < size_t(P) ? "" : " after re-plan");
          expect_same(device[i], want[i], what + " (device API)");
          expect_same(host_api[i], want[i], what + " (host API)");
        }
      }
}

// The device API's results are tensors of the compute's device, and it
// refuses tokens or output gradients of another dtype or width on every
// rank.
TEST_P(LayerOnBackend, DeviceApiResultsLiveOnTheComputesDevice) {
  const GlobalData& g = data();
  const Compute c = compute();
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    const runtime::PlacementPlan plan =
        runtime::plan_and_broadcast(comm, PlacementPolicy::kList, g.codebook, g.lists(), g.load);
    MoELayer layer(comm, Strategy::kDenseReplicated, config(DType::kBF16), g.codebook, g.assignment,
                   plan.placement, g.data.centers.view(), 123, c);
    EXPECT_EQ(layer.compute().ops, c.ops);
    const Staged x(c, g.tokens_of(comm.rank(), 2));
    runtime::DeviceForwardResult fwd = layer.forward(x.view());
    EXPECT_EQ(fwd.output.device(), ops().device());
    EXPECT_EQ(fwd.output.rows(), x.view().rows);
    const Tensor dy = ops().empty(DType::kF32, x.view().rows, x.view().cols);
    ops().fill(dy, 1.0, {});
    const runtime::DeviceMoEGradients grads = layer.backward(fwd.handle, dy);
    EXPECT_EQ(grads.d_tokens.device(), ops().device());
    EXPECT_EQ(grads.touched_experts.w1.device(), ops().device());
    EXPECT_EQ(grads.d_centers.values.device(), ops().device());
    EXPECT_EQ(static_cast<size_t>(grads.touched_experts.count), grads.touched_expert_ids.size());
    const Tensor bf16 = ops().empty(DType::kBF16, x.view().rows, x.view().cols);
    ops().fill(bf16, 1.0, {});
    AIRMOE_EXPECT_THROW_MSG(layer.forward(bf16.view()), UsageError,
                            "tokens are bf16, the layer takes f32");
    AIRMOE_EXPECT_THROW_MSG(layer.forward(x.view().block(0, x.view().rows, 0, 8)), UsageError,
                            "tokens has 8 columns, expected 16");
    AIRMOE_EXPECT_THROW_MSG(layer.backward(fwd.handle, bf16.view()), UsageError,
                            "d_out is bf16, the layer takes f32");
  });
}

AIRMOE_INSTANTIATE_BACKENDS(LayerOnBackend);

// The combine's order, from its definition rather than from another run of
// the layer: token t's output is +0.0f plus, rank by ascending rank, the
// partial output of the experts t chose there (their pairs in slot order,
// on the token as the dispatch carried it, rounded to the wire dtype), so
// a token served by three ranks pins the order down.
TEST(LayerCombine, SumsEachTokensPartialsInAscendingRankOrder) {
  const GlobalData& g = data();
  const int P = 3;
  std::vector<int32_t> all(static_cast<size_t>(g.data.centers.rows()));
  for (size_t e = 0; e < all.size(); ++e) all[e] = static_cast<int32_t>(e);
  const runtime::ExpertShard experts =
      runtime::ExpertShard::random(config(DType::kF32).expert, all, 123);
  for (DType wire : {DType::kF32, DType::kBF16})
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
          comm, PlacementPolicy::kRoundRobin, g.codebook, g.lists(), g.load);
      MoELayer layer(comm, Strategy::kDenseReplicated, config(wire), g.codebook, g.assignment,
                     plan.placement, g.data.centers.view(), 123);
      const MatrixView x = g.tokens_of(comm.rank(), P);
      const runtime::ForwardResult fwd = layer.forward(x);
      const Routes& routes = fwd.handle.routes();
      int64_t three_ranks = 0;
      for (int64_t t = 0; t < x.rows; ++t) {
        Matrix want(1, x.cols), sent(1, x.cols);  // sent: the token on the wire
        for (int64_t c = 0; c < x.cols; ++c)
          sent(0, c) = wire == DType::kF32 ? x(t, c) : widen_bf16(narrow_bf16(x(t, c)));
        int served_by = 0;
        for (int q = 0; q < P; ++q) {
          runtime::ExpertPairs pairs;
          for (int j = 0; j < routes.k; ++j)
            if (plan.placement.owner(routes.experts_of(t)[j]) == q) {
              pairs.token.push_back(0);
              pairs.expert.push_back(routes.experts_of(t)[j]);
              pairs.gate.push_back(routes.gates_of(t)[j]);
            }
          if (pairs.size() == 0) continue;
          ++served_by;
          Matrix part(1, x.cols);
          experts.forward(sent.view(), pairs, part);
          for (int64_t c = 0; c < x.cols; ++c)
            want(0, c) += wire == DType::kF32 ? part(0, c) : widen_bf16(narrow_bf16(part(0, c)));
        }
        three_ranks += served_by == 3;
        EXPECT_EQ(std::memcmp(want.data(), fwd.output.row(t), sizeof(float) * x.cols), 0)
            << to_string(wire) << " rank " << comm.rank() << " token " << t;
      }
      EXPECT_GT(three_ranks, 0) << "no token was served by three ranks: the order is not tested";
    });
}

}  // namespace
}  // namespace airmoe
