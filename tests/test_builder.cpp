// runtime/builder.h, with ranks as threads: the one set-up sequence gives the
// same codebook and routing whatever the number of ranks, and one rank's bad
// input or configuration fails every rank together.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "comm/in_process.h"
#include "core/errors.h"
#include "router/air_router.h"
#include "runtime/builder.h"
#include "runtime_fixture.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::GlobalData;
using test::RouteRows;

const GlobalData& data() {
  static const GlobalData g = GlobalData::make();
  return g;
}

runtime::LayerSpec spec_for(const GlobalData& g) {
  runtime::LayerSpec spec;
  spec.experts = g.data.centers.rows();
  spec.dim = g.data.centers.cols();
  spec.codewords = 23;
  spec.kmeans_iterations = 8;
  spec.k = 4;
  spec.probes = 3;
  spec.hidden = 3;
  return spec;
}

// What each rank's call threw: its type and message ("" where none).
struct Outcome {
  std::string type, message;
  int peer_failed_rank = -1;
};

template <typename Body>
std::vector<Outcome> outcomes(int P, Body&& body) {
  std::vector<Outcome> out(static_cast<size_t>(P));
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    Outcome& o = out[static_cast<size_t>(comm.rank())];
    try {
      body(comm);
    } catch (const PeerError& e) {
      o = {"PeerError", e.what(), e.failed_rank()};
    } catch (const JointUsageError& e) {
      o = {"JointUsageError", e.what()};
    } catch (const ConfigMismatchError& e) {
      o = {"ConfigMismatchError", e.what()};
    }
  });
  return out;
}

TEST(Builder, RouterEqualsTheSingleProcessRouterForAnyNumberOfRanks) {
  const GlobalData& g = data();
  const runtime::LayerSpec spec = spec_for(g);
  const int64_t T = g.data.tokens.rows();
  std::vector<float> codewords_p1;
  for (int P : {1, 2, 3}) {
    std::vector<RouteRows> got(static_cast<size_t>(P));
    std::vector<std::vector<float>> codewords(static_cast<size_t>(P));
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      const auto router =
          runtime::build_router(comm, spec, g.data.centers.view(), g.tokens_of(comm.rank(), P));
      const MatrixView cw = router->codebook().codewords();
      codewords[comm.rank()].assign(cw.data, cw.data + cw.rows * cw.cols);
      const Routes r = router->route_batch(g.tokens_of(comm.rank(), P), spec.k, spec.probes).routes;
      got[comm.rank()] = RouteRows::of(r, 0, r.tokens);
    });
    if (P == 1) codewords_p1 = codewords[0];
    const Matrix cw = [&] {
      Matrix m(spec.codewords, spec.dim);
      std::copy(codewords[0].begin(), codewords[0].end(), m.data());
      return m;
    }();
    const Routes want = AirRouter(g.data.centers.view(), Codebook(cw.view()))
                            .route(g.data.tokens.view(), spec.k, spec.probes);
    for (int rank = 0; rank < P; ++rank) {
      EXPECT_EQ(codewords[rank], codewords_p1) << "P=" << P << " rank " << rank;
      const auto [b, e] = GlobalData::token_range(T, rank, P);
      EXPECT_EQ(got[rank].experts, RouteRows::of(want, b, e).experts) << "P=" << P;
      EXPECT_EQ(got[rank].gates, RouteRows::of(want, b, e).gates) << "P=" << P;
    }
  }
}

TEST(Builder, LayerOutputsDoNotDependOnTheNumberOfRanks) {
  const GlobalData& g = data();
  const runtime::LayerSpec spec = spec_for(g);
  const int64_t T = g.data.tokens.rows(), d = g.data.tokens.cols();
  std::vector<float> single;
  for (int P : {1, 3}) {
    std::vector<float> all(static_cast<size_t>(T * d));
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      const auto layer =
          runtime::build_layer(comm, spec, g.data.centers.view(), g.tokens_of(comm.rank(), P));
      const Matrix out = layer->forward(g.tokens_of(comm.rank(), P)).output;
      const int64_t b = GlobalData::token_range(T, comm.rank(), P).first;
      std::copy_n(out.data(), out.size(), all.begin() + b * d);
    });
    if (P == 1) {
      single = all;
      continue;
    }
    for (size_t i = 0; i < all.size(); ++i)
      ASSERT_NEAR(all[i], single[i], 1e-5 * (1.0 + std::abs(single[i]))) << "entry " << i;
  }
}

TEST(Builder, OneRanksNanCentersFailEveryRankTogether) {
  const GlobalData& g = data();
  const runtime::LayerSpec spec = spec_for(g);
  Matrix poisoned = g.data.centers;
  poisoned(5, 2) = std::numeric_limits<float>::quiet_NaN();
  const auto got = outcomes(3, [&](comm::Communicator& comm) {
    runtime::build_layer(comm, spec, comm.rank() == 1 ? poisoned.view() : g.data.centers.view());
  });
  EXPECT_EQ(got[1].type, "JointUsageError");
  for (int rank : {0, 2}) {
    EXPECT_EQ(got[rank].type, "PeerError") << "rank " << rank;
    EXPECT_EQ(got[rank].peer_failed_rank, 1);
  }
  for (const Outcome& o : got)
    EXPECT_NE(o.message.find("rank 1: centers row 5 column 2 is nan"), std::string::npos)
        << o.message;
}

TEST(Builder, RanksWithDifferentSpecsOrCentersFailTogether) {
  const GlobalData& g = data();
  const runtime::LayerSpec spec = spec_for(g);
  const auto other_spec = outcomes(3, [&](comm::Communicator& comm) {
    runtime::LayerSpec mine = spec;
    if (comm.rank() == 2) mine.hidden += 1;
    runtime::build_layer(comm, mine, g.data.centers.view());
  });
  Matrix moved = g.data.centers;
  moved(0, 0) += 1.0f;
  const auto other_centers = outcomes(2, [&](comm::Communicator& comm) {
    runtime::build_router(comm, spec, comm.rank() == 1 ? moved.view() : g.data.centers.view());
  });
  for (const Outcome& o : other_spec) {
    EXPECT_EQ(o.type, "ConfigMismatchError");
    EXPECT_NE(o.message.find("MoE layer configuration): rank 2 differs"), std::string::npos)
        << o.message;
  }
  for (const Outcome& o : other_centers) {
    EXPECT_EQ(o.type, "ConfigMismatchError");
    EXPECT_NE(o.message.find("centers and codebook): rank 1 differs"), std::string::npos)
        << o.message;
  }
}

TEST(Builder, SpecChecksNameTheField) {
  runtime::LayerSpec spec = spec_for(data());
  EXPECT_NO_THROW(runtime::check_spec(spec));
  auto message = [](const runtime::LayerSpec& s) {
    try {
      runtime::check_spec(s);
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  runtime::LayerSpec bad = spec;
  bad.version = runtime::kLayerSpecVersion + 1;
  EXPECT_EQ(message(bad),
            "LayerSpec version 6 is not supported (this build reads versions 1 to 5)");
  bad.version = runtime::kOldestLayerSpecVersion - 1;
  EXPECT_EQ(message(bad),
            "LayerSpec version 0 is not supported (this build reads versions 1 to 5)");
  bad = spec;
  bad.probes = 24;
  EXPECT_EQ(message(bad), "LayerSpec probes = 24 is outside [1, 23]");
  bad = spec;
  bad.codewords = spec.experts + 1;
  EXPECT_NE(message(bad).find("LayerSpec codewords"), std::string::npos);
  // The centers must have the spec's shape, checked on every rank together.
  const auto got = outcomes(1, [&](comm::Communicator& comm) {
    runtime::LayerSpec wrong = spec;
    wrong.dim = 8;
    runtime::build_router(comm, wrong, data().data.centers.view());
  });
  EXPECT_NE(got[0].message.find("the spec says [experts = 601, dim = 8]"), std::string::npos)
      << got[0].message;
}

// Version 2 added dense_expert_grads, off by default. A version-1 spec (code
// written before the field) keeps version 1's behaviour, the dense layout,
// whatever the field holds; a version-2 spec gets what the field says.
TEST(Builder, OlderSpecVersionsKeepTheirMeaning) {
  const GlobalData& g = data();
  EXPECT_EQ(runtime::LayerSpec{}.version, 5);
  EXPECT_FALSE(runtime::LayerSpec{}.moe_config().dense_expert_grads);
  struct Case {
    int version;
    bool field, dense;
  };
  for (const Case c : {Case{5, false, false}, Case{4, false, false}, Case{3, false, false},
                       Case{2, false, false}, Case{2, true, true}, Case{1, false, true}}) {
    runtime::LayerSpec spec = spec_for(g);
    spec.version = c.version;
    spec.dense_expert_grads = c.field;
    EXPECT_EQ(spec.moe_config().dense_expert_grads, c.dense) << "version " << c.version;
    EXPECT_NE(spec.describe().find("dense_expert_grads=" + std::to_string(c.dense)),
              std::string::npos)
        << spec.describe();
    const int P = 2;
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      const auto layer = runtime::build_layer(comm, spec, g.data.centers.view());
      EXPECT_EQ(layer->config().dense_expert_grads, c.dense);
      const MatrixView x = g.tokens_of(comm.rank(), P);
      runtime::ForwardResult fwd = layer->forward(x);
      const Matrix dy(x.rows, x.cols, 0.25f);
      const runtime::MoEGradients grads = layer->backward(fwd.handle, dy.view());
      const size_t dense_size =
          static_cast<size_t>(layer->experts().size() * spec.hidden * spec.dim);
      EXPECT_EQ(grads.dense_experts.w1.size(), c.dense ? dense_size : 0u)
          << "version " << c.version << " rank " << comm.rank();
      if (c.dense) {
        EXPECT_EQ(grads.dense_experts.w1, layer->experts().to_dense(grads.touched_experts).w1);
      }
    });
  }
}

// Version 3 added the swiglu activation: a version-3 spec builds a SwiGLU
// layer (W1 of 2h rows per expert, in the configuration ranks compare); an
// older spec naming it is refused, naming the field and the version.
TEST(Builder, SwigluNeedsSpecVersion3) {
  const GlobalData& g = data();
  runtime::LayerSpec spec = spec_for(g);
  spec.activation = runtime::Activation::kSwiglu;
  for (const int version : {1, 2}) {
    spec.version = version;
    AIRMOE_EXPECT_THROW_MSG(runtime::check_spec(spec), UsageError,
                            "LayerSpec activation swiglu needs version 3; the spec says version " +
                                std::to_string(version));
  }
  spec.version = 3;
  EXPECT_NE(spec.describe().find("activation=swiglu"), std::string::npos) << spec.describe();
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    const auto layer = runtime::build_layer(comm, spec, g.data.centers.view());
    EXPECT_EQ(layer->config().expert.activation, runtime::Activation::kSwiglu);
    EXPECT_EQ(layer->experts().w1_data().size(),
              static_cast<size_t>(layer->experts().size() * 2 * spec.hidden * spec.dim));
  });
}

// Version 4 added wire_dtype: a version-4 spec builds a layer with the
// dtype it names (in the configuration ranks compare); an older spec sends
// f32 whatever the field holds; a dtype the wire does not carry is refused
// naming the field; ranks that ask for different wire dtypes fail together.
TEST(Builder, WireDtypeNeedsSpecVersion4) {
  const GlobalData& g = data();
  runtime::LayerSpec spec = spec_for(g);
  spec.wire_dtype = DType::kBF16;
  EXPECT_EQ(runtime::LayerSpec{}.wire_dtype, DType::kF32);
  EXPECT_EQ(spec.moe_config().wire_dtype, DType::kBF16);
  EXPECT_NE(spec.describe().find("wire_dtype=bf16"), std::string::npos) << spec.describe();
  spec.version = 3;
  EXPECT_EQ(spec.moe_config().wire_dtype, DType::kF32);
  EXPECT_NE(spec.describe().find("wire_dtype=f32"), std::string::npos) << spec.describe();
  spec.version = 4;
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    const auto layer = runtime::build_layer(comm, spec, g.data.centers.view());
    EXPECT_EQ(layer->config().wire_dtype, DType::kBF16);
  });
  runtime::LayerSpec bad = spec;
  bad.wire_dtype = DType::kI32;
  AIRMOE_EXPECT_THROW_MSG(runtime::check_spec(bad), UsageError,
                          "LayerSpec wire_dtype: the wire carries f32 or bf16 vectors, not i32");
  const auto mixed = outcomes(3, [&](comm::Communicator& comm) {
    runtime::LayerSpec mine = spec_for(g);
    if (comm.rank() == 1) mine.wire_dtype = DType::kBF16;
    runtime::build_layer(comm, mine, g.data.centers.view());
  });
  for (const Outcome& o : mixed) {
    EXPECT_EQ(o.type, "ConfigMismatchError");
    EXPECT_NE(o.message.find("MoE layer configuration): rank 1 differs"), std::string::npos)
        << o.message;
  }
}

// Version 5 added request_key_bits: a version-5 spec builds a router and a
// layer that prune their requests with keys of those bits, routing exactly
// as without; an older spec sends every request whatever the field holds;
// bits outside 2 to 16 are refused naming the field; ranks that ask for
// different bits fail together.
TEST(Builder, RequestKeyBitsNeedSpecVersion5) {
  const GlobalData& g = data();
  runtime::LayerSpec spec = spec_for(g);
  spec.request_key_bits = 8;
  EXPECT_EQ(runtime::LayerSpec{}.request_key_bits, 0);
  EXPECT_EQ(spec.moe_config().request_key_bits, 8);
  EXPECT_NE(spec.describe().find("request_key_bits=8"), std::string::npos) << spec.describe();
  spec.version = 4;
  EXPECT_EQ(spec.moe_config().request_key_bits, 0);
  spec.version = 5;
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    const auto router = runtime::build_router(comm, spec, g.data.centers.view());
    EXPECT_EQ(router->request_keys().bits(), 8);
    EXPECT_EQ(router->request_keys().experts(), g.data.centers.rows());
    const auto layer = runtime::build_layer(comm, spec, g.data.centers.view());
    EXPECT_EQ(layer->config().request_key_bits, 8);
    runtime::LayerSpec off = spec;
    off.request_key_bits = 0;
    const auto plain = runtime::build_layer(comm, off, g.data.centers.view());
    const MatrixView mine = g.tokens_of(comm.rank(), 2);
    const runtime::ForwardResult a = layer->forward(mine), b = plain->forward(mine);
    EXPECT_EQ(a.handle.routes().experts, b.handle.routes().experts);
    EXPECT_EQ(a.handle.routes().gates, b.handle.routes().gates);
    EXPECT_EQ(std::vector<float>(a.output.data(), a.output.data() + a.output.size()),
              std::vector<float>(b.output.data(), b.output.data() + b.output.size()));
    EXPECT_FALSE(a.handle.routes().contender_offsets.empty());
    // A re-plan keeps the keys (the new router gathers them again).
    layer->replan(runtime::PlacementPolicy::kRoundRobin,
                  std::vector<double>(static_cast<size_t>(spec.codewords), 1.0));
    EXPECT_EQ(layer->request_key_counts().gathers, 1);
    const runtime::ForwardResult moved = layer->forward(mine);
    EXPECT_FALSE(moved.handle.routes().contender_offsets.empty());
    EXPECT_EQ(moved.handle.routes().experts, b.handle.routes().experts);
    // Keys turned on later (after training without them, say): the same.
    plain->set_request_keys(8);
    EXPECT_EQ(plain->config().request_key_bits, 8);
    const runtime::ForwardResult c = plain->forward(mine);
    EXPECT_EQ(std::vector<float>(c.output.data(), c.output.data() + c.output.size()),
              std::vector<float>(a.output.data(), a.output.data() + a.output.size()));
    EXPECT_FALSE(c.handle.routes().contender_offsets.empty());
    AIRMOE_EXPECT_THROW_MSG(plain->set_request_keys(1), UsageError,
                            "set_request_keys: bits = 1: request keys take 2 to 16 bits");
    plain->set_request_keys(0);
    EXPECT_TRUE(plain->forward(mine).handle.routes().contender_offsets.empty());
  });
  runtime::LayerSpec bad = spec;
  bad.request_key_bits = 17;
  AIRMOE_EXPECT_THROW_MSG(runtime::check_spec(bad), UsageError,
                          "LayerSpec request_key_bits = 17: request keys take 2 to 16 bits");
  const auto mixed = outcomes(3, [&](comm::Communicator& comm) {
    runtime::LayerSpec mine = spec;
    if (comm.rank() == 2) mine.request_key_bits = 4;
    runtime::build_layer(comm, mine, g.data.centers.view());
  });
  for (const Outcome& o : mixed) {
    EXPECT_EQ(o.type, "ConfigMismatchError");
    EXPECT_NE(o.message.find("MoE layer configuration): rank 2 differs"), std::string::npos)
        << o.message;
  }
}

}  // namespace
}  // namespace airmoe
