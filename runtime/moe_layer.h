// The expert-parallel MoE layer: routing, dispatch, expert compute, combine,
// and the backward along the same routes, for three strategies on the same
// data, weights and placement:
//   kAir             distributed AIR routing; the scoring ranks already hold
//                    the token vectors, so dispatch sends decisions only
//                    ("fused dispatch").
//   kDenseReplicated standard expert parallelism (Megatron, DeepSpeed, Tutel):
//                    every rank holds all centers and routes exactly and
//                    locally, then sends token vectors to the experts' ranks.
//   kDenseBroadcast  exact routing with sharded centers: every token goes to
//                    every rank for scoring (the distributed router probing
//                    all C lists), then fused dispatch as in kAir.
// Every rank calls every method together (they are collectives).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "router/codebook.h"
#include "router/dense_router.h"
#include "router/routes.h"
#include "runtime/coordinator.h"
#include "runtime/distributed_router.h"
#include "runtime/experts.h"
#include "runtime/placement.h"

namespace airmoe::runtime {

enum class Strategy { kAir, kDenseReplicated, kDenseBroadcast };
const char* to_string(Strategy s);
Strategy strategy_from_string(const std::string& name);

struct MoEConfig {
  int k = 8;
  int probes = 4;  // AIR's m; dense-broadcast probes every list
  ExpertConfig expert;
  // backward also fills MoEGradients::experts, dense over the hosted experts
  // (what Python's autograd takes); off, only the touched experts' gradients.
  bool dense_expert_grads = true;
};

// What a forward call decided and computed, reused by its backward (as
// DeepEP's handle is): the routes, who sent what to whom (counts from prefix
// sums, no atomics), and on the serving side the inputs and the experts'
// intermediates.
struct DispatchPlan {
  Strategy strategy = Strategy::kAir;
  uint64_t placement_digest = 0;
  Routes routes;  // this rank's tokens
  // Home side: for token t, targets[target_offsets[t] ..] (ascending ranks);
  // each target's slots (indices into the token's k), in slot order.
  std::vector<int64_t> target_offsets;
  std::vector<int32_t> targets;
  std::vector<int64_t> slot_offsets;  // per (token, target)
  std::vector<int32_t> slots;
  // Serving side: one input row per (home rank, token) served, in order of
  // home rank then the home's token order; its pairs in slot order.
  Matrix inputs;
  std::vector<int32_t> input_home;   // home rank of each input row
  std::vector<int64_t> input_pairs;  // CSR: input row -> its pairs
  ExpertPairs pairs;                 // token = input row
  ExpertCache cache;
  std::vector<float> pair_d_gate;  // filled by backward
  Matrix pair_dx;                  // per input row, FFN part (backward)
};

struct MoEGradients {
  Matrix d_tokens;                  // [T_r, d]
  ExpertGradients touched_experts;  // FFN gradients of the experts this step touched, by global id
  ExpertGrads experts;              // dense, the shard's layout (MoEConfig::dense_expert_grads)
  SparseRowGrad d_centers;          // rows = global expert ids hosted here
};

struct PhaseSeconds {
  double route = 0, dispatch = 0, experts = 0, combine = 0;
  double backward_dispatch = 0, backward_experts = 0, backward_combine = 0;
};

class MoELayer {
 public:
  // centers: every expert's router center [E, d] as this rank knows it;
  // only the rows this rank hosts are kept, except with kDenseReplicated,
  // which keeps all (that is the strategy). Experts' FFN parameters are
  // created by ExpertShard::random(config.expert, hosted ids, seed).
  MoELayer(comm::Communicator& comm, Strategy strategy, MoEConfig config, Codebook codebook,
           std::vector<int32_t> assignment, Placement placement, MatrixView centers,
           uint64_t expert_seed);

  // tokens: this rank's [T_r, d]. Returns [T_r, d].
  Matrix forward(MatrixView tokens, DispatchPlan& plan);
  // d_out: dL/d(output) [T_r, d] for the plan's tokens.
  MoEGradients backward(DispatchPlan& plan, MatrixView d_out);

  // Collective: the optimizer moved this rank's centers (rows in hosted()
  // order). Every rank calls it, changed or not; when no rank's centers
  // changed it costs one small all-gather. Routing then uses the new centers
  // (dense-replicated: every replica is updated).
  void set_local_centers(MatrixView local_centers);

  // Adaptive codebook step (kAir, kDenseBroadcast): the distributed sync.
  void sync_codebook(double step = 1.0) { router_->sync_codebook(step, 1); }
  // The coordinator plans again and expert parameters (FFN and center) move
  // to their new ranks ("migration" phase). A plan made before is refused.
  Plan replan(PlacementPolicy policy, const std::vector<double>& list_load);

  Strategy strategy() const { return strategy_; }
  const MoEConfig& config() const { return config_; }
  const Placement& placement() const { return placement_; }
  const ExpertShard& experts() const { return experts_; }
  ExpertShard& experts() { return experts_; }
  const std::vector<int32_t>& hosted() const { return experts_.ids(); }
  const PhaseSeconds& seconds() const { return seconds_; }
  comm::Communicator& communicator() { return comm_; }
  // Router multiply-adds x 2 per token of the last forward (mean over this
  // rank's tokens) and expert FLOPs per token.
  double router_flops_per_token() const { return router_flops_; }
  double expert_flops_per_token() const {
    return static_cast<double>(config_.k) * experts_.flops_per_pair();
  }
  // This rank's hosted centers, rows in hosted() order.
  const Matrix& local_centers() const { return local_centers_; }

 private:
  void build_router();
  const float* center_row(int32_t expert) const;

  comm::Communicator& comm_;
  Strategy strategy_;
  MoEConfig config_;
  Codebook codebook_;
  std::vector<int32_t> assignment_;
  Placement placement_;
  Matrix all_centers_;    // kDenseReplicated only
  Matrix local_centers_;  // hosted experts
  ExpertShard experts_;
  std::unique_ptr<DistributedRouter> router_;
  std::unique_ptr<DenseRouter> dense_;
  PhaseSeconds seconds_;
  double router_flops_ = 0.0;
};

}  // namespace airmoe::runtime
