// The small MoE layer the decoder fuzz target and its seed generator share:
// one rank's forward and backward step, on a real communicator (seeds) or on
// ScriptedPeers (fuzzing), from the same data on every rank.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/synthetic.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "runtime/moe_layer.h"
#include "scripted_peers.h"

namespace airmoe::fuzz {

struct FuzzLayer {
  SyntheticData data;
  Codebook codebook;
  std::vector<int32_t> assignment;

  static const FuzzLayer& get() {
    static const FuzzLayer layer = [] {
      SyntheticConfig cfg;
      cfg.experts = 40;
      cfg.dim = 4;
      cfg.tokens = 9;
      cfg.clusters = 3;
      cfg.latent_dim = 2;
      cfg.seed = 3;
      FuzzLayer f;
      f.data = make_synthetic(cfg);
      f.codebook = train_codebook(f.data.centers.view(), {5, 4, 3});
      f.assignment = f.codebook.assign(normalize_rows(f.data.centers.view(), "centers").view());
      return f;
    }();
    return layer;
  }

  static runtime::MoEConfig config() {
    runtime::MoEConfig cfg;
    cfg.k = 3;
    cfg.probes = 2;
    cfg.expert = {4, 2, runtime::Activation::kGelu};
    return cfg;
  }

  // Expert e on rank e mod P.
  runtime::Placement placement(int ranks) const {
    std::vector<int32_t> owner(assignment.size());
    for (size_t e = 0; e < owner.size(); ++e) owner[e] = static_cast<int32_t>(e % ranks);
    return runtime::Placement(ranks, owner, InvertedLists(assignment, codebook.size()));
  }

  MatrixView tokens_of(int rank, int ranks) const {
    const int64_t T = data.tokens.rows();
    const int64_t b = T * rank / ranks, e = T * (rank + 1) / ranks;
    return {data.tokens.row(b), e - b, data.tokens.cols()};
  }

  // Collective: builds the layer, one forward, one backward and, with
  // `replan`, a re-plan by lists (whose migration moves experts); returns the
  // forward's output and the input gradient, concatenated.
  std::vector<float> step(comm::Communicator& comm, runtime::Strategy strategy, bool replan) const {
    runtime::MoELayer layer(comm, strategy, config(), codebook, assignment, placement(comm.size()),
                            data.centers.view(), 7);
    runtime::ForwardResult fwd = layer.forward(tokens_of(comm.rank(), comm.size()));
    const Matrix& out = fwd.output;
    const Matrix dy(out.rows(), out.cols(), 0.5f);
    const runtime::MoEGradients grads = layer.backward(fwd.handle, dy.view());
    if (replan)
      layer.replan(runtime::PlacementPolicy::kList,
                   std::vector<double>(static_cast<size_t>(codebook.size()), 1.0));
    std::vector<float> result(out.data(), out.data() + out.size());
    result.insert(result.end(), grads.d_tokens.data(),
                  grads.d_tokens.data() + grads.d_tokens.size());
    return result;
  }
};

// A fuzz input of the decoder target: byte 0 picks the strategy, byte 1 the
// job size P in 2..4 and this rank; the rest is the script of the peers'
// messages (ScriptedPeers). Runs one step; throws what the layer throws.
// Only rank 0 re-plans: it is the coordinator, whose broadcast of the plan
// ScriptedPeers does not script, and it receives the migrating experts.
inline std::vector<float> scripted_step(const uint8_t* data, size_t size) {
  if (size < 2) return {};
  const auto strategy = static_cast<runtime::Strategy>(data[0] % 3);
  const int ranks = 2 + data[1] % 3;
  const int me = (data[1] / 3) % ranks;
  ScriptedPeers comm(ranks, me, {data + 2, size - 2});
  return FuzzLayer::get().step(comm, strategy, /*replan=*/me == 0);
}

}  // namespace airmoe::fuzz
