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
//
// The layer runs on a Compute (ops/ops.h): its experts live on that
// compute's device, and so do the vectors of a step (token rows, partial
// outputs, output gradients, input gradients), which travel in exchange
// buffers of the compute's memory, packed into wire order by the ops
// (DeepEP's split). What the step decided -- targets, slots, input rows'
// homes, the pairs' expert ids and gates, the gate and logit gradients --
// is small and computed on the host, once, and kept in the dispatch
// handle; the records carrying it stay host-side sections of the
// messages. Routing itself still runs on the host (tokens on a device are
// copied to the host for it). The host API (MatrixView in, Matrix out) is
// the same code with copies at the boundary (none on a host backend).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
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
  // backward also fills MoEGradients::dense_experts, the hosted experts'
  // gradients in the shard's layout (what Python's autograd takes); off,
  // only the touched experts' (MoEGradients::touched_experts).
  bool dense_expert_grads = false;
  // The element type of the token vectors on the wire (dispatch, combine,
  // grad_dispatch, grad_combine): f32, or bf16, which halves their bytes
  // (rounded to nearest even when sent, widened on receipt; the math stays
  // f32). Scoring requests stay f32. The same on every rank.
  DType wire_dtype = DType::kF32;
  // air and dense-broadcast: prune the scoring requests with replicated
  // keys of this many bits, 2 to 16 (DistributedRouter::set_request_keys:
  // a token's requests reach only the ranks owning an expert that may still
  // be in its top-k; the routes stay the same bit for bit); 0: off.
  // dense-replicated sends no requests and ignores it. The same on every rank.
  int request_key_bits = 0;
};

struct PhaseSeconds {
  double route = 0, dispatch = 0, experts = 0, combine = 0;
  double backward_dispatch = 0, backward_experts = 0, backward_combine = 0;
};

// Per-call figures of one step, kept in its dispatch handle (forward fills
// the forward part, backward the backward part).
struct StepStats {
  PhaseSeconds seconds;
  // Router multiply-adds x 2 per token (mean over this rank's tokens).
  double router_flops_per_token = 0.0;
};

// What one forward decided and computed, handed to its backward (as
// DeepEP's layout handle is): the routes, who sent what to whom, and on the
// serving side the inputs and the experts' intermediates. Opaque: callers
// read the routes and the step's stats; the rest is the layer's own. Made by
// MoELayer::forward only; moves, never copies.
class DispatchHandle {
 public:
  DispatchHandle();
  ~DispatchHandle();
  DispatchHandle(DispatchHandle&&) noexcept;
  DispatchHandle& operator=(DispatchHandle&&) noexcept;

  // False for a default-constructed or moved-from handle.
  bool valid() const { return state_ != nullptr; }
  // This rank's tokens' routes, as the dispatch followed them.
  const Routes& routes() const;
  // The forward's timings and router FLOPs; the backward's timings once it ran.
  const StepStats& stats() const;

 private:
  friend class MoELayer;
  struct State;  // moe_layer.cpp
  const State& state() const;
  std::unique_ptr<State> state_;
};

// What MoELayer::forward returns: the output rows and the handle for the
// backward of this step.
struct ForwardResult {
  Matrix output;  // [T_r, d]
  DispatchHandle handle;
};

// The device API's forward result: the output on the compute's device.
struct DeviceForwardResult {
  Tensor output;  // f32 [T_r, d]
  DispatchHandle handle;
};

// The device API's gradients, on the compute's device (the host API's
// MoEGradients, less the dense expert layout).
struct DeviceMoEGradients {
  Tensor d_tokens;                          // f32 [T_r, d]
  std::vector<int32_t> touched_expert_ids;  // global ids, ascending (host)
  TouchedExpertGrads touched_experts;       // their FFN gradients, rows in that order
  RowGrads d_centers;                       // rows = global expert ids hosted here
};

struct MoEGradients {
  Matrix d_tokens;  // [T_r, d]
  SparseExpertGrads
      touched_experts;             // FFN gradients of the experts this step touched, by global id
  DenseExpertGrads dense_experts;  // the shard's layout, only with MoEConfig::dense_expert_grads
  SparseRowGrad d_centers;         // rows = global expert ids hosted here
};

class MoELayer {
 public:
  // centers: every expert's router center [E, d] as this rank knows it;
  // only the rows this rank hosts are kept, except with kDenseReplicated,
  // which keeps all (that is the strategy). Experts' FFN parameters are
  // created by ExpertShard::random(config.expert, hosted ids, seed).
  // The experts and the step's vectors live on `compute`'s device.
  MoELayer(comm::Communicator& comm, Strategy strategy, MoEConfig config, Codebook codebook,
           std::vector<int32_t> assignment, Placement placement, MatrixView centers,
           uint64_t expert_seed, Compute compute = host_compute());

  // tokens: this rank's [T_r, d] (T_r may be 0). Returns the output
  // [T_r, d] and the step's dispatch handle. Phases: route, dispatch,
  // serve, combine.
  ForwardResult forward(MatrixView tokens);
  // d_out: dL/d(output) [T_r, d] for the handle's tokens. Phases:
  // grad_dispatch, expert_backward, grad_gates, grad_logits, grad_combine.
  // A handle from before a replan is refused on every rank.
  MoEGradients backward(DispatchHandle& handle, MatrixView d_out);
  // The same on the compute's device: tokens and d_out f32 there, output
  // and gradients there too. The tokens' device, dtype and width are checked
  // on every rank together first (one more small collective, "checks").
  DeviceForwardResult forward(TensorView tokens);
  DeviceMoEGradients backward(DispatchHandle& handle, TensorView d_out);
  const Compute& compute() const { return experts_.compute(); }

  // Collective: the optimizer moved this rank's centers (rows in hosted()
  // order). Every rank calls it, changed or not; when no rank's centers
  // changed it costs one small all-gather. Routing then uses the new centers
  // (dense-replicated: every replica is updated).
  void set_local_centers(MatrixView local_centers);

  // Collective adaptive codebook step (air, dense-broadcast): the
  // distributed sync. dense-replicated refuses it on every rank (UsageError).
  void sync_codebook(double step = 1.0) { routing_->sync_codebook(step); }
  // Collective (air, dense-broadcast): query-aware lists (docs/routing.md)
  // built from `sample_tokens`, this rank's part of a sample (T_r may be 0;
  // the sample is every rank's part in rank order), routed exactly under the
  // current centers and bias: the same codebook, lists and routes whatever P
  // (DistributedRouter::refresh_query_lists). dense-replicated refuses it on
  // every rank. They survive center updates, bias changes and replans (and
  // go stale as those move: call it again); sync_codebook refuses a layer
  // using them, checkpoints keep them. Cost:
  // query_lists_build_flops().
  void refresh_query_lists(MatrixView sample_tokens, const QueryListOptions& options) {
    routing_->refresh_query_lists(sample_tokens, options);
  }
  bool has_query_lists() const { return routing_->has_query_lists(); }
  // The query lists in use, or none; set_query_lists: collective, a
  // checkpoint's lists back (LayerRouting::set_query_lists).
  std::optional<QueryLists> query_lists() const { return routing_->query_lists(); }
  void set_query_lists(QueryLists lists) { routing_->set_query_lists(std::move(lists)); }
  double query_lists_build_flops() const { return routing_->query_lists_build_flops(); }
  // The coordinator plans again and expert parameters (FFN and center) move
  // to their new ranks ("migration" phase). A dispatch handle made before is
  // refused by backward.
  PlacementPlan replan(PlacementPolicy policy, const std::vector<double>& list_load);
  // Collective: the selection bias b of all E experts (DeepSeek-V3's
  // auxiliary-loss-free balancing): experts are selected by z + b, gates and
  // their gradients come from the unbiased z. The same b on every rank (a
  // digest is compared; a bad or differing bias raises on every rank). It
  // changes nothing else, so it may move every step; it survives center
  // updates, codebook syncs and replans.
  void set_bias(MatrixView bias) { routing_->set_bias(bias); }
  void clear_bias() { routing_->clear_bias(); }
  TensorView bias() const { return routing_->bias(); }  // f32 [E, 1]; empty: none
  // With request keys: how they were kept current (gathers, drift updates).
  RequestKeyCounts request_key_counts() const { return routing_->request_key_counts(); }
  // Collective: request keys of `bits` bits from now on, 2 to 16, or 0 to
  // turn them off (MoEConfig::request_key_bits; e.g. on for inference after
  // training without them). The same bits on every rank, or all raise.
  void set_request_keys(int bits);

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
  using Step = DispatchHandle::State;
  // The phases, once for both APIs: routing reads `routing_tokens` (host),
  // the dispatch `tokens` (the compute's device); out [T_r, d] and d_tokens
  // are the compute's memory.
  DispatchHandle run_forward(MatrixView routing_tokens, TensorView tokens, TensorView out);
  DeviceMoEGradients run_backward(DispatchHandle& handle, TensorView d_out, TensorView d_tokens);
  // Forward phases.
  void dispatch(TensorView tokens, Step& step);
  void send_dispatch(TensorView tokens, const Step& step);
  Tensor serve(Step& step, const ReceivedTokens& received);
  void read_dispatch(Step& step, const ReceivedTokens& received);
  wire::DispatchMessage received_dispatch(int source, const char*& vectors) const;
  void gather_inputs(Step& step, const std::vector<std::pair<int64_t, const char*>>& blocks,
                     MatrixView received, const std::vector<int32_t>& source_row) const;
  void combine(const Step& step, TensorView partial, TensorView out);
  // Backward phases.
  void check_backward_args(const DispatchHandle& handle, TensorView d_out);
  Tensor grad_dispatch(const Step& step, TensorView d_out);
  void expert_backward(Step& step, TensorView dy, DeviceMoEGradients& grads);
  Matrix grad_gates(const Step& step);
  void grad_logits(Step& step, MatrixView dz, DeviceMoEGradients& grads);
  void send_logit_grads(const Step& step, MatrixView dz);
  // Serving side -> home: row i of `rows` (one per input row) to its home;
  // there, each token's rows summed in ascending rank order into out.
  void send_home_and_sum(const Step& step, TensorView rows, const char* phase, TensorView out);
  // Item i of `order` gets row rows[i] of src, packed in wire order into
  // compute_send_ (rounded to the wire dtype), and exchanged under `phase`.
  void send_vectors(const wire::WireOrder& order, const std::vector<int32_t>& rows, TensorView src,
                    const char* phase);
  // What came back in compute_recv_: `expected` rows from each rank (else
  // an InternalError naming the phase), as one [rows, d] wire-dtype view.
  TensorView received_vectors(const wire::WireOrder& expected, const char* phase) const;
  // Re-plan phases.
  void migrate(const Placement& next);
  void send_migrants(const Placement& next);
  void receive_migrants(ExpertShard& next, Matrix& next_centers) const;
  // Expert e's W1, W2 (the compute's memory) and center (at `center`, on
  // center_device) into its rows of `next`.
  void place_expert(int32_t e, const char* w1, const char* w2, const char* center,
                    Device center_device, ExpertShard& next, Matrix& next_centers) const;

  comm::Communicator& comm_;
  MoEConfig config_;
  ExpertShard experts_;
  std::unique_ptr<LayerRouting> routing_;
  // Exchange buffers reused across steps (contents are per phase): host
  // records, and buffers in the compute's memory (vectors, the dispatch
  // message, migrating experts).
  wire::Outbox dispatch_out_;
  comm::ExchangeBuffer send_, recv_;
  comm::ExchangeBuffer compute_send_, compute_recv_;
};

}  // namespace airmoe::runtime
