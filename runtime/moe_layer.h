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
#include "comm/exchange_buffer.h"
#include "router/codebook.h"
#include "router/routes.h"
#include "runtime/coordinator.h"
#include "runtime/experts.h"
#include "runtime/layer_routing.h"
#include "runtime/placement.h"
#include "runtime/wire.h"

namespace airmoe::runtime {

struct MoEConfig {
  int k = 8;
  int probes = 4;  // AIR's m; dense-broadcast probes every list
  ExpertConfig expert;
  // backward also fills MoEGradients::experts, dense over the hosted experts
  // (what Python's autograd takes); off, only the touched experts' gradients.
  bool dense_expert_grads = true;
};

struct PhaseSeconds {
  double route = 0, dispatch = 0, experts = 0, combine = 0;
  double backward_dispatch = 0, backward_experts = 0, backward_combine = 0;
};

// Per-call figures of one step, kept in its plan (forward fills the forward
// part, backward the backward part).
struct StepStats {
  PhaseSeconds seconds;
  // Router multiply-adds x 2 per token (mean over this rank's tokens).
  double router_flops_per_token = 0.0;
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
  StepStats stats;                 // this step's timings and router FLOPs
};

struct MoEGradients {
  Matrix d_tokens;                  // [T_r, d]
  ExpertGradients touched_experts;  // FFN gradients of the experts this step touched, by global id
  ExpertGrads experts;              // dense, the shard's layout (MoEConfig::dense_expert_grads)
  SparseRowGrad d_centers;          // rows = global expert ids hosted here
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

  // tokens: this rank's [T_r, d] (T_r may be 0). Returns [T_r, d].
  // Phases: route, dispatch, serve, combine.
  Matrix forward(MatrixView tokens, DispatchPlan& plan);
  // d_out: dL/d(output) [T_r, d] for the plan's tokens. Phases:
  // grad_dispatch, expert_backward, grad_gates, grad_logits, grad_combine.
  MoEGradients backward(DispatchPlan& plan, MatrixView d_out);

  // Collective: the optimizer moved this rank's centers (rows in hosted()
  // order). Every rank calls it, changed or not; when no rank's centers
  // changed it costs one small all-gather. Routing then uses the new centers
  // (dense-replicated: every replica is updated).
  void set_local_centers(MatrixView local_centers);

  // Collective adaptive codebook step (air, dense-broadcast): the
  // distributed sync. dense-replicated refuses it on every rank (UsageError).
  void sync_codebook(double step = 1.0) { routing_->sync_codebook(step); }
  // The coordinator plans again and expert parameters (FFN and center) move
  // to their new ranks ("migration" phase). A plan made before is refused.
  Plan replan(PlacementPolicy policy, const std::vector<double>& list_load);

  Strategy strategy() const { return routing_->strategy(); }
  const MoEConfig& config() const { return config_; }
  // The routing's own codebook, lists and placement (never a copy).
  const Codebook& codebook() const { return routing_->codebook(); }
  const InvertedLists& lists() const { return routing_->lists(); }
  const Placement& placement() const { return routing_->placement(); }
  const ExpertShard& experts() const { return experts_; }
  ExpertShard& experts() { return experts_; }
  const std::vector<int32_t>& hosted() const { return experts_.ids(); }
  comm::Communicator& communicator() { return comm_; }
  // Expert FLOPs per token (router FLOPs: the plan's stats).
  double expert_flops_per_token() const {
    return static_cast<double>(config_.k) * experts_.flops_per_pair();
  }
  // This rank's hosted centers, rows in hosted() order.
  const Matrix& local_centers() const { return routing_->local_centers(); }

 private:
  // Forward phases.
  void dispatch(MatrixView tokens, const Routes& routes, DispatchPlan& plan);
  Matrix serve(DispatchPlan& plan, const ReceivedTokens& received);
  void read_dispatch(DispatchPlan& plan, const ReceivedTokens& received);
  Matrix combine(const DispatchPlan& plan, MatrixView partial);
  // Backward phases.
  void check_backward_args(const DispatchPlan& plan, MatrixView d_out);
  Matrix grad_dispatch(const DispatchPlan& plan, MatrixView d_out);
  void expert_backward(DispatchPlan& plan, MatrixView dy, MoEGradients& grads);
  Matrix grad_gates(const DispatchPlan& plan);
  void grad_logits(DispatchPlan& plan, MatrixView dz, MoEGradients& grads);
  void send_logit_grads(const DispatchPlan& plan, MatrixView dz);
  Matrix grad_combine(const DispatchPlan& plan);
  // Serving side -> home: row i of `rows` (one per input row) to its home;
  // returns the home's sum per token, in (token, target) order.
  Matrix send_home_and_sum(const DispatchPlan& plan, MatrixView rows, const char* phase);
  // Re-plan phases.
  void migrate(const Plan& plan);
  std::vector<std::vector<char>> migration_messages(const Placement& next) const;
  void receive_migrants(const std::vector<std::vector<char>>& recv, ExpertShard& next,
                        Matrix& next_centers) const;
  void place_expert(int32_t e, const float* w1, const float* w2, const float* center,
                    ExpertShard& next, Matrix& next_centers) const;

  comm::Communicator& comm_;
  MoEConfig config_;
  ExpertShard experts_;
  std::unique_ptr<LayerRouting> routing_;
  // Exchange buffers reused across steps (contents are per phase).
  wire::Outbox dispatch_out_;
  comm::ExchangeBuffer send_, recv_;
};

}  // namespace airmoe::runtime
