#include "runtime/moe_layer.h"

#include <algorithm>
#include <cstring>
#include <span>
#include <unordered_map>

#include "core/checks.h"
#include "core/clock.h"
#include "core/errors.h"

namespace airmoe::runtime {
namespace {

// Key of a received token: (home rank, token index on its home).
int64_t home_key(int32_t home, int32_t token) {
  return (static_cast<int64_t>(home) << 32) | static_cast<uint32_t>(token);
}

}  // namespace

MoELayer::MoELayer(comm::Communicator& comm, Strategy strategy, MoEConfig config, Codebook codebook,
                   std::vector<int32_t> assignment, Placement placement, MatrixView centers,
                   uint64_t expert_seed)
    : comm_(comm), config_(config) {
  comm::check_together(comm_, "MoE layer set-up", [&] {
    if (centers.rows != placement.experts())
      fail("centers have " + std::to_string(centers.rows) + " rows for " +
           std::to_string(placement.experts()) + " experts");
    require_cols(centers, codebook.dim(), "centers");
    if (config_.expert.dim != codebook.dim())
      fail("expert dim " + std::to_string(config_.expert.dim) +
           " differs from d = " + std::to_string(codebook.dim()));
    require_in_range(config_.k, 1, placement.experts(), "k");
    require_in_range(config_.probes, 1, codebook.size(), "probes m");
    wire::check_wire_dtype(config_.wire_dtype);
    experts_ =
        ExpertShard::random(config_.expert, placement.local_experts(comm.rank()), expert_seed);
  });
  {
    // Same strategy, shapes, expert configuration and wire dtype everywhere,
    // or nobody dispatches (a rank with another h or wire dtype would misread
    // every message).
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(
        comm_,
        std::string(to_string(strategy)) + " k=" + std::to_string(config_.k) +
            " m=" + std::to_string(config_.probes) + " d=" + std::to_string(config_.expert.dim) +
            " h=" + std::to_string(config_.expert.hidden) + " act=" +
            to_string(config_.expert.activation) + " wire_dtype=" + to_string(config_.wire_dtype) +
            " seed=" + std::to_string(expert_seed) +
            " placement=" + std::to_string(placement.digest()),
        "MoE layer configuration");
  }
  routing_ = make_layer_routing(comm_, strategy, config_.probes, std::move(codebook),
                                std::move(assignment), std::move(placement), centers);
}

// ---------------------------------------------------------- the handle --

// The step's state: what the forward decided and computed, which its
// backward reuses. Counts come from prefix sums, no atomics.
struct DispatchHandle::State {
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

DispatchHandle::DispatchHandle() = default;
DispatchHandle::~DispatchHandle() = default;
DispatchHandle::DispatchHandle(DispatchHandle&&) noexcept = default;
DispatchHandle& DispatchHandle::operator=(DispatchHandle&&) noexcept = default;

const DispatchHandle::State& DispatchHandle::state() const {
  if (!state_)
    throw UsageError(
        "DispatchHandle: the handle is empty (default-constructed or moved from); use the one "
        "MoELayer::forward returned");
  return *state_;
}

const Routes& DispatchHandle::routes() const {
  return state().routes;
}

const StepStats& DispatchHandle::stats() const {
  return state().stats;
}

// ---------------------------------------------------------------- forward --

ForwardResult MoELayer::forward(MatrixView tokens) {
  ForwardResult result;
  result.handle.state_ = std::make_unique<Step>();
  Step& step = *result.handle.state_;
  step.strategy = strategy();
  step.placement_digest = placement().digest();
  PhaseSeconds& seconds = step.stats.seconds;
  RoutedBatch batch;
  {
    ScopedTimer timer(seconds.route);
    batch = routing_->route(tokens, config_.k);
  }
  step.routes = std::move(batch.routes);
  step.stats.router_flops_per_token = batch.router_flops_per_token;
  {
    ScopedTimer timer(seconds.dispatch);
    dispatch(tokens, step);
  }
  Matrix partial;
  {
    ScopedTimer timer(seconds.experts);
    partial = serve(step, batch.received);
  }
  {
    ScopedTimer timer(seconds.combine);
    result.output = combine(step, partial.view());
  }
  return result;
}

// Per (token, target rank) the slots that rank serves (and, when the
// strategy says so, the token vector).
void MoELayer::dispatch(MatrixView tokens, Step& step) {
  wire::expert_dispatch(placement(), step.routes, tokens, routing_->dispatch_ships_vectors(),
                        config_.wire_dtype, comm_.size(), dispatch_out_);
  step.target_offsets = std::move(dispatch_out_.target_offsets);
  step.targets = std::move(dispatch_out_.targets);
  step.slot_offsets = std::move(dispatch_out_.slot_offsets);
  step.slots = std::move(dispatch_out_.slots);
  comm::PhaseScope phase(comm_, "dispatch");
  comm_.exchange(dispatch_out_.send, recv_);
}

// One input row per (home, token) served and the experts on them. Whatever
// fails here (a malformed record, an expert's check) fails every rank
// together, before the combine moves data.
Matrix MoELayer::serve(Step& step, const ReceivedTokens& received) {
  Matrix partial;
  comm::check_together(comm_, "MoE forward: serving experts", [&] {
    read_dispatch(step, received);
    partial = Matrix(step.inputs.rows(), step.inputs.cols());
    step.cache = experts_.forward(step.inputs.view(), step.pairs, partial);
  });
  return partial;
}

// The dispatch messages (wire::expert_dispatch's sections) and each
// record's vector, which came with the message (dense-replicated) or with
// the scoring request (fused).
void MoELayer::read_dispatch(Step& step, const ReceivedTokens& received) {
  const int64_t d = config_.expert.dim;
  const bool shipped = routing_->dispatch_ships_vectors();
  std::unordered_map<int64_t, int64_t> received_row;
  for (size_t i = 0; i < received.home_rank.size(); ++i)
    received_row[home_key(received.home_rank[i], received.home_token[i])] = static_cast<int64_t>(i);
  std::vector<float> inputs;
  step.input_pairs.assign(1, 0);
  for (wire::Reader& in : wire::readers(recv_)) {
    const wire::DispatchMessage m = wire::read_dispatch(in, d, shipped, config_.wire_dtype);
    for (int64_t r = 0; r < m.records(); ++r) {
      const auto row = static_cast<int32_t>(step.input_home.size());
      for (int64_t p = m.pair_offsets[r]; p < m.pair_offsets[r + 1]; ++p) {
        step.pairs.token.push_back(row);
        step.pairs.expert.push_back(m.experts[p]);
        step.pairs.gate.push_back(m.gates[p]);
      }
      step.input_home.push_back(in.source());
      step.input_pairs.push_back(static_cast<int64_t>(step.pairs.size()));
      inputs.insert(inputs.end(), d, 0.0f);
      float* x = inputs.data() + inputs.size() - d;
      if (shipped) {
        std::copy_n(m.vectors.data() + r * d, d, x);
        continue;
      }
      const auto it = received_row.find(home_key(in.source(), m.tokens[r]));
      if (it == received_row.end())
        throw InternalError("MoE forward: rank " + std::to_string(comm_.rank()) +
                            " must serve token " + std::to_string(m.tokens[r]) + " of rank " +
                            std::to_string(in.source()) + ", which it was never sent");
      std::copy_n(received.vectors.row(it->second), d, x);
    }
  }
  step.inputs = Matrix(static_cast<int64_t>(step.input_home.size()), d);
  std::copy(inputs.begin(), inputs.end(), step.inputs.data());
}

Matrix MoELayer::combine(const Step& step, MatrixView partial) {
  return send_home_and_sum(step, partial, "combine");
}

// One partial vector per (token, rank) back home, summed there in ascending
// rank order.
Matrix MoELayer::send_home_and_sum(const Step& step, MatrixView rows, const char* phase) {
  const int64_t d = config_.expert.dim, T = step.routes.tokens;
  wire::vector_rows(
      step.input_home, comm_.size(), d, config_.wire_dtype, [&](size_t i) { return rows.row(i); },
      send_);
  {
    comm::PhaseScope scope(comm_, phase);
    comm_.exchange(send_, recv_);
  }
  Matrix out(T, d);
  std::vector<wire::Reader> in = wire::readers(recv_);
  std::vector<float> part(static_cast<size_t>(d));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = step.target_offsets[t]; i < step.target_offsets[t + 1]; ++i) {
      in[step.targets[i]].take_vector(part.data(), part.size(), config_.wire_dtype,
                                      "partial output row");
      for (int64_t c = 0; c < d; ++c) out(t, c) += part[c];
    }
  wire::expect_all_done(in, phase);
  return out;
}

// --------------------------------------------------------------- backward --

MoEGradients MoELayer::backward(DispatchHandle& handle, MatrixView d_out) {
  check_backward_args(handle, d_out);
  Step& step = *handle.state_;
  PhaseSeconds& seconds = step.stats.seconds;
  seconds.backward_dispatch = seconds.backward_experts = seconds.backward_combine = 0.0;
  MoEGradients grads;
  Matrix dy;
  {
    ScopedTimer timer(seconds.backward_dispatch);
    dy = grad_dispatch(step, d_out);
  }
  {
    ScopedTimer timer(seconds.backward_experts);
    expert_backward(step, dy.view(), grads);
    const Matrix dz = grad_gates(step);
    grad_logits(step, dz.view(), grads);
  }
  ScopedTimer timer(seconds.backward_combine);
  grads.d_tokens = grad_combine(step);
  return grads;
}

void MoELayer::check_backward_args(const DispatchHandle& handle, MatrixView d_out) {
  comm::check_together(comm_, "MoE backward", [&] {
    const Step& step = handle.state();
    if (step.placement_digest != placement().digest() || step.strategy != strategy())
      fail(
          "the dispatch handle was made under another placement or strategy (a re-plan happened "
          "between forward and backward); run forward again");
    const int64_t d = config_.expert.dim, T = step.routes.tokens;
    if (d_out.rows != T || d_out.cols != d)
      fail("d_out is [" + std::to_string(d_out.rows) + ", " + std::to_string(d_out.cols) +
           "], expected [" + std::to_string(T) + ", " + std::to_string(d) + "]");
    require_finite(d_out, "d_out");
  });
}

// dL/dy out to every rank that served the token, one row per input row.
Matrix MoELayer::grad_dispatch(const Step& step, MatrixView d_out) {
  std::vector<int32_t> record_token(step.targets.size());
  for (int64_t t = 0; t < step.routes.tokens; ++t)
    std::fill(record_token.begin() + step.target_offsets[t],
              record_token.begin() + step.target_offsets[t + 1], static_cast<int32_t>(t));
  wire::vector_rows(
      step.targets, comm_.size(), config_.expert.dim, config_.wire_dtype,
      [&](size_t i) { return d_out.row(record_token[i]); }, send_);
  {
    comm::PhaseScope phase(comm_, "grad_dispatch");
    comm_.exchange(send_, recv_);
  }
  Matrix dy(step.inputs.rows(), config_.expert.dim);
  std::vector<wire::Reader> in = wire::readers(recv_);
  for (int64_t i = 0; i < dy.rows(); ++i)
    in[step.input_home[i]].take_vector(dy.row(i), static_cast<size_t>(dy.cols()),
                                       config_.wire_dtype, "output gradient");
  wire::expect_all_done(in, "grad_dispatch");
  return dy;
}

// The experts' backward where they live; fails every rank together.
void MoELayer::expert_backward(Step& step, MatrixView dy, MoEGradients& grads) {
  comm::check_together(comm_, "MoE backward: serving experts", [&] {
    step.pair_dx = Matrix(step.inputs.rows(), config_.expert.dim);
    grads.touched_experts = experts_.backward(step.inputs.view(), step.pairs, step.cache, dy,
                                              step.pair_d_gate, step.pair_dx);
    if (config_.dense_expert_grads) grads.dense_experts = experts_.to_dense(grads.touched_experts);
  });
}

// dL/dgate of each pair back home; there, dL/dz of each chosen logit
// (softmax over the chosen k).
Matrix MoELayer::grad_gates(const Step& step) {
  const int k = config_.k;
  wire::records(
      step.input_home, comm_.size(),
      [&](size_t i) {
        return std::span<const float>(
            step.pair_d_gate.data() + step.input_pairs[i],
            static_cast<size_t>(step.input_pairs[i + 1] - step.input_pairs[i]));
      },
      send_);
  {
    comm::PhaseScope phase(comm_, "grad_gates");
    comm_.exchange(send_, recv_);
  }
  Matrix dz(step.routes.tokens, k);
  std::vector<wire::Reader> in = wire::readers(recv_);
  std::vector<double> dg(static_cast<size_t>(k));
  for (int64_t t = 0; t < step.routes.tokens; ++t) {
    for (int64_t i = step.target_offsets[t]; i < step.target_offsets[t + 1]; ++i)
      for (int64_t s = step.slot_offsets[i]; s < step.slot_offsets[i + 1]; ++s)
        dg[step.slots[s]] = in[step.targets[i]].take<float>("gate gradient");
    const float* g = step.routes.gates_of(t);
    double weighted = 0.0;
    for (int j = 0; j < k; ++j) weighted += g[j] * dg[j];
    for (int j = 0; j < k; ++j) dz(t, j) = static_cast<float>(g[j] * (dg[j] - weighted));
  }
  wire::expect_all_done(in, "grad_gates");
  return dz;
}

// dL/dz to the experts' ranks, where the centers live: center gradients stay
// there, and each input row's dL/dx gains its logits' part.
void MoELayer::grad_logits(Step& step, MatrixView dz, MoEGradients& grads) {
  send_logit_grads(step, dz);
  const int64_t d = config_.expert.dim;
  std::vector<wire::Reader> in = wire::readers(recv_);
  std::vector<int32_t> input, local;  // (input row, hosted center) of each pair
  std::vector<double> pair_dzs;
  const Matrix& centers = local_centers();
  for (int64_t i = 0; i < step.inputs.rows(); ++i) {
    float* dx = step.pair_dx.row(i);
    for (int64_t p = step.input_pairs[i]; p < step.input_pairs[i + 1]; ++p) {
      const float pair_dz = in[step.input_home[i]].take<float>("logit gradient");
      const auto e = static_cast<int32_t>(experts_.index_of(step.pairs.expert[p]));
      const float* w = centers.row(e);
      for (int64_t c = 0; c < d; ++c) dx[c] += pair_dz * w[c];
      input.push_back(static_cast<int32_t>(i));
      local.push_back(e);
      pair_dzs.push_back(pair_dz);
    }
  }
  wire::expect_all_done(in, "grad_logits");
  // Each hosted center's gradient: its pairs' dz * input row, in input-row
  // order, in double (the ops' sum), listed for every center a pair used.
  // Hosted rows ascend with their ids.
  const Compute& c = experts_.compute();
  const RowGrads rows = c.ops->accumulate_row_grads(
      Staged(c, step.inputs.view()), Staged(c, centers.view()),
      {device_vector(c, input), device_vector(c, local), device_vector(c, pair_dzs)}, TensorView(),
      c.stream);                                             // dL/dx is the float sum above
  grads.d_centers = with_rows_hit(to_host(c, rows), local);  // every center a pair used
  for (int32_t& r : grads.d_centers.rows) r = experts_.ids()[r];
}

// One float per pair, (token, target, slot) order, to the pair's rank.
void MoELayer::send_logit_grads(const Step& step, MatrixView dz) {
  std::vector<float> record_dz(step.slots.size());
  for (int64_t t = 0; t < step.routes.tokens; ++t)
    for (int64_t i = step.target_offsets[t]; i < step.target_offsets[t + 1]; ++i)
      for (int64_t s = step.slot_offsets[i]; s < step.slot_offsets[i + 1]; ++s)
        record_dz[s] = dz(t, step.slots[s]);
  wire::records(
      step.targets, comm_.size(),
      [&](size_t i) {
        return std::span<const float>(
            record_dz.data() + step.slot_offsets[i],
            static_cast<size_t>(step.slot_offsets[i + 1] - step.slot_offsets[i]));
      },
      send_);
  comm::PhaseScope phase(comm_, "grad_logits");
  comm_.exchange(send_, recv_);
}

// Each serving rank's whole share of dL/dx, home.
Matrix MoELayer::grad_combine(const Step& step) {
  return send_home_and_sum(step, step.pair_dx.view(), "grad_combine");
}

// ------------------------------------------------------ centers, codebook --

void MoELayer::set_local_centers(MatrixView centers) {
  const int64_t d = config_.expert.dim;
  const Matrix& mine = local_centers();
  char changed = 0;
  comm::check_together(comm_, "MoE layer", [&] {
    if (centers.rows != mine.rows() || (centers.rows > 0 && centers.cols != d))
      fail("set_local_centers: got [" + std::to_string(centers.rows) + ", " +
           std::to_string(centers.cols) + "], this rank hosts [" + std::to_string(mine.rows()) +
           ", " + std::to_string(d) + "]");
    changed = centers.rows > 0 &&
              std::memcmp(centers.data, mine.data(), mine.size() * sizeof(float)) != 0;
  });
  std::vector<char> flags(static_cast<size_t>(comm_.size()));
  {
    comm::PhaseScope phase(comm_, "checks");
    comm_.allgather(&changed, 1, flags.data());
  }
  if (std::none_of(flags.begin(), flags.end(), [](char f) { return f != 0; })) return;
  routing_->set_local_centers(MatrixView(centers.data, mine.rows(), d));
}

// -------------------------------------------------------------- re-plan --

PlacementPlan MoELayer::replan(PlacementPolicy policy, const std::vector<double>& list_load) {
  // The routing's current codebook and lists (a sync may have moved them).
  PlacementPlan plan = plan_and_broadcast(comm_, policy, codebook(), lists(), list_load);
  migrate(plan.placement);
  return plan;
}

// Each moving expert's FFN and center go to its new rank, in one exchange.
void MoELayer::migrate(const Placement& next_placement) {
  send_migrants(next_placement);
  ExpertShard next(config_.expert, next_placement.local_experts(comm_.rank()));
  Matrix next_centers(next.size(), config_.expert.dim);
  const Matrix& centers = local_centers();
  for (int64_t i = 0; i < experts_.size(); ++i)
    if (next_placement.owner(experts_.ids()[i]) == comm_.rank())
      place_expert(experts_.ids()[i], experts_.w1(i), experts_.w2(i), centers.row(i), next,
                   next_centers);
  receive_migrants(next, next_centers);
  experts_ = std::move(next);
  routing_->move_experts(next_placement, next_centers.view());
}

// To each new rank, (id, W1, W2, center) of every expert leaving this rank
// for it, in hosted order; nothing to a rank that gains none of them.
void MoELayer::send_migrants(const Placement& next) {
  const int64_t d = config_.expert.dim;
  const auto w1 = static_cast<size_t>(config_.expert.w1_size());
  const auto w2 = static_cast<size_t>(config_.expert.w2_size());
  const Matrix& centers = local_centers();
  std::vector<int64_t> bytes(static_cast<size_t>(comm_.size()), 0);
  for (const int32_t e : experts_.ids())
    if (next.owner(e) != comm_.rank())
      bytes[next.owner(e)] +=
          wire::migrant_record_bytes(config_.expert.w1_rows(), config_.expert.hidden, d);
  send_.reset(bytes);
  wire::Writer out(send_);
  for (int64_t i = 0; i < experts_.size(); ++i) {
    const int32_t e = experts_.ids()[i];
    const int to = next.owner(e);
    if (to == comm_.rank()) continue;
    out.put(to, &e, 1);
    out.put(to, experts_.w1(i), w1);
    out.put(to, experts_.w2(i), w2);
    out.put(to, centers.row(i), static_cast<size_t>(d));
  }
  out.finish();
  comm::PhaseScope phase(comm_, "migration");
  comm_.exchange(send_, recv_);
}

void MoELayer::receive_migrants(ExpertShard& next, Matrix& next_centers) const {
  std::vector<float> w1(static_cast<size_t>(config_.expert.w1_size())),
      w2(static_cast<size_t>(config_.expert.w2_size())), c(static_cast<size_t>(config_.expert.dim));
  for (wire::Reader& in : wire::readers(recv_))
    while (!in.done()) {
      const auto e = in.take<int32_t>("migrating expert id");
      in.take_n(w1.data(), w1.size(), "migrating W1");
      in.take_n(w2.data(), w2.size(), "migrating W2");
      in.take_n(c.data(), c.size(), "migrating center");
      place_expert(e, w1.data(), w2.data(), c.data(), next, next_centers);
    }
}

void MoELayer::place_expert(int32_t e, const float* w1, const float* w2, const float* center,
                            ExpertShard& next, Matrix& next_centers) const {
  const int64_t j = next.index_of(e);
  if (j < 0)
    throw InternalError("migration: expert " + std::to_string(e) + " arrived at rank " +
                        std::to_string(comm_.rank()) + ", which does not host it");
  std::copy_n(w1, config_.expert.w1_size(), next.w1(j));
  std::copy_n(w2, config_.expert.w2_size(), next.w2(j));
  std::copy_n(center, config_.expert.dim, next_centers.row(j));
}

}  // namespace airmoe::runtime
